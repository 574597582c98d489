"""Where datasets and outputs live: a URI to a local path.

A path (relative to the manifest's folder), file:///abs/path, or pvc://claim/path, which is read at the
claim's mount point (<WHETSTONE_PVC_ROOT>/<claim>/<path>; the operator mounts claims there). s3:// is named
so that a manifest written for a cluster fails here with a clear message rather than a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from .model_sources import DEFAULT_PVC_ROOT, PVC_ROOT_ENV


class StorageError(ValueError):
    """A dataset or output URI that cannot be used here; the message names the field and the URI."""


def resolve_uri(uri: str, base_dir: Path | None, field: str) -> Path:
    if "://" not in uri:
        path = Path(uri).expanduser()
        return path if path.is_absolute() or base_dir is None else (base_dir / path).resolve()
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        if not rest.startswith("/"):
            raise StorageError(
                f"{field}: {uri!r}: a file:// URI needs an absolute path (file:///data/x.jsonl)"
            )
        return Path(rest)
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        if not claim or not sub:
            raise StorageError(f"{field}: {uri!r}: expected pvc://<claim>/<path>")
        return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / claim / sub
    if scheme == "s3":
        raise StorageError(
            f"{field}: {uri!r}: s3:// is not reachable from here (no network); copy the data to a path or a "
            "PVC and use that"
        )
    raise StorageError(f"{field}: {uri!r}: unknown scheme {scheme!r}; use a path, file://, pvc:// or s3://")
