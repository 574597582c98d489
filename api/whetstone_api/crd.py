"""Generate the CustomResourceDefinitions in `crds/` from the pydantic models.

pydantic emits JSON Schema (2020-12); a CRD needs a *structural* OpenAPI v3.0 schema: no `$ref`, no `anyOf`
with null, boolean `exclusiveMinimum`, `x-kubernetes-*` markers for int-or-string, free-form objects and
map-like lists. This module does that conversion and adds what only a CRD has: printer columns, short names,
the status subresource, immutability rules.

Numbers: kubectl turns YAML into JSON through Go, so a whole-number float (`0.0`) reaches the API server as
the integer `0`, and the server compares an integer with a bound truncated to an integer (a value `0` against
`maximum: 0.5` exclusive is checked as `0 < 0`). Fractional bounds therefore become CEL rules, which compare
numbers as doubles; `tests/test_crds.py` checks every default the way the server does.

Run `python -m whetstone_api.crd crds/` (or `whetstone crds`); `tests/test_crds.py` fails when the
files in `crds/` differ from what this produces.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import PLURALS, k8s
from .base import API_GROUP, API_VERSION, LIST_MAP_KEYS, ApiModel, CRDJsonSchema, Rule, cel
from .checkpoint import Checkpoint
from .finetunejob import FineTuneJob
from .rewardgrader import RewardGrader
from .trainingsession import TrainingSession

CATEGORY = "whetstone"

DNS_LABEL_RULE = Rule(
    f"self.metadata.name.size() <= {k8s.DNS_LABEL_MAX} && self.metadata.name.matches('{k8s.DNS_1035_LABEL}')",
    "metadata.name must be a DNS label (lowercase letters, digits and '-', at most 63 characters): "
    "it names the pods and the Service",
    lambda obj: k8s.dns_1035_problem(obj.metadata.name) is None,
)


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class ResourceKind:
    """Everything about one kind that the models do not say."""

    model: type[ApiModel]
    plural: str
    short_names: list[str]
    columns: list[PrinterColumn]
    # Spec fields that may change after creation; every other spec field is immutable (CEL).
    mutable_spec_fields: frozenset[str] | None = None
    # Rules on the whole object beyond the model's own RULES (for kinds whose models say nothing of names).
    root_rules: list[Rule] = field(default_factory=list)

    @property
    def rules(self) -> list[Rule]:
        return [*self.model.RULES, *self.root_rules]


KINDS: list[ResourceKind] = [
    ResourceKind(
        model=FineTuneJob,
        plural=PLURALS["FineTuneJob"],
        short_names=["ftj"],
        columns=[
            PrinterColumn(
                "Phase",
                ".status.phase",
                description="Pending, Suspended, Running, Restarting, Succeeded or Failed",
            ),
            PrinterColumn("Method", ".spec.method", description="sft, dpo or rft"),
            PrinterColumn("Model", ".spec.baseModel.uri", description="The base model"),
            PrinterColumn("Steps", ".status.progress.steps", description="Optimizer steps done / planned"),
            PrinterColumn("Loss", ".status.progress.loss", type="number", description="Latest training loss"),
            PrinterColumn(
                "Reward", ".status.progress.reward", type="number", description="Latest RFT reward"
            ),
            PrinterColumn(
                "Restarts",
                ".status.restartCount",
                type="integer",
                priority=1,
                description="Whole-group restarts",
            ),
            PrinterColumn("Age", ".metadata.creationTimestamp", type="date"),
        ],
        mutable_spec_fields=frozenset({"suspend"}),
    ),
    ResourceKind(
        model=RewardGrader,
        plural=PLURALS["RewardGrader"],
        short_names=["rg"],
        columns=[
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn(
                "Tests",
                ".status.testCasesPassed",
                type="integer",
                description="Test cases that scored as expected",
            ),
            PrinterColumn("Age", ".metadata.creationTimestamp", type="date"),
        ],
    ),
    ResourceKind(
        model=Checkpoint,
        plural=PLURALS["Checkpoint"],
        short_names=["ckpt"],
        columns=[
            PrinterColumn("Source", ".spec.source.name", description="The job or session that wrote it"),
            PrinterColumn("Step", ".spec.step", type="integer"),
            PrinterColumn("Kind", ".spec.kind"),
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("URI", ".spec.uri", priority=1),
            PrinterColumn("Age", ".metadata.creationTimestamp", type="date"),
        ],
        mutable_spec_fields=frozenset(),
    ),
    ResourceKind(
        model=TrainingSession,
        plural=PLURALS["TrainingSession"],
        short_names=["ts"],
        columns=[
            PrinterColumn("Phase", ".status.phase"),
            PrinterColumn("Model", ".spec.baseModel.uri"),
            PrinterColumn("Endpoint", ".status.endpoint"),
            PrinterColumn("Age", ".metadata.creationTimestamp", type="date"),
        ],
        root_rules=[DNS_LABEL_RULE],
    ),
]


_DROP = {"title", "additionalProperties", "$defs", "const", "discriminator", LIST_MAP_KEYS}
_BOUNDS = {
    # JSON-schema keyword: (OpenAPI bound, exclusive, CEL operator that must hold, what the message says)
    "minimum": ("minimum", False, ">=", "greater than or equal to"),
    "exclusiveMinimum": ("minimum", True, ">", "greater than"),
    "maximum": ("maximum", False, "<=", "less than or equal to"),
    "exclusiveMaximum": ("maximum", True, "<", "less than"),
}


def _bound(key: str, value: float, node_type: str | None, out: dict[str, Any]) -> None:
    """An OpenAPI bound, or a CEL rule where the server would truncate it (a fractional bound on a number)."""
    bound, exclusive, op, words = _BOUNDS[key]
    if node_type == "number" and value != int(value):
        out.setdefault("x-kubernetes-validations", []).append(
            cel(f"self {op} {value!r}", f"must be {words} {value!r}")
        )
        return
    out[bound] = int(value) if value == int(value) else value
    if exclusive:
        out[f"exclusive{bound.capitalize()}"] = True


def _structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON-schema node into a structural OpenAPI v3.0 node."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        out = _structural(target, defs)
        if "description" in schema:  # the field's own docstring beats the model's
            out["description"] = " ".join(schema["description"].split())
        if "default" in schema:
            out["default"] = schema["default"]
        return out

    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        types = sorted(o.get("type", "") for o in options)
        if types == ["integer", "string"]:
            out: dict[str, Any] = {"x-kubernetes-int-or-string": True}
            out.update({k: v for o in options for k, v in o.items() if k == "maxLength"})
        elif len(options) == 1:
            out = _structural(options[0], defs)
        else:
            raise ValueError(f"cannot express anyOf {schema['anyOf']} in a structural schema")
        for key in ("description", "default"):
            if key in schema and schema[key] is not None:
                out[key] = schema[key]
        return out

    out = {}
    for key, value in schema.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out["properties"] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; kubectl explain reflows anyway
        elif key in _BOUNDS:
            _bound(key, value, schema.get("type"), out)
        elif key == "x-kubernetes-validations":
            out.setdefault(key, []).extend(value)
        else:
            out[key] = value

    if "const" in schema:
        out["enum"] = [schema["const"]]
        out.setdefault("type", "string")
    additional = schema.get("additionalProperties")
    if schema.get("type") == "object" and "properties" not in schema:
        if isinstance(additional, dict) and additional:
            out["additionalProperties"] = _structural(additional, defs)
        else:  # dict[str, Any]: a free-form object
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "array":
        keys = _list_map_keys(schema.get("items", {}), defs)
        if keys:
            out["x-kubernetes-list-type"] = "map"
            out["x-kubernetes-list-map-keys"] = keys
    return out


def _list_map_keys(items: dict[str, Any], defs: dict[str, Any]) -> list[str] | None:
    """The map keys a list's item model declares with the LIST_MAP_KEYS marker."""
    if "$ref" in items:
        items = defs[items["$ref"].rsplit("/", 1)[-1]]
    return items.get(LIST_MAP_KEYS)


