"""Building blocks shared by every Whetstone resource: the model base class, validation rules written once for
the API server and for Python, object metadata, conditions, and the Kubernetes types the specs embed
(resources, tolerations).

Every field is documented with an attribute docstring; the CRD generator turns those docstrings into the
`description` that `kubectl explain` prints, so a field without one is a bug.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import GenerateJsonSchema

from . import k8s

API_GROUP = "whetstone.dev"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

# Kubernetes quantities ("500m", "16Gi", 8) are either integers or strings. The bound on the length keeps the
# cost of the CEL rules that parse them within the API server's budget.
Quantity = int | Annotated[str, Field(max_length=64)]

LIST_MAP_KEYS = "x-whetstone-list-map-keys"
"""Marker a model puts in its schema to say that a list of it is a map keyed by these fields (as Kubernetes'
`+listType=map` / `+listMapKey`): the CRD generator turns every list of such items into
`x-kubernetes-list-type: map`, so the API server refuses two items with the same key."""


@dataclass(frozen=True)
class Rule:
    """One validation rule, written once: `cel` is what the API server evaluates (an entry of the CRD's
    `x-kubernetes-validations`), `holds` the same condition in Python on the validated model (defaults
    applied, as the server applies them before it evaluates the rule), `message` what both say.

    `field` names the field the rule is about (camelCase, relative to the model), so both the server and
    `whetstone validate` point at it. `detail` may add the offending values to the Python message.
    """

    cel: str
    message: str
    holds: Callable[[Any], bool]
    field: str | None = None
    reason: str | None = None
    detail: Callable[[Any], str] | None = None

    def entry(self) -> dict[str, str]:
        # A CRD declares no schema for metadata, so the server takes no fieldPath into it.
        path = f".{self.field}" if self.field and not self.field.startswith("metadata.") else None
        return cel(self.cel, self.message, field_path=path, reason=self.reason)

    def check(self, model: Any) -> None:
        """Raise the rule's error when it does not hold for `model`."""
        try:
            if self.holds(model):
                return
        except ValueError:  # a value an earlier rule should have refused: this rule fails too
            pass
        message = self.message + (f" ({self.detail(model)})" if self.detail else "")
        raise RuleError(message, self.field)


class RuleError(ValueError):
    """A Rule that does not hold; `field` is the field it names, relative to the model that declares it."""

    def __init__(self, message: str, field: str | None) -> None:
        super().__init__(message)
        self.field = field


def _schema_extra(schema: dict[str, Any], cls: type) -> None:
    """Put a model's rules and markers into its JSON schema, for the CRD generator."""
    rules = [r.entry() for r in getattr(cls, "RULES", ())]
    if rules:
        schema["x-kubernetes-validations"] = rules
    keys = getattr(cls, "LIST_MAP_KEYS", ())
    if keys:
        schema[LIST_MAP_KEYS] = list(keys)


class ApiModel(BaseModel):
    """Base of every resource model: camelCase on the wire, unknown fields rejected, docstrings as
    descriptions (in the schemas of CRDJsonSchema), and the model's `RULES` checked after its fields."""

    # Not pydantic's use_attribute_docstrings: it parses each class's source when the class is built, about
    # 40 % of building the models, on every start of the operator, the trainer and the CLI; only the schemas
    # read the descriptions (CRDJsonSchema.model_schema).
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
        allow_inf_nan=False,
        json_schema_extra=_schema_extra,
    )

    RULES: ClassVar[tuple[Rule, ...]] = ()
    """Rules across this model's fields, each evaluated by the API server and by Python."""
    LIST_MAP_KEYS: ClassVar[tuple[str, ...]] = ()
    """When set, lists of this model are maps keyed by these fields (unique keys)."""

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).RULES:
            rule.check(self)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry. Prefer a `Rule`, which also carries the Python check."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def cel_string_list(values: Any) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The docstring under each annotated attribute of the class body of `cls` (its own, not inherited)."""
    return _module_attribute_docstrings(cls.__module__).get(cls.__qualname__, {})


