"""YAML read the way kubectl reads it, with bounded work, and the line of every value.

kubectl turns a manifest into JSON with Go's YAML 1.1 rules (sigs.k8s.io/yaml over go-yaml v2), which differ
from PyYAML's: `1e-4` is a number there and a string here, `y` and `n` are booleans there, `1:30` is a string
there and 5400 here, `0.0` reaches the API server as the integer 0. So a manifest is resolved here with Go's
rules and its numbers are given the types the API server will see, or `whetstone validate` and the server
would not read the same object.

Hostile input is bounded: the file size (the API server takes at most 3 MiB per request), the nesting depth,
the number of YAML events and the number of values after aliases are expanded (a "billion laughs" document
is refused before it is expanded). Duplicate keys and tags other than the core ones are refused. Every
refusal is a `YamlProblem` with the line, never an exception from the parser.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 3 * 1024 * 1024
"""The API server refuses larger requests."""
MAX_DEPTH = 64
"""Nesting deeper than any resource needs."""
MAX_EVENTS = 400_000
MAX_VALUES = 200_000
"""Values in a file after aliases are expanded."""

Path = tuple[str | int, ...]

_CORE = "tag:yaml.org,2002:"
_PLAIN = "!whetstone/plain"  # a plain scalar, resolved below with Go's rules
_QUOTED = _CORE + "str"

_BASE = yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader


class _Loader(_BASE):  # type: ignore[misc,valid-type]
    """Composes nodes only; every plain scalar keeps its text so that Go's rules can resolve it."""

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is ScalarNode:
            return _PLAIN if implicit[0] else _QUOTED
        return super().resolve(kind, value, implicit)


class YamlProblem(ValueError):
    """A file that cannot be read as a manifest; `line` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.message, self.line = message, line
        super().__init__(message if line is None else f"line {line}: {message}")


@dataclass
class Document:
    """One YAML document: its value (JSON-compatible, as the API server will see it) and where each value
    and key is."""

    value: Any
    line: int
    value_lines: dict[Path, int] = field(default_factory=dict)
    key_lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int:
        """The line of the deepest field along `path` that exists: its key, or the item of a list."""
        for n in range(len(path), -1, -1):
            line = self.key_lines.get(path[:n]) or self.value_lines.get(path[:n])
            if line:
                return line
        return self.line

    def key_line(self, path: Path) -> int:
        """The line of the key at the end of `path` (an unknown field), else of its value."""
        return self.key_lines.get(path) or self.line_of(path)


def load(data: bytes | str) -> list[Document]:
    """Every non-empty document of a YAML file; raises YamlProblem."""
    text = _decode(data)
    _prescan(text)
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.YAMLError as e:
        raise _problem(e) from None
    builder = _Builder()
    docs = []
    for node in nodes:
        if node is None:
            continue
        doc = Document(None, node.start_mark.line + 1)
        doc.value = builder.build(node, (), doc)
        if doc.value is not None:
            docs.append(doc)
    return docs


def _decode(data: bytes | str) -> str:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_BYTES:
        raise YamlProblem(f"the file has {len(raw)} bytes; a manifest may have at most {MAX_BYTES} (3 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise YamlProblem(f"not UTF-8 text ({e.reason} at byte {e.start})", line) from None
    return text.removeprefix("\ufeff")


def _problem(e: yaml.YAMLError) -> YamlProblem:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    return YamlProblem(f"invalid YAML: {problem}" + (f" ({context})" if context else ""), line)


def _prescan(text: str) -> None:
    """Refuse deep nesting and floods of events before any node is built (the composer recurses)."""
    depth = events = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            events += 1
            if events > MAX_EVENTS:
                raise YamlProblem(
                    f"the file has more than {MAX_EVENTS} YAML nodes", event.start_mark.line + 1
                )
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YamlProblem(f"nesting deeper than {MAX_DEPTH} levels", event.start_mark.line + 1)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1 if isinstance(e.position, int) else None
        raise YamlProblem(
            f"invalid YAML: character {chr(e.character) if isinstance(e.character, int) else e.character!r} "
            f"(a control character) is not allowed",
            line,
        ) from None
    except yaml.YAMLError as e:
        raise _problem(e) from None


def dotted(path: Path) -> str:
    """A value's path as a field name: spec.hyperparameters.learningRate, spec.volumes[0].name."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Builder:
    """Turns composed nodes into values, counting every value an alias expands to."""

    def __init__(self) -> None:
        self.values = 0

    def _count(self, node: Node) -> None:
        self.values += 1
        if self.values > MAX_VALUES:
            raise YamlProblem(
                f"the file expands to more than {MAX_VALUES} values (YAML aliases repeat their anchor's "
                "content)",
                node.start_mark.line + 1,
            )

    def build(self, node: Node, path: Path, doc: Document) -> Any:
        self._count(node)
        doc.value_lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, ScalarNode):
            try:
                return as_sent(_scalar(node))
            except NotJSON as e:
                raise YamlProblem(
                    f"{dotted(path)}: {e}" if path else str(e), node.start_mark.line + 1
                ) from None
        if isinstance(node, SequenceNode):
            if node.tag != _CORE + "seq":
                raise YamlProblem(f"unsupported tag {node.tag}", node.start_mark.line + 1)
            return [self.build(item, (*path, i), doc) for i, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            if node.tag != _CORE + "map":
                raise YamlProblem(f"unsupported tag {node.tag}", node.start_mark.line + 1)
            return self._mapping(node, path, doc)
        raise YamlProblem("unsupported YAML node", node.start_mark.line + 1)

    def _mapping(self, node: MappingNode, path: Path, doc: Document) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merged: list[MappingNode] = []
        for key_node, value_node in node.value:
            if (
                isinstance(key_node, ScalarNode)
                and key_node.tag == _CORE + "merge"
                or (isinstance(key_node, ScalarNode) and key_node.tag == _PLAIN and key_node.value == "<<")
            ):
                merged += _merge_sources(value_node)
                continue
            key = _key(key_node)
            if key in out:
                first = doc.key_lines.get((*path, key))
                raise YamlProblem(
                    f"duplicate key {key!r}" + (f" (first at line {first})" if first else ""),
                    key_node.start_mark.line + 1,
                )
            doc.key_lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, (*path, key), doc)
        for source in merged:  # explicit keys win over merged ones, earlier merges over later ones
            value = self._mapping(source, path, doc)
            for key, item in value.items():
                out.setdefault(key, item)
        return out


