"""Reading Whetstone manifests from YAML files, with errors that name the file, the line and the field.

A manifest is checked in the order the API server checks it, so `whetstone validate` refuses what the server
refuses:

1. the YAML, read as kubectl reads it (`yamlload`: Go's YAML rules, bounded work, duplicate keys refused);
2. the generated CRD schema, checked as the server checks it (`openapi`: strict types, bounds, enums,
   patterns, unknown fields with a did-you-mean), with object metadata checked as the server checks it;
3. the pydantic model, whose `RULES` are the CRD's CEL rules in Python.

Nothing here raises anything but ManifestError for a bad file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import GROUP_VERSION, RESOURCE_KINDS, openapi
from .base import ApiModel, ObjectMeta, RuleError
from .yamlload import Document, YamlProblem, dotted, load


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ManifestError(ValueError):
    """A manifest that does not validate; `problems` lists every one found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_documents(path: Path) -> list[tuple[dict[str, Any], Document]]:
    """Every YAML document in the file with where its values are (for line numbers)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ManifestError([Problem(path, None, "", f"cannot read: {e.strerror}")]) from e
    try:
        docs = load(data)
    except YamlProblem as e:
        raise ManifestError([Problem(path, e.line, "", e.message)]) from None
    if not docs:
        raise ManifestError([Problem(path, None, "", "the file holds no YAML document")])
    for doc in docs:
        if not isinstance(doc.value, dict):
            raise ManifestError([Problem(path, doc.line, "", "expected a YAML mapping (a resource)")])
    return [(doc.value, doc) for doc in docs]


@cache
def validation_schema(kind: str) -> dict[str, Any]:
    """The schema the API server checks a `kind` against: its CRD schema, with the object metadata every
    object has in place of the CRD's free-form `metadata`."""
    from .crd import KINDS, openapi_schema, structural_schema  # the generator imports every kind

    schema = openapi_schema(next(k for k in KINDS if k.model.__name__ == kind))
    schema["properties"]["metadata"] = structural_schema(ObjectMeta)
    return schema


def _root_rules(kind: str) -> list[Any]:
    from .crd import KINDS

    return next(k for k in KINDS if k.model.__name__ == kind).root_rules


def _without_nulls(value: Any) -> Any:
    """The object after the server's pruning: a null field is an unset field."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def parse_resource(doc: dict[str, Any], where: Document | None, path: Path) -> ApiModel:
    """Validate one document as the Whetstone kind it names."""

    def line(loc: tuple[str | int, ...]) -> int | None:
        return where.line_of(loc) if where else None

    kind = doc.get("kind")
    model = RESOURCE_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        near = openapi.suggestion(kind, list(RESOURCE_KINDS)) if isinstance(kind, str) else None
        raise ManifestError(
            [
                Problem(
                    path,
                    line(("kind",)),
                    "kind",
                    f"unknown kind {kind!r}; expected one of {', '.join(RESOURCE_KINDS)}"
                    + (f" (did you mean {near}?)" if near else ""),
                )
            ]
        )
    if doc.get("apiVersion") != GROUP_VERSION:
        raise ManifestError(
            [
                Problem(
                    path,
                    line(("apiVersion",)),
                    "apiVersion",
                    f"expected {GROUP_VERSION}, got {doc.get('apiVersion')!r}",
                )
            ]
        )
    # The server ignores status when an object is created (it has a status subresource).
    doc = {k: v for k, v in doc.items() if k != "status"}
    found = openapi.check(doc, validation_schema(kind))
    if found:
        raise ManifestError(
            [
                Problem(
                    path,
                    where.key_line(p.path) if where and p.unknown_field else line(p.path),
                    dotted(p.path),
                    p.message,
                )
                for p in found
            ]
        )
    try:
        resource = model.model_validate(_without_nulls(doc))
    except ValidationError as e:
        raise ManifestError([_problem_of(err, path, line) for err in e.errors()]) from None
    broken = [r for r in _root_rules(kind) if not r.holds(resource)]
    if broken:
        raise ManifestError(
            [Problem(path, line(("metadata", "name")), r.field or "metadata.name", r.message) for r in broken]
        )
    return resource


def _problem_of(err: Any, path: Path, line: Any) -> Problem:
    loc = tuple(err["loc"])
    error = (err.get("ctx") or {}).get("error")
    field = error.field if isinstance(error, RuleError) else None
    if field:
        loc = (*loc, *field.split("."))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return Problem(path, line(loc), dotted(loc), msg)


def load_resources(path: Path) -> list[ApiModel]:
    """Every Whetstone resource in a YAML file; the problems of all of them at once."""
    resources, problems = [], []
    for doc, where in load_documents(path):
        try:
            resources.append(parse_resource(doc, where, path))
        except ManifestError as e:
            problems += e.problems
    if problems:
        raise ManifestError(problems)
    return resources


def load_resource(path: Path) -> ApiModel:
    """The single Whetstone resource in a YAML file."""
    docs = load_documents(path)
    if len(docs) != 1:
        raise ManifestError([Problem(path, None, "", f"expected one resource, found {len(docs)} documents")])
    doc, where = docs[0]
    return parse_resource(doc, where, path)