def _immutability_rules(spec: dict[str, Any], mutable: frozenset[str]) -> None:
    """Every spec field but the mutable ones keeps its value, and optional ones cannot be added or removed."""
    required = set(spec.get("required", []))
    presence = []
    for name, prop in spec["properties"].items():
        if name in mutable:
            continue
        prop.setdefault("x-kubernetes-validations", []).append(
            cel(
                "self == oldSelf",
                f"spec.{name} is immutable; only {_list(mutable)} may change after creation",
            )
        )
        if name not in required and "default" not in prop:
            presence.append(
                cel(
                    f"has(self.{name}) == has(oldSelf.{name})",
                    f"spec.{name} cannot be added or removed after creation",
                    field_path=f".{name}",
                )
            )
    spec.setdefault("x-kubernetes-validations", []).extend(presence)


def _list(names: frozenset[str]) -> str:
    return ", ".join(f"spec.{n}" for n in sorted(names)) if names else "nothing"


def structural_schema(model: type[ApiModel]) -> dict[str, Any]:
    """The structural OpenAPI schema of one model."""
    raw = model.model_json_schema(by_alias=True, schema_generator=CRDJsonSchema)
    return _structural(raw, raw.get("$defs", {}))


def openapi_schema(kind: ResourceKind) -> dict[str, Any]:
    raw = kind.model.model_json_schema(by_alias=True, schema_generator=CRDJsonSchema)
    defs = raw.get("$defs", {})
    props = raw["properties"]
    spec = _structural(props["spec"], defs)
    status = _structural(props["status"], defs)
    spec.pop("default", None)
    status.pop("default", None)
    if kind.mutable_spec_fields is not None:
        _immutability_rules(spec, kind.mutable_spec_fields)
    root: dict[str, Any] = {
        "type": "object",
        "description": raw.get("description", ""),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "whetstone.dev/v1alpha1"},
            "kind": {"type": "string", "description": kind.model.__name__},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if kind.rules:
        root["x-kubernetes-validations"] = [r.entry() for r in kind.rules]
    return root


def crd(kind: ResourceKind) -> dict[str, Any]:
    name = kind.model.__name__
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/part-of": "whetstone"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": name,
                "listKind": f"{name}List",
                "plural": kind.plural,
                "singular": name.lower(),
                "shortNames": kind.short_names,
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            k: v
                            for k, v in {
                                "name": c.name,
                                "type": c.type,
                                "jsonPath": c.json_path,
                                "description": c.description,
                                "priority": c.priority,
                            }.items()
                            if v not in ("", 0)
                        }
                        for c in kind.columns
                    ],
                    "schema": {"openAPIV3Schema": openapi_schema(kind)},
                }
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-schemas out in full: anchors and aliases would confuse readers of the CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(kind: ResourceKind) -> str:
    header = "# Generated from api/whetstone_api by `whetstone crds`. Do not edit.\n"
    return header + yaml.dump(crd(kind), Dumper=_NoAliasDumper, sort_keys=False, width=120)


def file_name(kind: ResourceKind) -> str:
    return f"{API_GROUP}_{kind.plural}.yaml"


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in KINDS:
        path = folder / file_name(kind)
        path.write_text(render(kind))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "crds")):
        print(p)
