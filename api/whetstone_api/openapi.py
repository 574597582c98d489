"""A value checked against a CRD's structural OpenAPI schema the way kube-apiserver checks it: strict types
(a quoted "8" is not an integer, "true" is not a boolean), integers within int64, the server's comparison of
integers with bounds, enums, patterns, lengths, item counts, required fields, map-list keys, and unknown
fields refused as `kubectl apply` (strict field validation) refuses them, with a did-you-mean.

The CEL rules (`x-kubernetes-validations`) are not evaluated here: each has its Python twin in the models'
`RULES`. `tests/test_crds.py` also uses this module to check every default of every generated schema.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

Path = tuple[str | int, ...]
_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)
_SAFE_FLOAT_INT = 2**53


@dataclass(frozen=True)
class SchemaProblem:
    path: Path
    message: str
    unknown_field: bool = False


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f'"{text}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return _type_name(value)
    return repr(value)


def _is_integer(value: Any) -> bool:
    """An integer as the server accepts one: an int64, or a float that is a whole number within 2^53."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return _INT64[0] <= value <= _INT64[1]
    return (
        isinstance(value, float)
        and math.isfinite(value)
        and value == int(value)
        and abs(value) <= _SAFE_FLOAT_INT
    )


def suggestion(name: str, candidates: list[str]) -> str | None:
    """The known field a misspelt one most likely means: the same name in another case or spelling
    (learningrate, learning_rate -> learningRate), or a close match (lerningRate -> learningRate)."""

    def norm(s: str) -> str:
        return s.replace("_", "").replace("-", "").lower()

    by_norm = {norm(c): c for c in candidates}
    if norm(name) in by_norm:
        return by_norm[norm(name)]
    close = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.75)
    return by_norm[close[0]] if close else None


@lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def check(value: Any, schema: dict[str, Any], path: Path = ()) -> list[SchemaProblem]:
    """Every problem of `value` against `schema` (a structural OpenAPI v3 node); empty when valid."""
    out: list[SchemaProblem] = []
    _check(value, schema, path, out)
    return out


def _check(value: Any, schema: dict[str, Any], path: Path, out: list[SchemaProblem]) -> None:
    if value is None:
        if schema.get("nullable"):
            return
        out.append(SchemaProblem(path, f"must be of type {_expected(schema)}, not null"))
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _is_integer(value)):
            hint = ' (write fractions as strings, e.g. "0.5" or "500m")' if isinstance(value, float) else ""
            out.append(SchemaProblem(path, f"must be an integer or a string, not {_show(value)}{hint}"))
            return
        if isinstance(value, str):
            _check_string(value, schema, path, out)
        return
    kind = schema.get("type")
    if kind is None:  # free-form (x-kubernetes-preserve-unknown-fields) or no schema at all
        if isinstance(value, dict) and "properties" in schema:
            _check_object(value, schema, path, out)
        return
    if not _type_ok(value, kind):
        out.append(SchemaProblem(path, f"must be of type {kind}, not {_type_name(value)} {_show(value)}"))
        return
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_show(v) for v in schema["enum"])
        out.append(SchemaProblem(path, f"Unsupported value: {_show(value)}: supported values: {allowed}"))
        return
    if kind == "object":
        _check_object(value, schema, path, out)
    elif kind == "array":
        _check_array(value, schema, path, out)
    elif kind == "string":
        _check_string(value, schema, path, out)
    elif kind in ("integer", "number"):
        _check_number(value, schema, path, out)


def _expected(schema: dict[str, Any]) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    return str(schema.get("type", "value"))


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return _is_integer(value)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return True


