"""Reading Whetstone manifests from YAML files, with errors that name the file, the line and the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from . import GROUP_VERSION, RESOURCE_KINDS
from .base import ApiModel


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


def _line_of(node: yaml.Node | None, path: tuple[str | int, ...]) -> int | None:
    """1-based line of the deepest node along `path` that exists in the YAML document."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None
            )
            if match is None:
                # The field is missing (or unknown): point at its parent, or at the unknown key itself.
                return line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def _key_line(node: yaml.Node | None, path: tuple[str | int, ...]) -> int | None:
    """Line of the key at the end of `path` (for unknown fields, whose value node we also find)."""
    *parent, last = path
    for key in parent:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return None
    if isinstance(node, yaml.MappingNode):
        for k, _v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == last:
                return k.start_mark.line + 1
    return None


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_documents(path: Path) -> list[tuple[dict[str, Any], yaml.Node]]:
    """Every YAML document in the file with its node tree (for line numbers)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError([Problem(path, None, "", f"cannot read: {e.strerror}")]) from e
    try:
        nodes = list(yaml.compose_all(text))
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ManifestError(
            [Problem(path, mark.line + 1 if mark else None, "", f"invalid YAML: {getattr(e, 'problem', e)}")]
        ) from e
    pairs = [(d, n) for d, n in zip(docs, nodes, strict=True) if d is not None]
    if not pairs:
        raise ManifestError([Problem(path, None, "", "the file holds no YAML document")])
    for doc, node in pairs:
        if not isinstance(doc, dict):
            raise ManifestError(
                [Problem(path, node.start_mark.line + 1, "", "expected a YAML mapping (a resource)")]
            )
    return pairs


def parse_resource(doc: dict[str, Any], node: yaml.Node | None, path: Path) -> ApiModel:
    """Validate one document as the Whetstone kind it names."""
    kind = doc.get("kind")
    model = RESOURCE_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ManifestError(
            [
                Problem(
                    path,
                    _line_of(node, ("kind",)),
                    "kind",
                    f"unknown kind {kind!r}; expected one of {', '.join(RESOURCE_KINDS)}",
                )
            ]
        )
    if doc.get("apiVersion") != GROUP_VERSION:
        raise ManifestError(
            [
                Problem(
                    path,
                    _line_of(node, ("apiVersion",)),
                    "apiVersion",
                    f"expected {GROUP_VERSION}, got {doc.get('apiVersion')!r}",
                )
            ]
        )
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                line = _key_line(node, loc)
                msg = "unknown field"
            else:
                line = _line_of(node, loc)
            problems.append(Problem(path, line, _dotted(loc), msg))
        raise ManifestError(problems) from e


def load_resource(path: Path) -> ApiModel:
    """The single Whetstone resource in a YAML file."""
    docs = load_documents(path)
    if len(docs) != 1:
        raise ManifestError([Problem(path, None, "", f"expected one resource, found {len(docs)} documents")])
    doc, node = docs[0]
    return parse_resource(doc, node, path)
