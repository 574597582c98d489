"""A catalogue of nasty manifests: what a user, an editor or an attacker may hand to `whetstone validate` and
`kubectl apply`. Each case says what `whetstone validate` must report (the field, a fragment of the reason;
the line is checked by the tests) and whether the API server refuses it too.

tests/test_manifests.py runs every case through `whetstone validate`; e2e/test_crds.py runs every case
through `kubectl apply --dry-run=server` against the real API server and checks that the two agree, except
for the cases listed with `stricter`, where validate refuses on purpose what the server lets through.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from whetstone_api import yamlload

BASE: dict[str, Any] = {
    "apiVersion": "whetstone.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "catalogue"},
    "spec": {
        "method": "sft",
        "baseModel": {"uri": "whetstone://tiny"},
        "dataset": {"uri": "pvc://data/train.jsonl"},
        "fullParameter": {},
        "hyperparameters": {"maxSteps": 10, "learningRate": 1.0e-3, "batchSize": 8, "maxSeqLen": 128},
        "output": {"uri": "pvc://runs/catalogue"},
    },
}


def dump(doc: Any) -> str:
    return yamlload.dump(doc)


Edit = Callable[[dict[str, Any]], None]


def put(path: str, value: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return edit


def drop(path: str) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[last]

    return edit


def job(*edits: Edit) -> str:
    doc = copy.deepcopy(BASE)
    for e in edits:
        e(doc)
    return dump(doc)


def spec_text(old: str, new: str) -> str:
    """The base job with one line of its YAML text replaced (for what a dict cannot say)."""
    text = dump(BASE)
    assert old in text, old
    return text.replace(old, new, 1)


def lora(**settings: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["spec"].pop("fullParameter", None)
        doc["spec"]["lora"] = settings

    return edit


def method(name: str, section: Any = None) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["spec"]["method"] = name
        if section is not None:
            doc["spec"][name] = section

    return edit


def hp(key: str, value: Any) -> Edit:
    return put(f"spec.hyperparameters.{key}", value)


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    field: str | None  # the field validate names; None: a problem of the YAML itself (a line is named)
    reason: str  # a fragment of validate's message
    stricter: str | None = None  # why validate refuses what the API server accepts

    @property
    def valid(self) -> bool:
        return self.reason == ""


def ok(case_id: str, text: str) -> Case:
    """A manifest both validate and the API server accept (an edge that must not be refused)."""
    return Case(case_id, text, None, "")


AFFINITY_OK = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["H100"]}
                    ]
                }
            ]
        }
    },
    "podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 50,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"whetstone.dev/job": "other"}},
                },
            }
        ]
    },
}


def node_expr(**expr: Any) -> Edit:
    return put(
        "spec.affinity",
        {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", **expr}]}]
                }
            }
        },
    )


def volume(**v: Any) -> Edit:
    return put("spec.volumes", [{"name": "data", "mountPath": "/data", "emptyDir": {}, **v}])


def tolerate(**t: Any) -> Edit:
    return put("spec.tolerations", [t])


def resources(**r: Any) -> Edit:
    return put("spec.resources", r)


def _bomb() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return dump(BASE).replace("spec:\n", "spec:\n" + "".join(f"  {ln}\n" for ln in lines), 1)


NAME_53 = "n" * 53
DUPLICATE_KEYS = (
    "a duplicate key is refused: kubectl keeps the last value silently, whichever the author meant"
)
TAGS = (
    "YAML tags other than the core ones (!!str, !!int, ...) are refused: kubectl drops them silently and "
    "sends the bare value, which hides what the author meant (!!set, !!python/..., custom tags)"
)

CATALOGUE: list[Case] = [
    # --- the YAML itself -----------------------------------------------------------------------------------
    Case("yaml-syntax", spec_text("  method: sft\n", "  method: [sft\n"), None, "invalid YAML"),
    Case("yaml-tab-indent", spec_text("  method: sft\n", "\tmethod: sft\n"), None, "invalid YAML"),
    Case(
        "yaml-duplicate-key",
        spec_text("  method: sft\n", "  method: dpo\n  method: sft\n"),
        None,
        "duplicate key 'method'",
        stricter=DUPLICATE_KEYS,
    ),
    Case(
        "yaml-duplicate-nested-key",
        spec_text("    batchSize: 8\n", "    batchSize: 8\n    batchSize: 16\n"),
        None,
        "duplicate key 'batchSize'",
        stricter=DUPLICATE_KEYS,
    ),
    Case("yaml-alias-bomb", _bomb(), None, "expands to more than"),
    Case(
        "yaml-deep-nesting",
        spec_text("  method: sft\n", "  method: sft\n  x: " + "[" * 200 + "]" * 200 + "\n"),
        None,
        "nesting deeper than",
    ),
    Case("yaml-nul-byte", spec_text("  method: sft\n", "  method: s\x00ft\n"), None, "control character"),
    Case("yaml-bell-byte", spec_text("  method: sft\n", "  method: \x07sft\n"), None, "control character"),
    Case(
        "yaml-invalid-utf8-in-comment",
        spec_text("  method: sft\n", "  method: sft\n  # \udcff\n"),
        None,
        "not UTF-8",
        stricter="a file that is not UTF-8 is refused whole; kubectl skips such bytes in a comment",
    ),
    Case("yaml-invalid-utf8", spec_text("  method: sft\n", "  method: s\udcfft\n"), None, "not UTF-8"),
    Case(
        "yaml-nan",
        spec_text("    learningRate: 0.001\n", "    learningRate: .nan\n"),
        "spec.hyperparameters.learningRate",
        "not a number JSON can carry",
    ),
    Case(
        "yaml-infinity",
        spec_text("    learningRate: 0.001\n", "    learningRate: .inf\n"),
        "spec.hyperparameters.learningRate",
        "not a number JSON can carry",
    ),
    Case(
        "yaml-python-tag",
        spec_text("  method: sft\n", "  method: !!python/name:os.system sft\n"),
        None,
        "unsupported tag",
        stricter=TAGS,
    ),
    Case(
        "yaml-custom-tag",
        spec_text("  method: sft\n", "  method: !sft sft\n"),
        None,
        "unsupported tag",
        stricter=TAGS,
    ),
    Case(
        "yaml-set-tag",
        spec_text("  fullParameter: {}\n", "  fullParameter: !!set {a}\n"),
        None,
        "unsupported tag",
        stricter=TAGS,
    ),
    Case(
        "yaml-complex-key",
        spec_text("  method: sft\n", "  method: sft\n  ? [a, b]\n  : c\n"),
        None,
        "mapping key must be a plain value",
    ),
    Case(
        "yaml-list-document",
        "- apiVersion: whetstone.dev/v1alpha1\n- kind: FineTuneJob\n",
        None,
        "expected a YAML mapping",
    ),
    Case("yaml-scalar-document", "just some text\n", None, "expected a YAML mapping"),
    Case("yaml-empty-file", "\n# nothing here\n", None, "no YAML document"),
    Case("yaml-too-large", job(put("spec.image", "x" * (3 * 1024 * 1024))), None, "at most 3145728"),
    Case("yaml-bad-merge", spec_text("  method: sft\n", "  method: sft\n  <<: 5\n"), None, "merge key"),
    ok("yaml-bom-and-crlf", "\ufeff" + dump(BASE).replace("\n", "\r\n")),
    ok("yaml-anchor-and-merge", spec_text("  hyperparameters:\n", "  hyperparameters:\n    <<: {seed: 3}\n")),
    # --- types as the API server applies them -------------------------------------------------------------
    Case(
        "quoted-integer",
        job(hp("batchSize", "8")),
        "spec.hyperparameters.batchSize",
        'must be of type integer, not string "8"',
    ),
    Case(
        "quoted-boolean",
        job(put("spec.suspend", "true")),
        "spec.suspend",
        'must be of type boolean, not string "true"',
    ),
    Case("integer-for-boolean", job(put("spec.suspend", 1)), "spec.suspend", "must be of type boolean"),
    Case(
        "quoted-float",
        job(hp("learningRate", "1e-4")),
        "spec.hyperparameters.learningRate",
        "must be of type number",
    ),
    Case(
        "fractional-integer",
        job(hp("batchSize", 8.5)),
        "spec.hyperparameters.batchSize",
        "must be of type integer",
    ),
    Case(
        "integer-above-int64",
        spec_text("    maxSteps: 10\n", "    maxSteps: 9223372036854775808\n"),
        "spec.hyperparameters.maxSteps",
        "must be of type integer",
    ),
    Case(
        "integer-above-uint64",
        spec_text("    maxSteps: 10\n", "    maxSteps: 99999999999999999999999\n"),
        "spec.hyperparameters.maxSteps",
        "must be of type integer",
    ),
    Case(
        "float-overflow-is-a-string",
        spec_text("    learningRate: 0.001\n", "    learningRate: 1e400\n"),
        "spec.hyperparameters.learningRate",
        'not string "1e400"',
    ),
    Case(
        "seed-above-uint32",
        job(hp("seed", 2**32)),
        "spec.hyperparameters.seed",
        "less than or equal to 4294967295",
    ),
    Case("enum-wrong-case", job(put("spec.method", "SFT")), "spec.method", 'Unsupported value: "SFT"'),
    Case("enum-as-list", job(put("spec.method", ["sft"])), "spec.method", "must be of type string"),
    Case(
        "object-as-string",
        job(put("spec.baseModel", "whetstone://tiny")),
        "spec.baseModel",
        "must be of type object",
    ),
    Case(
        "object-as-list",
        job(put("spec.hyperparameters", [])),
        "spec.hyperparameters",
        "must be of type object",
    ),
    Case(
        "list-as-object",
        job(put("spec.tolerations", {"key": "a"})),
        "spec.tolerations",
        "must be of type array",
    ),
    Case("null-required", job(put("spec.method", None)), "spec.method", "Required value"),
    Case(
        "timestamp-is-a-string",
        spec_text("    maxSteps: 10\n", "    maxSteps: 2024-01-01\n"),
        "spec.hyperparameters.maxSteps",
        'not string "2024-01-01"',
    ),
    Case(
        "sexagesimal-is-a-string",
        spec_text("    maxSteps: 10\n", "    maxSteps: 1:30\n"),
        "spec.hyperparameters.maxSteps",
        'not string "1:30"',
    ),
    ok("exponent-without-dot", spec_text("    learningRate: 0.001\n", "    learningRate: 1e-4\n")),
    ok("whole-float-for-integer", spec_text("    batchSize: 8\n", "    batchSize: 8.0\n")),
    ok("yes-for-boolean", spec_text("  fullParameter: {}\n", "  fullParameter: {}\n  suspend: yes\n")),
    ok("hex-integer", spec_text("    maxSteps: 10\n", "    maxSteps: 0x10\n")),
    ok("null-optional", job(put("spec.lora", None))),
    ok("label-smoothing-zero", job(method("dpo", {"labelSmoothing": 0.0}))),
    # --- unknown fields, with a did-you-mean ----------------------------------------------------------------
    Case(
        "unknown-field-lowercase",
        job(hp("learningrate", 0.1)),
        "spec.hyperparameters.learningrate",
        "did you mean learningRate?",
    ),
    Case(
        "unknown-field-snake-case",
        job(hp("learning_rate", 0.1)),
        "spec.hyperparameters.learning_rate",
        "did you mean learningRate?",
    ),
    Case(
        "unknown-field-typo",
        job(hp("lerningRate", 0.1)),
        "spec.hyperparameters.lerningRate",
        "did you mean learningRate?",
    ),
    Case(
        "unknown-field-wrong-level", job(put("spec.learningRate", 0.1)), "spec.learningRate", "unknown field"
    ),
    Case("unknown-field-capitalised", job(put("spec.Nodes", 2)), "spec.Nodes", "did you mean nodes?"),
    Case(
        "unknown-section-case",
        job(drop("spec.fullParameter"), put("spec.fullparameter", {})),
        "spec.fullparameter",
        "did you mean fullParameter?",
    ),
    Case(
        "unknown-metadata-field",
        job(put("metadata.lables", {"a": "b"})),
        "metadata.lables",
        "did you mean labels?",
    ),
    Case("unknown-top-level-field", job(put("specs", {})), "specs", "did you mean spec?"),
    Case("unknown-lora-field", job(lora(Rank=8)), "spec.lora.Rank", "did you mean rank?"),
    Case(
        "unknown-toleration-field",
        job(tolerate(key="a", Effect="NoSchedule")),
        "spec.tolerations[0].Effect",
        "did you mean effect?",
    ),
    Case(
        "unknown-volume-field",
        job(put("spec.volumes", [{"name": "d", "mountpath": "/d", "emptyDir": {}}])),
        "spec.volumes[0].mountpath",
        "did you mean mountPath?",
    ),
    Case(
        "unknown-affinity-field",
        job(put("spec.affinity", {"nodeAfinity": {}})),
        "spec.affinity.nodeAfinity",
        "did you mean nodeAffinity?",
    ),
    # --- kind and apiVersion -----------------------------------------------------------------------------
    Case("unknown-kind", job(put("kind", "FineTuningJob")), "kind", "did you mean FineTuneJob?"),
    Case(
        "wrong-api-version",
        job(put("apiVersion", "whetstone.dev/v1")),
        "apiVersion",
        "expected whetstone.dev/v1alpha1",
    ),
    Case("missing-spec", job(drop("spec")), "spec", "Required value"),
    # --- names --------------------------------------------------------------------------------------------
    Case("name-uppercase", job(put("metadata.name", "My-Job")), "metadata.name", "should match"),
    Case("name-underscore", job(put("metadata.name", "my_job")), "metadata.name", "should match"),
    Case(
        "name-with-dot",
        job(put("metadata.name", "two.labels")),
        "metadata.name",
        "DNS label starting with a letter",
    ),
    Case(
        "name-leading-digit",
        job(put("metadata.name", "1job")),
        "metadata.name",
        "DNS label starting with a letter",
    ),
    Case("name-64-chars", job(put("metadata.name", "n" * 64)), "metadata.name", "too long for spec.nodes"),
    Case(
        "name-57-chars-one-node",
        job(put("metadata.name", "n" * 57)),
        "metadata.name",
        "at most 56 with 1 node(s)",
    ),
    Case(
        "name-56-chars-eleven-nodes",
        job(put("metadata.name", "n" * 56), put("spec.nodes", 11)),
        "metadata.name",
        "at most 55 with 11 node(s)",
    ),
    Case(
        "name-54-chars-max-nodes",
        job(put("metadata.name", "n" * 54), put("spec.nodes", 1024)),
        "metadata.name",
        "at most 53 with 1024 node(s)",
    ),
    ok("name-53-chars-max-nodes", job(put("metadata.name", NAME_53), put("spec.nodes", 1024))),
    ok("name-56-chars-one-node", job(put("metadata.name", "n" * 56))),
    Case("namespace-invalid", job(put("metadata.namespace", "My_NS")), "metadata.namespace", "should match"),
    Case("namespace-too-long", job(put("metadata.namespace", "n" * 64)), "metadata.namespace", "Too long"),
    Case(
        "label-value-too-long",
        job(put("metadata.labels", {"team": "v" * 64})),
        "metadata.labels",
        "longer than 63",
    ),
    Case(
        "label-value-space",
        job(put("metadata.labels", {"team": "a b"})),
        "metadata.labels",
        "label value of team",
    ),
    Case(
        "label-key-two-slashes", job(put("metadata.labels", {"a/b/c": "x"})), "metadata.labels", "label key"
    ),
    Case(
        "label-key-uppercase-prefix",
        job(put("metadata.labels", {"Example.com/a": "x"})),
        "metadata.labels",
        "must be a DNS subdomain",
    ),
    Case(
        "label-value-number",
        job(put("metadata.labels", {"version": 2})),
        "metadata.labels.version",
        "must be of type string",
    ),
    Case(
        "annotation-key-invalid",
        job(put("metadata.annotations", {"not a key": "x"})),
        "metadata.annotations",
        "annotation key",
    ),
    Case(
        "annotations-too-large",
        job(put("metadata.annotations", {"big": "x" * (257 * 1024)})),
        "metadata.annotations",
        "more than the 262144",
    ),
    # --- the job's own rules (CEL on the server, RULES here) ------------------------------------------------
    Case(
        "lora-and-full-parameter",
        job(put("spec.lora", {"rank": 8})),
        "spec",
        "exactly one of spec.lora or spec.fullParameter",
    ),
    Case(
        "neither-lora-nor-full",
        job(drop("spec.fullParameter")),
        "spec",
        "exactly one of spec.lora or spec.fullParameter",
    ),
    Case("dpo-without-section", job(method("dpo")), "spec.dpo", "spec.dpo is required when method is dpo"),
    Case("rft-without-section", job(method("rft")), "spec.rft", "spec.rft is required when method is rft"),
    Case(
        "sft-section-on-dpo",
        job(method("dpo", {}), put("spec.sft", {})),
        "spec.sft",
        "only allowed when method is sft",
    ),
    Case("rft-no-graders", job(method("rft", {"graders": []})), "spec.rft.graders", "at least 1"),
    Case(
        "dapo-with-kl",
        job(method("rft", {"algorithm": "dapo", "klBeta": 0.1, "graders": [{"name": "g"}]})),
        "spec.rft.klBeta",
        "klBeta must be 0 unless algorithm is grpo",
    ),
    Case(
        "accumulation-not-dividing",
        job(hp("gradientAccumulationSteps", 3)),
        "spec.hyperparameters.gradientAccumulationSteps",
        "must divide batchSize",
    ),
    Case(
        "label-smoothing-half",
        job(method("dpo", {"labelSmoothing": 0.5})),
        "spec.dpo.labelSmoothing",
        "less than 0.5",
    ),
    Case("dpo-beta-zero", job(method("dpo", {"beta": 0})), "spec.dpo.beta", "greater than 0"),
    Case(
        "dpo-loss-type",
        job(method("dpo", {"lossType": "kto"})),
        "spec.dpo.lossType",
        'Unsupported value: "kto"',
    ),
    Case(
        "rft-samples-one",
        job(method("rft", {"graders": [{"name": "g"}], "samplesPerPrompt": 1})),
        "spec.rft.samplesPerPrompt",
        "greater than or equal to 2",
    ),
    Case(
        "rft-temperature-zero",
        job(method("rft", {"graders": [{"name": "g"}], "temperature": 0})),
        "spec.rft.temperature",
        "greater than 0",
    ),
    Case(
        "rft-clip-low-one",
        job(method("rft", {"graders": [{"name": "g"}], "clipLow": 1.0})),
        "spec.rft.clipLow",
        "less than 1",
    ),
    Case(
        "zero-learning-rate",
        job(hp("learningRate", 0)),
        "spec.hyperparameters.learningRate",
        "greater than 0",
    ),
    Case(
        "negative-learning-rate",
        job(hp("learningRate", -0.1)),
        "spec.hyperparameters.learningRate",
        "greater than 0",
    ),
    Case("zero-epochs-as-float", job(hp("epochs", 0.0)), "spec.hyperparameters.epochs", "greater than 0"),
    Case(
        "zero-batch", job(hp("batchSize", 0)), "spec.hyperparameters.batchSize", "greater than or equal to 1"
    ),
    Case(
        "tiny-max-seq-len",
        job(hp("maxSeqLen", 4)),
        "spec.hyperparameters.maxSeqLen",
        "greater than or equal to 8",
    ),
    Case("lora-rank-zero", job(lora(rank=0)), "spec.lora.rank", "greater than or equal to 1"),
    Case("lora-dropout-one", job(lora(dropout=1.0)), "spec.lora.dropout", "less than 1"),
    Case("zero-nodes", job(put("spec.nodes", 0)), "spec.nodes", "greater than or equal to 1"),
    Case("too-many-nodes", job(put("spec.nodes", 1025)), "spec.nodes", "less than or equal to 1024"),
    Case("negative-gpus", job(put("spec.gpusPerNode", -1)), "spec.gpusPerNode", "greater than or equal to 0"),
    Case(
        "negative-backoff",
        job(put("spec.backoffLimit", -1)),
        "spec.backoffLimit",
        "greater than or equal to 0",
    ),
    Case(
        "zero-deadline",
        job(put("spec.activeDeadlineSeconds", 0)),
        "spec.activeDeadlineSeconds",
        "greater than or equal to 1",
    ),
    Case(
        "keep-last-zero",
        job(put("spec.checkpointing.keepLast", 0)),
        "spec.checkpointing.keepLast",
        "greater than or equal to 1",
    ),
    # --- URIs the operator mounts ---------------------------------------------------------------------------
    Case(
        "pvc-claim-invalid",
        job(put("spec.dataset.uri", "pvc://Bad_Claim/x.jsonl")),
        "spec.dataset.uri",
        "must name a claim",
    ),
    Case(
        "pvc-claim-missing",
        job(put("spec.output.uri", "pvc:///runs")),
        "spec.output.uri",
        "must name a claim",
    ),
    Case(
        "pvc-path-escapes",
        job(put("spec.dataset.uri", "pvc://data/../etc/passwd")),
        "spec.dataset.uri",
        "must not leave it",
    ),
    ok("pvc-claim-with-dots", job(put("spec.dataset.uri", "pvc://data.v2/train.jsonl"))),
    Case("empty-uri", job(put("spec.dataset.uri", "")), "spec.dataset.uri", "at least 1 chars"),
    # --- tolerations (pod validation) -----------------------------------------------------------------------
    Case(
        "toleration-exists-with-value",
        job(tolerate(key="gpu", operator="Exists", value="x")),
        "spec.tolerations[0].value",
        "must be empty when operator is Exists",
    ),
    Case(
        "toleration-no-key-equal",
        job(tolerate(operator="Equal", value="x")),
        "spec.tolerations[0].operator",
        "must be Exists when key is empty",
    ),
    Case(
        "toleration-seconds-no-execute",
        job(tolerate(key="gpu", effect="NoSchedule", tolerationSeconds=30)),
        "spec.tolerations[0].tolerationSeconds",
        "needs effect NoExecute",
    ),
    Case(
        "toleration-key-invalid",
        job(tolerate(key="bad key!", operator="Exists")),
        "spec.tolerations[0].key",
        "qualified name",
    ),
    Case(
        "toleration-value-invalid",
        job(tolerate(key="gpu", value="a b")),
        "spec.tolerations[0].value",
        "label value",
    ),
    Case(
        "toleration-effect",
        job(tolerate(key="gpu", effect="Sometimes")),
        "spec.tolerations[0].effect",
        'Unsupported value: "Sometimes"',
    ),
    Case(
        "toleration-operator",
        job(tolerate(key="gpu", operator="Maybe")),
        "spec.tolerations[0].operator",
        'Unsupported value: "Maybe"',
    ),
    ok("toleration-gpu-taint", job(tolerate(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"))),
    # --- resources (pod validation) -------------------------------------------------------------------------
    Case(
        "quantity-garbage",
        job(resources(requests={"cpu": "lots"})),
        "spec.resources.requests",
        "non-negative quantity",
    ),
    Case(
        "quantity-negative",
        job(resources(limits={"memory": "-1Gi"})),
        "spec.resources.limits",
        "non-negative quantity",
    ),
    Case(
        "quantity-float",
        job(resources(requests={"cpu": 0.5})),
        "spec.resources.requests.cpu",
        "write fractions as strings",
    ),
    Case(
        "quantity-bad-suffix",
        job(resources(requests={"memory": "16GB"})),
        "spec.resources.requests",
        "non-negative quantity",
    ),
    Case(
        "resource-gpu-in-resources",
        job(resources(limits={"nvidia.com/gpu": 1})),
        "spec.resources",
        "set by gpusPerNode",
    ),
    Case(
        "resource-unknown-name",
        job(resources(requests={"gpu": 1})),
        "spec.resources.requests",
        "a resource is cpu, memory",
    ),
    Case(
        "resource-extended-fraction",
        job(resources(requests={"example.com/fpga": "500m"}, limits={"example.com/fpga": "500m"})),
        "spec.resources.requests",
        "whole numbers",
    ),
    Case(
        "resource-request-above-limit",
        job(resources(requests={"cpu": "2"}, limits={"cpu": "1"})),
        "spec.resources.requests",
        "must not exceed its limit",
    ),
    Case(
        "resource-extended-without-limit",
        job(resources(requests={"example.com/fpga": 1})),
        "spec.resources.requests",
        "needs a limit equal",
    ),
    Case(
        "quantity-too-long",
        job(resources(requests={"cpu": "1" * 65})),
        "spec.resources.requests.cpu",
        "Too long",
    ),
    ok(
        "resources-usual",
        job(
            resources(
                requests={"cpu": "500m", "memory": "16Gi", "hugepages-2Mi": "1Gi"},
                limits={"memory": "16Gi", "example.com/fpga": 2},
            )
        ),
    ),
    # --- volumes (pod validation and the operator's own mounts) ---------------------------------------------
    Case(
        "volume-no-source",
        job(put("spec.volumes", [{"name": "d", "mountPath": "/d"}])),
        "spec.volumes[0]",
        "exactly one of persistentVolumeClaim, configMap or emptyDir",
    ),
    Case("volume-two-sources", job(volume(configMap={"name": "c"})), "spec.volumes[0]", "exactly one of"),
    Case(
        "volume-duplicate-name",
        job(
            put(
                "spec.volumes",
                [
                    {"name": "d", "mountPath": "/a", "emptyDir": {}},
                    {"name": "d", "mountPath": "/b", "emptyDir": {}},
                ],
            )
        ),
        "spec.volumes[1]",
        "Duplicate value",
    ),
    Case(
        "volume-duplicate-mount-path",
        job(
            put(
                "spec.volumes",
                [
                    {"name": "a", "mountPath": "/d", "emptyDir": {}},
                    {"name": "b", "mountPath": "/d", "emptyDir": {}},
                ],
            )
        ),
        "spec.volumes",
        "every mountPath must be different",
    ),
    Case(
        "volume-at-config-dir",
        job(volume(mountPath="/etc/whetstone")),
        "spec.volumes[0].mountPath",
        "must not be at, inside or above",
    ),
    Case(
        "volume-inside-config-dir",
        job(volume(mountPath="/etc/whetstone/extra")),
        "spec.volumes[0].mountPath",
        "must not be at, inside or above",
    ),
    Case(
        "volume-inside-pvc-root",
        job(volume(mountPath="/mnt/pvc/data")),
        "spec.volumes[0].mountPath",
        "must not be at, inside or above",
    ),
    Case(
        "volume-above-pvc-root",
        job(volume(mountPath="/mnt")),
        "spec.volumes[0].mountPath",
        "must not be at, inside or above",
    ),
    Case(
        "volume-at-scratch",
        job(volume(mountPath="/var/cache/whetstone")),
        "spec.volumes[0].mountPath",
        "must not be at, inside or above",
    ),
    Case(
        "volume-at-dev-shm",
        job(volume(mountPath="/dev/shm")),
        "spec.volumes[0].mountPath",
        "must not be at, inside or above",
    ),
    Case("volume-relative-path", job(volume(mountPath="data")), "spec.volumes[0].mountPath", "should match"),
    Case(
        "volume-dot-dot",
        job(volume(mountPath="/data/../etc")),
        "spec.volumes[0].mountPath",
        "no '.' or '..' parts",
    ),
    Case(
        "volume-trailing-slash",
        job(volume(mountPath="/data/")),
        "spec.volumes[0].mountPath",
        "no trailing '/'",
    ),
    Case("volume-double-slash", job(volume(mountPath="//data")), "spec.volumes[0].mountPath", "no '//'"),
    Case("volume-name-uppercase", job(volume(name="Data")), "spec.volumes[0].name", "should match"),
    Case("volume-name-too-long", job(volume(name="v" * 59)), "spec.volumes[0].name", "Too long"),
    Case(
        "volume-claim-invalid",
        job(
            put(
                "spec.volumes",
                [{"name": "d", "mountPath": "/d", "persistentVolumeClaim": {"claimName": "Bad_Claim"}}],
            )
        ),
        "spec.volumes[0].persistentVolumeClaim.claimName",
        "should match",
    ),
    Case(
        "volume-configmap-too-long",
        job(put("spec.volumes", [{"name": "d", "mountPath": "/d", "configMap": {"name": "c" * 254}}])),
        "spec.volumes[0].configMap.name",
        "Too long",
    ),
    Case(
        "volume-size-garbage",
        job(volume(emptyDir={"sizeLimit": "lots"})),
        "spec.volumes[0].emptyDir.sizeLimit",
        "non-negative quantity",
    ),
    Case(
        "volume-medium",
        job(volume(emptyDir={"medium": "Disk"})),
        "spec.volumes[0].emptyDir.medium",
        'Unsupported value: "Disk"',
    ),
    ok(
        "volume-named-like-operator-volumes",
        job(
            put(
                "spec.volumes",
                [
                    {"name": "scratch", "mountPath": "/scratch", "emptyDir": {}},
                    {"name": "job-config", "mountPath": "/cfg", "configMap": {"name": "c"}},
                    {
                        "name": "pvc-data",
                        "mountPath": "/data",
                        "persistentVolumeClaim": {"claimName": "data"},
                    },
                ],
            )
        ),
    ),
    # --- image, pull secrets, node selector -----------------------------------------------------------------
    Case("image-with-space", job(put("spec.image", "my image:1")), "spec.image", "should match"),
    Case("image-empty", job(put("spec.image", "")), "spec.image", "at least 1 chars"),
    Case(
        "pull-secret-invalid",
        job(put("spec.imagePullSecrets", [{"name": "Bad_Secret"}])),
        "spec.imagePullSecrets[0].name",
        "should match",
    ),
    Case(
        "pull-secret-duplicate",
        job(put("spec.imagePullSecrets", [{"name": "a"}, {"name": "a"}])),
        "spec.imagePullSecrets[1]",
        "Duplicate value",
    ),
    Case(
        "node-selector-value",
        job(put("spec.nodeSelector", {"pool": "gpu pool"})),
        "spec.nodeSelector.pool",
        "should match",
    ),
    Case(
        "node-selector-key",
        job(put("spec.nodeSelector", {"bad key": "gpu"})),
        "spec.nodeSelector",
        "nodeSelector keys must be label keys",
    ),
    # --- affinity (a typed Affinity, pod validation) --------------------------------------------------------
    Case(
        "affinity-operator",
        job(node_expr(operator="Maybe", values=["a"])),
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator",
        'Unsupported value: "Maybe"',
    ),
    Case(
        "affinity-in-without-values",
        job(node_expr(operator="In")),
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values",
        "must not be empty when operator is In",
    ),
    Case(
        "affinity-exists-with-values",
        job(node_expr(operator="Exists", values=["a"])),
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values",
        "must be empty when operator is Exists",
    ),
    Case(
        "affinity-gt-not-integer",
        job(node_expr(operator="Gt", values=["many"])),
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].values",
        "exactly one integer",
    ),
    Case(
        "affinity-no-terms",
        job(
            put(
                "spec.affinity",
                {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
                    }
                },
            )
        ),
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
        "at least 1",
    ),
    Case(
        "affinity-weight-zero",
        job(
            put(
                "spec.affinity",
                {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "preference": {}}]
                    }
                },
            )
        ),
        "spec.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
        "greater than or equal to 1",
    ),
    Case(
        "affinity-no-topology-key",
        job(
            put(
                "spec.affinity",
                {
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]
                    }
                },
            )
        ),
        "spec.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
        "Required value",
    ),
    Case(
        "affinity-label-value",
        job(
            put(
                "spec.affinity",
                {
                    "podAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {"topologyKey": "zone", "labelSelector": {"matchLabels": {"app": "a b"}}}
                        ]
                    }
                },
            )
        ),
        "spec.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].labelSelector.matchLabels.app",
        "should match",
    ),
    Case(
        "affinity-match-fields-key",
        job(
            put(
                "spec.affinity",
                {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchFields": [
                                        {"key": "metadata.labels", "operator": "In", "values": ["a"]}
                                    ]
                                }
                            ]
                        }
                    }
                },
            )
        ),
        "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchFields[0].key",
        'Unsupported value: "metadata.labels"',
    ),
    Case("affinity-as-string", job(put("spec.affinity", "gpu")), "spec.affinity", "must be of type object"),
    ok("affinity-usual", job(put("spec.affinity", AFFINITY_OK))),
    # --- the other kinds ----------------------------------------------------------------------------------
    Case(
        "rewardgrader-two-types",
        dump(
            {
                "apiVersion": "whetstone.dev/v1alpha1",
                "kind": "RewardGrader",
                "metadata": {"name": "g"},
                "spec": {"stringCheck": {"reference": "a"}, "regex": {"pattern": "a"}},
            }
        ),
        "spec",
        "exactly one grader type",
    ),
    Case(
        "checkpoint-negative-step",
        dump(
            {
                "apiVersion": "whetstone.dev/v1alpha1",
                "kind": "Checkpoint",
                "metadata": {"name": "c-step-1"},
                "spec": {"source": {"kind": "FineTuneJob", "name": "j"}, "step": -1, "uri": "pvc://runs/j"},
            }
        ),
        "spec.step",
        "greater than or equal to 0",
    ),
    Case(
        "trainingsession-name-with-dot",
        dump(
            {
                "apiVersion": "whetstone.dev/v1alpha1",
                "kind": "TrainingSession",
                "metadata": {"name": "a.b"},
                "spec": {"baseModel": {"uri": "whetstone://tiny"}},
            }
        ),
        "metadata.name",
        "must be a DNS label",
    ),
    Case(
        "second-document-broken",
        dump(BASE)
        + "---\n"
        + dump(
            {
                "apiVersion": "whetstone.dev/v1alpha1",
                "kind": "RewardGrader",
                "metadata": {"name": "g"},
                "spec": {},
            }
        ),
        "spec",
        "exactly one grader type",
    ),
    ok(
        "checkpoint-name-longer-than-a-label",
        dump(
            {
                "apiVersion": "whetstone.dev/v1alpha1",
                "kind": "Checkpoint",
                "metadata": {"name": NAME_53 + "-step-00000200"},
                "spec": {
                    "source": {"kind": "FineTuneJob", "name": NAME_53},
                    "step": 200,
                    "uri": "pvc://runs/j",
                },
            }
        ),
    ),
]
