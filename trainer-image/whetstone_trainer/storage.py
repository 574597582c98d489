"""Where datasets and outputs live: a URI (parsed by whetstone_api.uris) to a local path.

A path (relative to the manifest's folder), file:///abs/path, or pvc://claim/path, which is read at the
claim's mount point (<WHETSTONE_PVC_ROOT>/<claim>/<path>; the operator mounts claims there). s3:// and hf://
are named so that a manifest written for a cluster fails here with a clear message rather than a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from whetstone_api.uris import URIError, parse_uri
from whetstone_api.wire import ENV_PVC_ROOT, PVC_ROOT


class StorageError(ValueError):
    """A dataset or output URI that cannot be used here; the message names the field and the URI."""


def pvc_root() -> Path:
    """Where claims are mounted: $WHETSTONE_PVC_ROOT, else the operator's mount root."""
    return Path(os.environ.get(ENV_PVC_ROOT, PVC_ROOT))


def resolve_uri(uri: str, base_dir: Path | None, field: str) -> Path:
    try:
        parsed = parse_uri(uri)
    except URIError as e:
        raise StorageError(f"{field}: {e}") from None
    if parsed.scheme == "path":
        path = Path(parsed.path).expanduser()
        if uri.strip().lower().startswith("file://") and not path.is_absolute():
            raise StorageError(
                f"{field}: {uri!r}: a file:// URI needs an absolute path (file:///data/x.jsonl)"
            )
        return path if path.is_absolute() or base_dir is None else (base_dir / path).resolve()
    if parsed.scheme == "pvc":
        if not parsed.path:
            raise StorageError(f"{field}: {uri!r}: expected pvc://<claim>/<path>")
        return pvc_root() / parsed.host / parsed.path
    if parsed.scheme in ("s3", "hf"):
        raise StorageError(
            f"{field}: {uri!r}: {parsed.scheme}:// is not reachable from here (no network); copy the data "
            "to a "
            "path or a PVC and use that"
        )
    raise StorageError(f"{field}: {uri!r}: a whetstone:// name is a bundled model, not a place for files")
