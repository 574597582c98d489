"""Templates: `{{ sample.output_text }}`, `{{ sample.output_json.a.b }}`, `{{ item.field }}`,
`{{ item.list.0 }}`.

Only dotted paths inside `{{ }}`: no filters, no expressions, no code, so a template cannot do anything but
read the sample and the row. A path that names a missing field is an error that says which field and what is
there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .types import TEMPLATE, GradingError, Sample

_PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_PATH = re.compile(r"^(sample|item)(\.[A-Za-z0-9_\-]+)*$")


class TemplateSyntaxError(ValueError):
    """A placeholder that is not a dotted path under sample or item."""


def check(template: str) -> list[str]:
    """The paths of a template's placeholders; raises TemplateSyntaxError on a malformed one."""
    paths = []
    for match in _PLACEHOLDER.finditer(template):
        path = match.group(1)
        if not _PATH.match(path):
            raise TemplateSyntaxError(
                f"{{{{ {path} }}}} is not a template path: use sample.output_text, sample.output_json.<path> "
                "or item.<path>"
            )
        paths.append(path)
    return paths


def lookup(path: str, sample: Sample, item: Mapping[str, Any]) -> Any:
    """The value at a dotted path such as item.answer or sample.output_json.steps.0."""
    root, *parts = path.split(".")
    value: Any = sample.as_dict() if root == "sample" else item
    walked = root
    for part in parts:
        if isinstance(value, Mapping):
            if part not in value:
                fields = ", ".join(sorted(map(str, value))[:20]) or "none"
                raise GradingError(
                    TEMPLATE, f"{{{{ {path} }}}}: {walked} has no field {part!r} (fields: {fields})"
                )
            value = value[part]
        elif isinstance(value, list) and part.isdigit():
            if int(part) >= len(value):
                raise GradingError(
                    TEMPLATE, f"{{{{ {path} }}}}: {walked} has {len(value)} elements, no {part}"
                )
            value = value[int(part)]
        else:
            what = "null" if value is None else type(value).__name__
            raise GradingError(TEMPLATE, f"{{{{ {path} }}}}: {walked} is {what}, it has no field {part!r}")
        walked += "." + part
    return value


def as_text(value: Any) -> str:
    """Strings as they are; anything else as JSON (numbers, true/false, null, objects)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, sample: Sample, item: Mapping[str, Any]) -> str:
    """The template with every placeholder replaced by its value."""
    check(template)
    return _PLACEHOLDER.sub(lambda m: as_text(lookup(m.group(1), sample, item)), template)


def rendered_templates(settings: Any) -> list[str]:
    """The templates a grader type renders for every sample (none for python, http and weighted graders,
    whose item fields are read by code or a service)."""
    names = ("input", "reference", "prompt", "system")
    return [t for n in names if isinstance(t := getattr(settings, n, None), str)]


def missing_item_fields(templates: Sequence[str], rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[str]:
    """Each {{ item.* }} path the templates read that no row has, as "line N: why the first row lacks it".
    A grader that reads such a path fails on every sample: a job with it cannot learn anything."""
    empty = Sample("")
    problems = []
    for path in sorted({p for t in templates for p in check(t) if p.startswith("item.")}):
        first: str | None = None
        for _line, row in rows:
            try:
                lookup(path, empty, row)
                break
            except GradingError as e:
                first = first or e.message
        else:
            if rows and first:
                problems.append(f"line {rows[0][0]}: {first}")
    return problems