@functools.cache
def _module_attribute_docstrings(module: str) -> dict[str, dict[str, str]]:
    """Every class of a module by qualified name: its attributes' docstrings. One parse of the module's
    source (inspect.getsource of each class would parse the whole file once per class)."""
    try:
        tree = ast.parse(inspect.getsource(sys.modules[module]))
    except (KeyError, OSError, TypeError):  # no source (a module built at run time)
        return {}
    out: dict[str, dict[str, str]] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, ast.ClassDef):
                continue
            docs = out.setdefault(prefix + node.name, {})
            for attr, after in itertools.pairwise(node.body):
                if (
                    isinstance(attr, ast.AnnAssign)
                    and isinstance(attr.target, ast.Name)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)
                ):
                    docs[attr.target.id] = inspect.cleandoc(after.value.value)
            visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return out


class CRDJsonSchema(GenerateJsonSchema):
    """Gives fields with a default_factory an explicit empty default, so the API server fills in the nested
    defaults and `kubectl get -o yaml` shows the settings a job really runs with; and each field the
    docstring under it as its description."""

    def model_schema(self, schema: Any) -> Any:
        out = super().model_schema(schema)
        cls = schema["cls"]
        docs: dict[str, str] = {}
        for base in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
            if issubclass(base, BaseModel) and base is not BaseModel:
                docs.update(attribute_docstrings(base))
        properties = self.resolve_ref_schema(out).get("properties", {}) if docs else {}
        for name, field in cls.model_fields.items():
            key = field.alias if self.by_alias and field.alias else name
            if name in docs and key in properties and "description" not in properties[key]:
                properties[key]["description"] = docs[name]
        return out

    def default_schema(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()
            inner = self.generate_inner(schema["schema"])
            if isinstance(value, BaseModel):
                return {**inner, "default": {}}
            if value in ([], {}):
                return {**inner, "default": value}
            return inner
        return super().default_schema(schema)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The CRD-style JSON schema of `model` with every $ref replaced by its definition, to give a field
    that is kept as a plain dict the schema of a model (see FineTuneJobSpec.affinity)."""
    schema = model.model_json_schema(by_alias=True, schema_generator=CRDJsonSchema)
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
                target.update({k: v for k, v in node.items() if k != "$ref"})
                return resolve(target)
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


class Condition(ApiModel):
    """The standard Kubernetes condition (metav1.Condition)."""

    LIST_MAP_KEYS = ("type",)

    type: str = Field(max_length=316)
    """Kind of condition, e.g. Succeeded, Failed, Running, Suspended."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(default="", max_length=1024)
    """Machine-readable CamelCase reason of the last transition."""
    message: str = Field(default="", max_length=32768)
    """Human-readable explanation of the last transition."""
    last_transition_time: datetime | None = None
    """When the condition last changed status."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the condition was computed from."""


# --- resources --------------------------------------------------------------------------------------------

STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
GPU_RESOURCE = "nvidia.com/gpu"
_MAX_RESOURCES = 16


def _resource_name_ok(name: str) -> bool:
    if name in STANDARD_RESOURCES or name.startswith("hugepages-"):
        return True
    # Extended resources: a qualified name with a domain, outside kubernetes.io (pod validation).
    return "/" in name and not name.startswith("kubernetes.io/") and k8s.qualified_name_problem(name) is None


def _is_extended(name: str) -> bool:
    return name not in STANDARD_RESOURCES and not name.startswith("hugepages-")


def _quantities_ok(values: dict[str, Quantity]) -> bool:
    try:
        return all(k8s.parse_quantity(v) >= 0 for v in values.values())
    except ValueError:
        return False


def _extended_whole(values: dict[str, Quantity]) -> bool:
    return all(k8s.parse_quantity(v) % 1 == 0 for k, v in values.items() if _is_extended(k))


def _limit_at_least_request(r: ResourceRequirements) -> bool:
    return all(
        k not in r.limits or k8s.parse_quantity(v) <= k8s.parse_quantity(r.limits[k])
        for k, v in r.requests.items()
    )


# The API server checks a `default: {}` against these rules before it fills in the nested defaults, so each
# rule allows the maps to be absent.
def _names_cel(side: str) -> str:
    return (
        f"!has(self.{side}) || self.{side}.all(k, k in {cel_string_list(STANDARD_RESOURCES)} || "
        "k.startsWith('hugepages-') || "
        f"(k.contains('/') && !k.startsWith('kubernetes.io/') && k.matches('{k8s.QUALIFIED_NAME}')))"
    )


def _quantities_cel(side: str) -> str:
    q = f"string(self.{side}[k])"
    return (
        f"!has(self.{side}) || "
        f"self.{side}.all(k, isQuantity({q}) && !quantity({q}).isLessThan(quantity('0')))"
    )


def _extended_cel(side: str) -> str:
    extended = f"!(k in {cel_string_list(STANDARD_RESOURCES)}) && !k.startsWith('hugepages-')"
    return (
        f"!has(self.{side}) || "
        f"self.{side}.all(k, !({extended}) || quantity(string(self.{side}[k])).isInteger())"
    )


class ResourceRequirements(ApiModel):
    """Compute resources of one trainer pod, as in a container's `resources`, checked as pod validation
    checks them."""

    # The quantity rules come first so that the comparisons after them see quantities only.
    RULES = tuple(
        rule
        for side in ("requests", "limits")
        for rule in (
            Rule(
                _names_cel(side),
                f"{side}: a resource is cpu, memory, ephemeral-storage, hugepages-<size> or an extended "
                "resource with a domain (vendor.example/device)",
                lambda r, side=side: all(_resource_name_ok(k) for k in getattr(r, side)),
                field=side,
            ),
            Rule(
                _quantities_cel(side),
                f"{side}: every value must be a non-negative quantity, e.g. 500m, 2, 16Gi (write fractions "
                'as strings: "0.5")',
                lambda r, side=side: _quantities_ok(getattr(r, side)),
                field=side,
            ),
            Rule(
                _extended_cel(side),
                f"{side}: extended resources take whole numbers",
                lambda r, side=side: _extended_whole(getattr(r, side)),
                field=side,
            ),
        )
    ) + (
        Rule(
            f"!(has(self.requests) && '{GPU_RESOURCE}' in self.requests) && "
            f"!(has(self.limits) && '{GPU_RESOURCE}' in self.limits)",
            f"{GPU_RESOURCE} is set by gpusPerNode (FineTuneJob) or gpus (TrainingSession), not in resources",
            lambda r: GPU_RESOURCE not in r.requests and GPU_RESOURCE not in r.limits,
        ),
        Rule(
            "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || "
            "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
            "requests: a request must not exceed its limit",
            _limit_at_least_request,
            field="requests",
        ),
        Rule(
            f"!has(self.requests) || self.requests.all(k, (k in {cel_string_list(STANDARD_RESOURCES)}) || "
            "k.startsWith('hugepages-') || (has(self.limits) && (k in self.limits) && "
            "quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) == 0))",
            "requests: an extended resource needs a limit equal to its request",
            lambda r: all(
                not _is_extended(k)
                or (k in r.limits and k8s.parse_quantity(v) == k8s.parse_quantity(r.limits[k]))
                for k, v in r.requests.items()
            ),
            field="requests",
        ),
    )

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=_MAX_RESOURCES)
    """Minimum resources, e.g. {cpu: "8", memory: 64Gi}. GPUs come from gpusPerNode."""
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=_MAX_RESOURCES)
    """Maximum resources, e.g. {memory: 80Gi}."""


