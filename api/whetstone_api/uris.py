"""Storage URIs, parsed once: the syntax of every form a spec may hold, and where a pvc:// URI lives inside a
trainer pod. No file-system or network access here; the trainer resolves the parsed form to a local path,
the operator mounts the claims it names.

Forms: a path (relative to the manifest's folder) or file:///abs/path; pvc://CLAIM/PATH; hf://ORG/NAME[@REV];
s3://BUCKET/KEY; whetstone://NAME (a bundled model).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .wire import PVC_ROOT

Scheme = Literal["path", "pvc", "hf", "s3", "whetstone"]

# A claim name is an object name: a DNS subdomain (dots allowed); claim_volume_name makes a DNS label of it.
CLAIM_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

FORMS = (
    "a path (relative to the manifest's folder) or file:///abs/path, pvc://CLAIM/PATH, "
    "hf://ORG/NAME[@REVISION], "
    "s3://BUCKET/KEY or whetstone://NAME"
)


class URIError(ValueError):
    """A URI that is not well-formed. `problem` says what is wrong, `hint` how to write it."""

    def __init__(self, uri: str, problem: str, hint: str | None = None) -> None:
        self.uri, self.problem, self.hint = uri, problem, hint
        super().__init__(f"{uri!r}: {problem}" + (f". {hint}" if hint else ""))


@dataclass(frozen=True)
class StorageURI:
    """A parsed URI. `path` is the path for a local form, the path inside the claim for pvc://, the key for
    s3://; `host` is the claim, bucket, hf repository id or bundled model name."""

    uri: str
    scheme: Scheme
    path: str = ""
    host: str = ""
    revision: str | None = None

    @property
    def pod_path(self) -> str | None:
        """Where a pvc:// URI is found inside a trainer pod; None for other forms."""
        if self.scheme != "pvc":
            return None
        return posixpath.join(PVC_ROOT, self.host, self.path) if self.path else f"{PVC_ROOT}/{self.host}"


def parse_uri(uri: str) -> StorageURI:
    """Parse `uri`; raises URIError naming it."""
    if not isinstance(uri, str) or not uri.strip():
        raise URIError(str(uri), "the URI is empty", f"Accepted forms: {FORMS}")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise URIError(uri, "the URI contains a control character")
    text = uri.strip()
    match = _SCHEME.match(text)
    if match is None:
        return StorageURI(uri, "path", path=text)
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest:
            raise URIError(uri, "file:// needs a path", "Write file:///abs/path")
        return StorageURI(uri, "path", path=rest)
    if scheme == "pvc":
        return _pvc(uri, rest)
    if scheme == "hf":
        return _hf(uri, rest)
    if scheme == "s3":
        return _s3(uri, rest)
    if scheme == "whetstone":
        return StorageURI(uri, "whetstone", host=rest.strip("/").lower())
    raise URIError(uri, f"unsupported scheme {scheme + '://'!r}", f"Accepted forms: {FORMS}")


def _split(rest: str) -> tuple[str, str]:
    head, _, tail = rest.partition("/")
    return head, tail.strip("/")


def _pvc(uri: str, rest: str) -> StorageURI:
    claim, sub = _split(rest)
    hint = "Write pvc://CLAIM/PATH, e.g. pvc://models/llama-3-8b"
    if not claim:
        raise URIError(uri, "pvc:// needs a claim name", hint)
    if not CLAIM_NAME.match(claim):
        raise URIError(
            uri,
            f"{claim!r} is not a valid PersistentVolumeClaim name (lower-case letters, digits, '-' and '.')",
            hint,
        )
    parts = sub.split("/") if sub else []
    if ".." in parts:
        raise URIError(uri, "the path inside the claim must not contain '..'", hint)
    return StorageURI(uri, "pvc", path="/".join(p for p in parts if p not in ("", ".")), host=claim)


def _hf(uri: str, rest: str) -> StorageURI:
    repo, at, revision = rest.partition("@")
    repo = repo.strip("/")
    parts = repo.split("/") if repo else []
    hint = "Write hf://ORG/NAME or hf://ORG/NAME@REVISION, e.g. hf://HuggingFaceTB/SmolLM2-135M-Instruct"
    if not parts:
        raise URIError(uri, "hf:// needs a repository name", hint)
    if len(parts) > 2 or not all(_HF_PART.match(p) for p in parts):
        raise URIError(uri, f"{repo!r} is not a Hugging Face repository id", hint)
    if at and not _HF_REVISION.match(revision):
        raise URIError(uri, f"{revision!r} is not a valid revision", hint)
    return StorageURI(uri, "hf", host=repo, revision=revision or None)


def _s3(uri: str, rest: str) -> StorageURI:
    bucket, key = _split(rest)
    hint = "Write s3://BUCKET/KEY, e.g. s3://my-models/llama-3-8b"
    if not bucket:
        raise URIError(uri, "s3:// needs a bucket name", hint)
    if not _S3_BUCKET.match(bucket):
        raise URIError(uri, f"{bucket!r} is not a valid S3 bucket name", hint)
    return StorageURI(uri, "s3", path=key, host=bucket)


def claims_of(uris: Iterable[str]) -> list[str]:
    """The claims named by the pvc:// URIs among `uris`, in order, each once. Malformed URIs are skipped
    (validation reports them)."""
    claims: list[str] = []
    for uri in uris:
        try:
            parsed = parse_uri(uri)
        except URIError:
            continue
        if parsed.scheme == "pvc" and parsed.host not in claims:
            claims.append(parsed.host)
    return claims


def claim_volume_name(claim: str) -> str:
    """The pod volume of a claim mounted for pvc:// URIs. Volume names are DNS labels, claim names DNS
    subdomains: a name that does not fit as is gets a digest, so two claims never share a volume."""
    plain = f"pvc-{claim}"
    if len(plain) <= 63 and "." not in claim:
        return plain
    digest = hashlib.sha256(claim.encode()).hexdigest()[:10]
    return f"pvc-{claim.replace('.', '-')[:48].rstrip('-')}-{digest}"


def uri_of_pod_path(path: str) -> str:
    """A path inside a trainer pod as the URI a user would write: claim mounts back to pvc://."""
    if path.startswith(PVC_ROOT + "/"):
        return "pvc://" + path[len(PVC_ROOT) + 1 :]
    return path


def is_within(uri: str, folder_uri: str) -> bool:
    """Whether `uri` names something inside `folder_uri` (both as a user writes them); '..' never escapes."""
    try:
        inner, outer = parse_uri(uri), parse_uri(folder_uri)
    except URIError:
        return False
    if inner.scheme != outer.scheme or inner.host != outer.host:
        return False
    if ".." in inner.path.split("/"):
        return False
    if not outer.path:  # the whole claim or bucket
        return True
    base, path = posixpath.normpath(outer.path), posixpath.normpath(inner.path or ".")
    return path == base or path.startswith(base.rstrip("/") + "/")