def _merge_sources(node: Node) -> list[MappingNode]:
    if isinstance(node, MappingNode):
        return [node]
    if isinstance(node, SequenceNode) and all(isinstance(n, MappingNode) for n in node.value):
        return list(node.value)
    raise YamlProblem("a merge key (<<) needs a mapping or a list of mappings", node.start_mark.line + 1)


def _key(node: Node) -> str:
    if not isinstance(node, ScalarNode):
        raise YamlProblem(
            "a mapping key must be a plain value, not a list or a mapping", node.start_mark.line + 1
        )
    value = _scalar(node)
    if value is None:
        raise YamlProblem("a mapping key must not be null", node.start_mark.line + 1)
    if isinstance(value, bool):  # go-yaml reads `y:` and `on:` as booleans; JSON keys are their text
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- scalars: go-yaml v2's resolve() ----------------------------------------------------------------------

_MAP = {
    **dict.fromkeys(["y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"], True),
    **dict.fromkeys(["n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"], False),
    **dict.fromkeys(["", "~", "null", "Null", "NULL"], None),
    **dict.fromkeys([".nan", ".NaN", ".NAN"], math.nan),
    **dict.fromkeys([".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"], math.inf),
    **dict.fromkeys(["-.inf", "-.Inf", "-.INF"], -math.inf),
}
_GO_INT = re.compile(r"^([+-]?)(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)$")
_GO_UINT = re.compile(r"^(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)$")
_YAML_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_INT64 = (-(2**63), 2**63 - 1)


class UInt(int):
    """An integer go-yaml reads as uint64 (above int64): the API server receives it as a float."""


def _go_int(text: str) -> int | None:
    match = _GO_INT.match(text)
    if not match:
        return None
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X", "0o", "0O", "0b", "0B"):
        value = int(digits[2:], {"x": 16, "o": 8, "b": 2}[digits[1].lower()])
    elif len(digits) > 1 and digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    return -value if sign == "-" else value


def resolve_plain(text: str) -> Any:
    """The value go-yaml v2 gives a plain (unquoted, untagged) scalar."""
    if text in _MAP:
        return _MAP[text]
    first = text[:1]
    if first == ".":
        if _YAML_FLOAT.match(text):
            value = float(text)
            if not math.isinf(value):
                return value
        return text
    if not (first.isdigit() and first.isascii()) and first not in "+-":
        return text
    plain = text.replace("_", "")
    value = _go_int(plain)
    if value is not None and _INT64[0] <= value <= _INT64[1]:
        return value
    if value is not None and _GO_UINT.match(plain) and value <= 2**64 - 1:
        return UInt(value)
    if _YAML_FLOAT.match(plain):
        number = float(plain)
        if not math.isinf(number):  # Go's ParseFloat fails on overflow, and the text stays a string
            return number
    return text


def _scalar(node: ScalarNode) -> Any:
    tag, text = node.tag, node.value
    line = node.start_mark.line + 1
    if tag == _PLAIN:
        return resolve_plain(text)
    if tag == _QUOTED:
        return text
    if tag == _CORE + "binary":
        try:
            return base64.b64decode("".join(text.split()), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise YamlProblem("!!binary value is not base64 of UTF-8 text", line) from None
    if tag in (_CORE + "int", _CORE + "float", _CORE + "bool", _CORE + "null"):
        value = resolve_plain(text)
        kind = tag.removeprefix(_CORE)
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, float),
            "bool": isinstance(value, bool),
            "null": value is None,
        }[kind]
        if not ok:
            raise YamlProblem(f"cannot read {text!r} as !!{kind}", line)
        return value
    raise YamlProblem(f"unsupported tag {tag} (only the core YAML tags are read)", line)


# --- writing YAML that kubectl and `load` read back as written ----------------------------------------------


class _Dumper(yaml.SafeDumper):
    """PyYAML quotes the strings its own rules would misread, not those Go's rules would (y, n, 1e3, 08)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if resolve_plain(value) != value or value != value.strip() else None
    return dumper.represent_scalar(_CORE + "str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump(doc: Any) -> str:
    """YAML of `doc` that `load` (and kubectl) read back as the same values: write manifests (such as the
    trainer's job.yaml) with this, not with yaml.safe_dump."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True)


# --- numbers as the API server receives them ------------------------------------------------------------


class NotJSON(ValueError):
    """A value kubectl cannot turn into JSON (NaN, infinity)."""


def as_sent(value: Any) -> Any:
    """A number as the API server decodes it after kubectl's YAML -> JSON: Go writes a whole-number float
    without a fraction (0.0 -> 0), and the server reads digits that fit int64 as an integer, else a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, UInt):
        return float(value)
    if isinstance(value, int):
        return value
    if math.isnan(value) or math.isinf(value):
        raise NotJSON(f"{value} is not a number JSON can carry (kubectl refuses it)")
    if value == int(value) and abs(value) < 1e21 and _INT64[0] <= int(value) <= _INT64[1]:
        return int(value)
    return value