# --- scheduling -------------------------------------------------------------------------------------------

_KEY_MAX = 317  # a 253-character prefix, '/', a 63-character name


class Toleration(ApiModel):
    """A pod toleration, as in `spec.tolerations` of a pod, checked as pod validation checks it."""

    RULES = (
        Rule(
            "!has(self.key) || self.key == '' || (self.key.size() <= 317 && "
            f"self.key.matches('{k8s.QUALIFIED_NAME}'))",
            "key must be a qualified name (an optional DNS-subdomain prefix and '/', then at most 63 "
            "letters, digits, '-', '_' and '.')",
            lambda t: not t.key or k8s.qualified_name_problem(t.key) is None,
            field="key",
        ),
        Rule(
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "operator must be Exists when key is empty",
            lambda t: bool(t.key) or t.operator == "Exists",
            field="operator",
        ),
        Rule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "value must be empty when operator is Exists",
            lambda t: t.operator != "Exists" or not t.value,
            field="value",
        ),
        Rule(
            f"!has(self.value) || self.value.matches('{k8s.LABEL_VALUE}')",
            "value must be a label value (at most 63 letters, digits, '-', '_' and '.', alphanumeric at "
            "both ends)",
            lambda t: t.value is None or k8s.label_value_problem(t.value) is None,
            field="value",
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerationSeconds needs effect NoExecute",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            field="tolerationSeconds",
        ),
    )

    key: str | None = Field(default=None, max_length=_KEY_MAX)
    """Taint key the toleration applies to; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = Field(default=None, max_length=k8s.LABEL_VALUE_MAX)
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace, by name."""

    LIST_MAP_KEYS = ("name",)

    name: str = Field(min_length=1, max_length=k8s.DNS_SUBDOMAIN_MAX, pattern=k8s.DNS_SUBDOMAIN)
    """Name of the referenced object."""