def _check_object(
    value: dict[str, Any], schema: dict[str, Any], path: Path, out: list[SchemaProblem]
) -> None:
    props: dict[str, Any] = schema.get("properties", {})
    additional = schema.get("additionalProperties")
    free = schema.get("x-kubernetes-preserve-unknown-fields", False)
    present = {k for k, v in value.items() if v is not None}  # the server prunes nulls before defaulting
    for key, item in value.items():
        if item is None and (key in props or isinstance(additional, dict)):
            continue
        if key in props:
            _check(item, props[key], (*path, key), out)
        elif isinstance(additional, dict):
            _check(item, additional, (*path, key), out)
        elif not free:
            near = suggestion(key, list(props))
            out.append(
                SchemaProblem(
                    (*path, key),
                    "unknown field" + (f"; did you mean {near}?" if near else ""),
                    unknown_field=True,
                )
            )
    for key in schema.get("required", []):
        if key not in present:
            out.append(SchemaProblem((*path, key), "Required value"))
    count = len(value)
    if "maxProperties" in schema and count > schema["maxProperties"]:
        out.append(
            SchemaProblem(path, f"Too many: {count}: must have at most {schema['maxProperties']} items")
        )
    if "minProperties" in schema and count < schema["minProperties"]:
        out.append(SchemaProblem(path, f"must have at least {schema['minProperties']} items"))


def _check_array(value: list[Any], schema: dict[str, Any], path: Path, out: list[SchemaProblem]) -> None:
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        out.append(
            SchemaProblem(path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items")
        )
        return
    if "minItems" in schema and len(value) < schema["minItems"]:
        out.append(SchemaProblem(path, f"must have at least {schema['minItems']} items"))
    items = schema.get("items")
    if items:
        for i, item in enumerate(value):
            _check(item, items, (*path, i), out)
    keys = schema.get("x-kubernetes-list-map-keys")
    if schema.get("x-kubernetes-list-type") == "map" and keys:
        seen: dict[tuple[Any, ...], int] = {}
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key = tuple(repr(item.get(k)) for k in keys)
            if key in seen:
                shown = ", ".join(f"{k}={_show(item.get(k))}" for k in keys)
                out.append(SchemaProblem((*path, i), f"Duplicate value: {shown} (also item {seen[key]})"))
            seen.setdefault(key, i)


def _check_string(value: str, schema: dict[str, Any], path: Path, out: list[SchemaProblem]) -> None:
    length = len(value)  # Go counts runes, as Python counts code points
    if "maxLength" in schema and length > schema["maxLength"]:
        out.append(SchemaProblem(path, f"Too long: may not be more than {schema['maxLength']} characters"))
    if "minLength" in schema and length < schema["minLength"]:
        out.append(SchemaProblem(path, f"should be at least {schema['minLength']} chars long"))
    pattern = schema.get("pattern")
    if pattern and not _regex(pattern).search(value):
        out.append(SchemaProblem(path, f"Invalid value: {_show(value)}: should match '{pattern}'"))


def _check_number(value: int | float, schema: dict[str, Any], path: Path, out: list[SchemaProblem]) -> None:
    if schema.get("format") == "int32" and not (_INT32[0] <= value <= _INT32[1]):
        out.append(SchemaProblem(path, f"Invalid value: {_show(value)}: must be a 32-bit integer"))
        return
    as_int = isinstance(value, int)
    for key, exclusive_key, below in (
        ("minimum", "exclusiveMinimum", True),
        ("maximum", "exclusiveMaximum", False),
    ):
        if key not in schema:
            continue
        bound = schema[key]
        exclusive = bool(schema.get(exclusive_key))
        # The server compares an integer with the bound truncated to an integer (kube-openapi's
        # MinimumNativeType / MaximumNativeType), and a float with the bound itself.
        limit = int(bound) if as_int else bound
        if below:
            bad = value < limit or (exclusive and value == limit)
            words = "greater than" if exclusive else "greater than or equal to"
        else:
            bad = value > limit or (exclusive and value == limit)
            words = "less than" if exclusive else "less than or equal to"
        if bad:
            out.append(
                SchemaProblem(path, f"Invalid value: {_show(value)}: should be {words} {_show(limit)}")
            )
