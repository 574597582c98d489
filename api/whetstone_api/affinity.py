"""A pod's `affinity` (node affinity, pod affinity and anti-affinity) as typed models, checked the way pod
validation checks it, so a job whose pods the API server would refuse is refused when it is applied."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import k8s
from .base import ApiModel, Rule, cel_string_list

_KEY_MAX = 317
_VALUES_MAX = 64
_TERMS_MAX = 16
_KEY = Field(min_length=1, max_length=_KEY_MAX, pattern=k8s.QUALIFIED_NAME)
# Formats of list items are OpenAPI patterns with a maxLength: CEL over unbounded strings in nested lists
# costs more than the API server's budget for a CRD.
LabelValue = Annotated[str, Field(max_length=k8s.LABEL_VALUE_MAX, pattern=k8s.LABEL_VALUE)]
QualifiedName = Annotated[str, Field(min_length=1, max_length=_KEY_MAX, pattern=k8s.QUALIFIED_NAME)]
Namespace = Annotated[str, Field(min_length=1, max_length=k8s.DNS_LABEL_MAX, pattern=k8s.DNS_LABEL)]
NodeValue = Annotated[str, Field(min_length=1, max_length=k8s.LABEL_VALUE_MAX)]

_SET_OPERATORS = ("In", "NotIn")
_EXISTS_OPERATORS = ("Exists", "DoesNotExist")


def _values_rules(numeric: bool) -> tuple[Rule, ...]:
    rules = [
        Rule(
            f"!(self.operator in {cel_string_list(_SET_OPERATORS)}) || size(self.values) > 0",
            "values must not be empty when operator is In or NotIn",
            lambda r: r.operator not in _SET_OPERATORS or bool(r.values),
            field="values",
        ),
        Rule(
            f"!(self.operator in {cel_string_list(_EXISTS_OPERATORS)}) || size(self.values) == 0",
            "values must be empty when operator is Exists or DoesNotExist",
            lambda r: r.operator not in _EXISTS_OPERATORS or not r.values,
            field="values",
        ),
    ]
    if numeric:
        rules.append(
            Rule(
                "!(self.operator in ['Gt', 'Lt']) || (size(self.values) == 1 && "
                "self.values[0].matches('^[+-]?[0-9]+$'))",
                "values must be exactly one integer when operator is Gt or Lt",
                lambda r: r.operator not in ("Gt", "Lt") or (len(r.values) == 1 and _is_int(r.values[0])),
                field="values",
            )
        )
    return tuple(rules)


def _is_int(text: str) -> bool:
    try:
        int(text, 10)
    except ValueError:
        return False
    return text.strip() == text and "_" not in text


class LabelSelectorRequirement(ApiModel):
    """A label selector requirement: key, operator and values."""

    RULES = _values_rules(numeric=False)

    key: str = _KEY
    """The label key the selector applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """In, NotIn, Exists or DoesNotExist."""
    values: list[LabelValue] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Values for In and NotIn; empty for Exists and DoesNotExist."""


class LabelSelector(ApiModel):
    """A label query over a set of objects."""

    RULES = (
        Rule(
            f"self.matchLabels.all(k, k.matches('{k8s.QUALIFIED_NAME}'))",
            "matchLabels keys must be label keys",
            lambda s: all(k8s.qualified_name_problem(k) is None for k in s.match_labels),
            field="matchLabels",
        ),
    )

    match_labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=_TERMS_MAX)
    """Labels the objects must have, each as key: value."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Requirements the objects' labels must meet (all of them)."""


class NodeSelectorRequirement(ApiModel):
    """A requirement on a node's labels."""

    RULES = _values_rules(numeric=True)

    key: str = _KEY
    """The node label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """In, NotIn, Exists, DoesNotExist, Gt or Lt."""
    values: list[NodeValue] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Values for In and NotIn, one integer for Gt and Lt, none for Exists and DoesNotExist."""


class NodeFieldSelectorRequirement(ApiModel):
    """A requirement on a node's fields: only metadata.name, with In or NotIn and one value."""

    key: Literal["metadata.name"]
    """The node field; only metadata.name is supported."""
    operator: Literal["In", "NotIn"]
    """In or NotIn."""
    values: list[Annotated[str, Field(min_length=1, max_length=k8s.DNS_SUBDOMAIN_MAX)]] = Field(
        min_length=1, max_length=1
    )
    """Exactly one node name."""


class NodeSelectorTerm(ApiModel):
    """Requirements a node must meet (all of them)."""

    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Requirements on the node's labels."""
    match_fields: list[NodeFieldSelectorRequirement] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Requirements on the node's fields."""


class NodeSelector(ApiModel):
    """Terms of which a node must meet at least one."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=_TERMS_MAX)
    """The terms, ORed."""


class PreferredSchedulingTerm(ApiModel):
    """A weighted node preference."""

    weight: int = Field(ge=1, le=100)
    """Weight in 1-100 added to the score of nodes that meet the preference."""
    preference: NodeSelectorTerm
    """The node requirements."""


class NodeAffinity(ApiModel):
    """Where the trainer pods may and would rather run, by node labels."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes a pod must run on."""
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=_TERMS_MAX
    )
    """Nodes a pod would rather run on."""


class PodAffinityTerm(ApiModel):
    """Pods (matched by labels) that must or must not run in the same topology domain."""

    label_selector: LabelSelector | None = None
    """The pods this term is about."""
    namespace_selector: LabelSelector | None = None
    """Namespaces of those pods, by label; unset and namespaces empty: the job's namespace."""
    namespaces: list[Namespace] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Namespaces of those pods, by name."""
    topology_key: str = _KEY
    """The node label that defines a topology domain, e.g. kubernetes.io/hostname."""
    match_label_keys: list[QualifiedName] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Label keys whose values are taken from the incoming pod and ANDed into labelSelector."""
    mismatch_label_keys: list[QualifiedName] = Field(default_factory=list, max_length=_VALUES_MAX)
    """Label keys whose values from the incoming pod must differ."""


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod (anti-)affinity preference."""

    weight: int = Field(ge=1, le=100)
    """Weight in 1-100."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(ApiModel):
    """Run near pods that match."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = Field(
        default_factory=list, max_length=_TERMS_MAX
    )
    """Terms every pod must meet."""
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = Field(
        default_factory=list, max_length=_TERMS_MAX
    )
    """Terms a pod would rather meet."""


class Affinity(ApiModel):
    """Pod affinity and anti-affinity, as in a pod's spec.affinity."""

    node_affinity: NodeAffinity | None = None
    """Node affinity of the trainer pods."""
    pod_affinity: PodAffinity | None = None
    """Run the trainer pods near pods that match."""
    pod_anti_affinity: PodAffinity | None = None
    """Run the trainer pods away from pods that match."""