def label_map_problem(labels: dict[str, str], what: str) -> str | None:
    """Why a map of labels (or a node selector) would be refused, or None."""
    for key, value in labels.items():
        problem = k8s.qualified_name_problem(key, f"{what} key") or k8s.label_value_problem(
            value, f"{what} value of {key}"
        )
        if problem:
            return problem
    return None


LABEL_MAP_CEL = f"self.all(k, k.size() <= {_KEY_MAX} && k.matches('{k8s.QUALIFIED_NAME}'))"
"""CEL for a map whose keys are label keys (node selectors)."""


class ObjectMeta(ApiModel):
    """Object metadata as the API server validates it for every object: names, namespace, labels and
    annotations. Fields the server manages are accepted as they are."""

    name: str = Field(min_length=1, max_length=k8s.DNS_SUBDOMAIN_MAX, pattern=k8s.DNS_SUBDOMAIN)
    """Name of the object: a DNS subdomain; each kind may ask for less (a FineTuneJob's names its pods)."""
    namespace: str | None = Field(default=None, max_length=k8s.DNS_LABEL_MAX, pattern=k8s.DNS_LABEL)
    """Namespace of the object: a DNS label."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels; kueue.x-k8s.io/queue-name sends the job through a Kueue queue."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations (256 KiB in all)."""
    generate_name: str | None = None
    """Prefix of a generated name (not used for Whetstone resources: give a name)."""
    uid: str | None = None
    """Set by the API server."""
    resource_version: str | None = None
    """Set by the API server."""
    generation: int | None = None
    """Set by the API server."""
    creation_timestamp: Any = None
    """Set by the API server."""
    deletion_timestamp: Any = None
    """Set by the API server."""
    deletion_grace_period_seconds: int | None = None
    """Set by the API server."""
    owner_references: list[dict[str, Any]] | None = None
    """Owners of the object."""
    finalizers: list[str] | None = None
    """Finalizers of the object."""
    managed_fields: list[dict[str, Any]] | None = None
    """Set by the API server."""
    self_link: str | None = None
    """Deprecated; set by old API servers."""

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        problem = label_map_problem(labels, "label")
        if problem:
            raise ValueError(problem)
        return labels

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        problem = k8s.annotations_problem(annotations)
        if problem:
            raise ValueError(problem)
        return annotations
