"""FineTuneJob: one SFT, DPO or RFT run of a base model on a dataset.

The same models validate a manifest in `whetstone validate`, generate the CRD's OpenAPI schema, and configure
the trainer, so a job the API server accepts is a job the trainer understands.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator

from . import k8s
from .affinity import Affinity
from .base import (
    GROUP_VERSION,
    LABEL_MAP_CEL,
    ApiModel,
    Condition,
    LocalObjectReference,
    ObjectMeta,
    Quantity,
    ResourceRequirements,
    Rule,
    Toleration,
    cel_string_list,
    inline_schema,
    label_map_problem,
)
from .reasons import JobPhase
from .uris import CLAIM_NAME, URIError, parse_uri
from .wire import CONFIG_DIR, PVC_ROOT, SCRATCH_DIR

KIND = "FineTuneJob"

Method = Literal["sft", "dpo", "rft"]

MAX_NODES = 1024
MAX_STEPS = 10**9
"""Upper bound of step counts (steps, warm-up, intervals): far beyond any run, inside every integer type."""


def pod_name(job: str, rank: int) -> str:
    """The trainer pod of rank `rank` (the operator's rendezvous.pod_name; a test checks they agree)."""
    return f"{job}-node-{rank}"


def max_job_name_length(nodes: int) -> int:
    """Longest job name whose pods `<name>-node-<rank>` are all DNS labels."""
    return k8s.DNS_LABEL_MAX - len(pod_name("", nodes - 1))


_POD_SUFFIX = pod_name("", 0).removesuffix("0")


def _name_budget_cel() -> str:
    """max_job_name_length(self.spec.nodes) in CEL, as arithmetic (string(int) is costly for the server)."""
    expr = str(max_job_name_length(1))
    for digits in range(2, len(str(MAX_NODES - 1)) + 1):
        expr = (
            f"self.spec.nodes > {10 ** (digits - 1)} ? {max_job_name_length(10 ** (digits - 1) + 1)} : {expr}"
        )
    return f"({expr})"


def _claim_ok(uri: str) -> bool:
    """A pvc:// URI names a valid claim and stays inside it (the operator mounts the claim)."""
    if not uri.strip().lower().startswith("pvc://"):
        return True
    try:
        parse_uri(uri)
    except URIError:
        return False
    return True


def _pvc_rules(field: str) -> tuple[Rule, ...]:
    claim = CLAIM_NAME.pattern.removeprefix("^").removesuffix("$")
    pvc = f"self.{field}.lowerAscii().startsWith('pvc://')"
    return (
        Rule(
            f"!{pvc} || (self.{field}.matches('^[pP][vV][cC]://{claim}(/.*)?$') && "
            f"!self.{field}.matches('^[^/]*//[^/]*/(.*/)?[.][.](/.*)?$'))",
            "a pvc:// URI must name a claim (lower-case letters, digits, '-' and '.') and must not leave it "
            "with '..': pvc://CLAIM/PATH",
            lambda m: _claim_ok(getattr(m, field)),
            field=field,
        ),
    )


class ModelSpec(ApiModel):
    """Where the base model comes from."""

    RULES = _pvc_rules("uri")

    uri: str = Field(min_length=1, max_length=4096)
    """The model: a local Hugging Face folder (a path, relative to the manifest, or file://), a .gguf file,
    whetstone://tiny (a bundled tiny model; also tiny-10m, tiny-50m) or whetstone://smollm2, and in a
    cluster pvc://<claim>/<path>, hf://<org>/<name> or s3://<bucket>/<key>."""
    revision: str | None = Field(default=None, max_length=256)
    """For hf:// models: the branch, tag or commit to use."""


class DatasetSpec(ApiModel):
    """A JSONL dataset: one example per line."""

    RULES = _pvc_rules("uri")

    uri: str = Field(min_length=1, max_length=4096)
    """The JSONL file: a path (relative to the manifest), file://, pvc://<claim>/<path> or s3://<bucket>/<key>.
    SFT reads chat rows ({"messages": [...]}), DPO preference rows, RFT prompt rows."""
    max_examples: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Use only the first N examples (for quick trials)."""


class SFTSpec(ApiModel):
    """Supervised fine-tuning: next-token cross-entropy on the assistant turns."""

    packing: bool = True
    """Pack several examples into one sequence (attention never crosses examples). Saves the padding."""
    train_on_all_turns: bool = False
    """Also compute the loss on system, user and tool turns. Off: assistant turns only (per-message weight
    0/1 can switch single assistant turns off)."""


class DPOSpec(ApiModel):
    """Direct preference optimisation on preference rows: {input: {messages}, preferred_output: [message],
    non_preferred_output: [message]} (OpenAI) or {prompt, chosen, rejected} (TRL; message lists or text).
    hyperparameters.batchSize counts pairs. The reference is the frozen base model: with lora the same model
    with its adapters disabled, with fullParameter log-probs computed once before training."""

    RULES = (
        Rule(
            "!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || !has(self.lossType) || "
            "self.lossType == 'sigmoid' || self.lossType == 'robust'",
            "labelSmoothing is only used by lossType sigmoid and robust",
            lambda d: d.label_smoothing == 0 or d.loss_type in ("sigmoid", "robust"),
            field="labelSmoothing",
        ),
    )

    beta: float = Field(default=0.1, gt=0, le=10)
    """Strength of the KL constraint to the reference model (the implicit reward is beta × the log-ratio);
    IPO's tau. Typical 0.05 to 0.5."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """The preference loss: sigmoid (DPO, arXiv:2305.18290), ipo (arXiv:2310.12036; per-token mean
    log-probs), hinge (SLiC, arXiv:2305.10425) or robust (noise-robust DPO, arXiv:2403.00409)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """Assumed share of flipped preference labels, in [0, 0.5): conservative DPO with sigmoid, robust DPO
    with robust."""
    rpo_alpha: float | None = Field(default=None, ge=0)
    """Weight of an extra NLL term on the preferred answer (RPO, arXiv:2404.19733): the loss adds
    rpoAlpha × the chosen answer's mean token NLL. Unset: none."""


class GraderRef(ApiModel):
    """A RewardGrader used by an RFT job, with its weight in the total reward."""

    name: str = Field(min_length=1, max_length=253)
    """Name of a RewardGrader in the job's namespace."""
    weight: float = Field(default=1.0, ge=0)
    """Weight of this grader's score in the weighted sum."""


RFTAlgorithm = Literal["grpo", "dapo", "gspo-token"]
RFT_DEFAULT_CLIP: dict[str, tuple[float, float]] = {
    "grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "gspo-token": (3e-4, 4e-4),
}
"""(clipLow, clipHigh) of each algorithm when unset: PPO's 0.2, DAPO's clip-higher, GSPO's tiny range."""


class RFTSpec(ApiModel):
    """Reinforcement fine-tuning: every step samples samplesPerPrompt answers to hyperparameters.batchSize
    prompts from the current weights, grades them with the RewardGraders, and updates with a clipped
    policy-gradient loss on group-normalised advantages (reward minus the group's mean, over its standard
    deviation). Rows: {messages: [..., user message], ...fields the graders read as item.<field>}."""

    RULES = (
        Rule(
            "self.algorithm == 'grpo' || !has(self.klBeta) || self.klBeta == 0.0",
            "klBeta must be 0 unless algorithm is grpo (dapo and gspo-token use no KL term)",
            lambda r: r.algorithm == "grpo" or r.kl_beta == 0,
            field="klBeta",
        ),
        Rule(
            "!has(self.overlongBufferTokens) || !has(self.maxCompletionTokens) || "
            "self.overlongBufferTokens < self.maxCompletionTokens",
            "overlongBufferTokens must be smaller than maxCompletionTokens",
            lambda r: r.overlong_buffer_tokens is None or r.overlong_buffer_tokens < r.max_completion_tokens,
            field="overlongBufferTokens",
        ),
    )

    algorithm: RFTAlgorithm = "grpo"
    """The policy loss. grpo (arXiv:2402.03300): PPO clip 0.2/0.2, optional k3 KL to the frozen reference,
    sample-level aggregation. dapo (arXiv:2503.14476): clip-higher 0.2/0.28, token-level aggregation,
    overlong filtering and soft overlong punishment, zero-variance groups refilled, no KL. gspo-token
    (arXiv:2507.18071): the length-normalised sequence ratio on every token, clip 3e-4/4e-4, no KL."""
    graders: list[GraderRef] = Field(min_length=1, max_length=16)
    """The RewardGraders whose weighted sum is the reward."""
    samples_per_prompt: int = Field(default=8, ge=2, le=256)
    """Answers sampled per prompt (the group size G)."""
    temperature: float = Field(default=1.0, gt=0, le=4)
    """Sampling temperature of the rollouts; the trainer's log-probs use the same temperature."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts (1: off). Applied after topK."""
    top_k: int = Field(default=0, ge=0, le=100000)
    """Sample only among the k most likely tokens (0: off)."""
    max_completion_tokens: int = Field(default=256, ge=1, le=131072)
    """Longest answer sampled; a longer one is cut and counts as truncated."""
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=16
    )
    """Stop strings: an answer ends with the first one it produces (kept in the answer). The model's
    end-of-turn token always stops."""
    kl_beta: float = Field(default=0.0, ge=0)
    """Weight of the k3 KL penalty to the frozen reference, per token inside the loss (grpo only; 0: none,
    and no reference is computed). With lora the reference is the model with adapters disabled; with
    fullParameter a frozen copy of the base model is kept."""
    clip_low: float | None = Field(default=None, gt=0, lt=1)
    """Lower clip epsilon: the ratio is clipped below at 1 - clipLow. Unset: 0.2 (grpo, dapo), 3e-4
    (gspo-token)."""
    clip_high: float | None = Field(default=None, gt=0)
    """Upper clip epsilon: the ratio is clipped above at 1 + clipHigh. Unset: 0.2 (grpo), 0.28 (dapo), 4e-4
    (gspo-token)."""
    aggregation: Literal["token-mean", "seq-mean-token-mean"] | None = None
    """How per-token terms become the loss: token-mean (every completion token of the step weighs the same)
    or seq-mean-token-mean (each answer's token mean, then the mean over answers). Unset: token-mean for
    dapo, seq-mean-token-mean for grpo and gspo-token."""
    advantage_scale: Literal["group", "none"] = "group"
    """Divide each group's centred rewards by the group's standard deviation (group), or not (none, as Dr.
    GRPO)."""
    update_epochs: int = Field(default=1, ge=1, le=64)
    """Passes over each rollout batch (TRL num_iterations, verl ppo_epochs)."""
    mini_batches: int = Field(default=1, ge=1, le=1024)
    """Optimizer steps per pass: the rollout batch's groups are split into this many mini-batches. With
    more than one step per batch the ratio to the log-probs recomputed before the first update moves and
    the clip matters."""
    zero_variance_groups: Literal["keep", "drop", "refill"] | None = None
    """Groups whose samples all got the same reward have zero advantages: keep them, drop them, or drop
    them and sample more prompts until batchSize groups are left (at most maxRefillRounds more rounds).
    Judged on the graders' reward, before overlong shaping. Unset: refill for dapo, keep otherwise."""
    max_refill_rounds: int = Field(default=4, ge=0, le=64)
    """Extra sampling rounds a step may take to refill its batch."""
    overlong_filtering: bool | None = None
    """Leave answers cut at maxCompletionTokens out of the loss (DAPO). Unset: on for dapo."""
    overlong_buffer_tokens: int | None = Field(default=None, ge=0)
    """DAPO's soft overlong punishment: the reward falls linearly from 0 to -1 over the last this many tokens
    before maxCompletionTokens (0: off). Unset: a fifth of maxCompletionTokens for dapo, 0 otherwise."""
    pass_threshold: float = 1.0
    """A sample passes (pass_rate) when its total reward reaches this."""
    eval_temperature: float = Field(default=0.0, ge=0, le=4)
    """Temperature of the one answer per held-out prompt behind eval_reward_mean (0: greedy)."""
    rollout_log_samples: int = Field(default=4, ge=0, le=1024)
    """Samples per step written to rollouts.jsonl (prompt, answer, reward, every grader's score and
    message)."""
    grader_workers: int = Field(default=2, ge=1, le=64)
    """Sandbox worker processes of each python grader."""

    @property
    def clip_range(self) -> tuple[float, float]:
        """(clipLow, clipHigh) epsilons with the algorithm's defaults filled in."""
        low, high = RFT_DEFAULT_CLIP[self.algorithm]
        return (
            self.clip_low if self.clip_low is not None else low,
            self.clip_high if self.clip_high is not None else high,
        )

    @property
    def aggregation_mode(self) -> str:
        return self.aggregation or ("token-mean" if self.algorithm == "dapo" else "seq-mean-token-mean")

    @property
    def zero_variance_mode(self) -> str:
        return self.zero_variance_groups or ("refill" if self.algorithm == "dapo" else "keep")

    @property
    def filters_overlong(self) -> bool:
        return self.overlong_filtering if self.overlong_filtering is not None else self.algorithm == "dapo"

    @property
    def overlong_buffer(self) -> int:
        if self.overlong_buffer_tokens is not None:
            return self.overlong_buffer_tokens
        return self.max_completion_tokens // 5 if self.algorithm == "dapo" else 0


class LoRASpec(ApiModel):
    """Train low-rank adapters instead of all weights."""

    rank: int = Field(default=8, ge=1, le=1024)
    """Rank r of the adapters."""
    alpha: float = Field(default=16, gt=0)
    """Scaling numerator: the update is scaled by alpha / rank."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1, max_length=64)
    """Module names to adapt, e.g. [q_proj, v_proj]; all-linear adapts every linear layer but the output
    head."""


class FullParameterSpec(ApiModel):
    """Train every weight of the model (no adapters)."""

    freeze_embeddings: bool = False
    """Keep the token embeddings (and a tied output head) frozen."""


class Hyperparameters(ApiModel):
    """The optimisation settings."""

    RULES = (
        Rule(
            # has(): the API server checks the default {} against this rule before defaulting.
            "!has(self.batchSize) || !has(self.gradientAccumulationSteps) || "
            "self.batchSize % self.gradientAccumulationSteps == 0",
            "gradientAccumulationSteps must divide batchSize",
            lambda h: h.batch_size % h.gradient_accumulation_steps == 0,
            field="gradientAccumulationSteps",
            detail=lambda h: f"{h.gradient_accumulation_steps} does not divide {h.batch_size}",
        ),
    )

    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the dataset (fractions allowed). Default 1 when maxSteps is unset."""
    max_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Optimizer steps to run; overrides epochs."""
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    """Peak learning rate of AdamW."""
    batch_size: int = Field(default=8, ge=1, le=65536)
    """Sequences (packed rows when packing) per optimizer step, over all nodes and GPUs."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    """Micro-batches per optimizer step; batchSize is split into this many parts."""
    max_seq_len: int = Field(default=1024, ge=8, le=1048576)
    """Longest tokenised example (and packed row). Longer examples are rejected in validation, not cut."""
    warmup_steps: int = Field(default=0, ge=0, le=MAX_STEPS)
    """Steps of linear warm-up from 0 to learningRate."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up: constant, linear to 0, or cosine to minLearningRateRatio."""
    min_learning_rate_ratio: float = Field(default=0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping by global norm; 0 disables it."""
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    """Seed of the data order, dropout and initialisation; the same seed gives the same run."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: auto is bf16 on GPU and fp32 on CPU."""
    gradient_checkpointing: bool | None = None
    """Activation (gradient) checkpointing: keep only each transformer layer's input in the forward and
    recompute the rest in the backward, so activation memory grows with layers × tokens × hidden size instead
    of with everything a layer computes (about a third more compute). Unset: on with lora, where activations
    dominate memory, off with fullParameter, where weights, gradients and optimizer state do."""
    host_memory: Literal["trim", "reuse", "release"] = "trim"
    """Training on the CPU, what happens to host memory the step frees (glibc's heap fragments: a long-context
    step leaves holes the next layers cannot reuse). trim (default): after any decoder layer, once resident
    memory has grown by more than a budget (512 MiB) since the last trim, the heap's free pages go back to
    the operating system, so the holes stay bounded at a small cost in step time; a small model never
    trims, and up to 128 MiB freed at the top of the heap stays for the next step instead of being faulted
    in again. reuse leaves glibc's malloc as it is (the highest peak on long contexts). release gives every
    large tensor's memory back the moment it is freed, the lowest peak (a third of TRL's on a 135M model
    over 2 x 1000 tokens) at the price of a page fault each time a large tensor is allocated (steps 1.2-2x
    slower). No effect on a GPU."""
    eval_every_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Compute the eval loss every N steps (and at the end); unset: at each checkpoint and at the end."""
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Share of the training set held out for eval when evalDataset is unset (0: no eval)."""

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.gradient_accumulation_steps


class CheckpointingSpec(ApiModel):
    """When checkpoints are written and how many are kept."""

    every_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Save a resumable checkpoint every N optimizer steps; unset: only at the end."""
    keep_last: int = Field(default=3, ge=1, le=1000)
    """Resumable checkpoints kept; older ones are pruned (the final output is always kept)."""


class OutputSpec(ApiModel):
    """Where the result goes."""

    RULES = _pvc_rules("uri")

    uri: str = Field(min_length=1, max_length=4096)
    """Folder for checkpoints, the final adapter or model, and metrics.jsonl: a path (relative to the
    manifest), file://, pvc://<claim>/<path> or s3://<bucket>/<prefix>."""


class ClaimVolumeSource(ApiModel):
    """A PersistentVolumeClaim in the job's namespace."""

    claim_name: str = Field(min_length=1, max_length=k8s.DNS_SUBDOMAIN_MAX, pattern=k8s.DNS_SUBDOMAIN)
    """Name of the claim."""


class ConfigMapVolumeSource(ApiModel):
    """A ConfigMap in the job's namespace, its keys as files."""

    name: str = Field(min_length=1, max_length=k8s.DNS_SUBDOMAIN_MAX, pattern=k8s.DNS_SUBDOMAIN)
    """Name of the ConfigMap."""


class EmptyDirVolumeSource(ApiModel):
    """A scratch folder that lives as long as the pod (lost on a group restart)."""

    RULES = (
        Rule(
            "!has(self.sizeLimit) || (isQuantity(string(self.sizeLimit)) && "
            "!quantity(string(self.sizeLimit)).isLessThan(quantity('0')))",
            "sizeLimit must be a non-negative quantity, e.g. 20Gi",
            lambda e: e.size_limit is None or k8s.parse_quantity(e.size_limit) >= 0,
            field="sizeLimit",
        ),
    )

    medium: Literal["", "Memory"] | None = None
    """Empty: the node's disk; Memory: a tmpfs."""
    size_limit: Quantity | None = None
    """Largest size the folder may grow to, e.g. 20Gi."""


USER_VOLUME_PREFIX = "user-"
"""The operator names a user's volume user-<name> in the pod, apart from its own (job-config, scratch, and
pvc-* for the claims of pvc:// URIs); tests/test_manifests.py checks the pods of accepted jobs on the real
builder."""
RESERVED_MOUNT_PATHS = (CONFIG_DIR, SCRATCH_DIR, PVC_ROOT, "/dev/shm")
"""Where the operator mounts the job's config, the scratch folder and the claims, and /dev/shm: no user
volume may be mounted at, inside or above one of them."""
_VOLUME_NAME_MAX = k8s.DNS_LABEL_MAX - len(USER_VOLUME_PREFIX)


def _mount_path_clear(path: str) -> bool:
    return not any(
        path == r or path.startswith(r + "/") or r.startswith(path + "/") for r in RESERVED_MOUNT_PATHS
    )


def _normal_path(path: str) -> bool:
    parts = path.split("/")
    return path.startswith("/") and all(p not in ("", ".", "..") for p in parts[1:])


class TrainerVolume(ApiModel):
    """An extra volume mounted into every trainer pod. Claims named by pvc:// URIs in the spec are mounted
    at $WHETSTONE_PVC_ROOT/<claim> without being listed here."""

    LIST_MAP_KEYS = ("name",)
    RULES = (
        Rule(
            "[has(self.persistentVolumeClaim), has(self.configMap), has(self.emptyDir)]"
            ".filter(x, x).size() == 1",
            "exactly one of persistentVolumeClaim, configMap or emptyDir must be set",
            lambda v: sum(s is not None for s in (v.persistent_volume_claim, v.config_map, v.empty_dir)) == 1,
        ),
        Rule(
            "!self.mountPath.matches('/[.][.]?(/|$)') && !self.mountPath.contains('//') && "
            "!self.mountPath.endsWith('/')",
            "mountPath must be a plain absolute path: no '.' or '..' parts, no '//', no trailing '/'",
            lambda v: _normal_path(v.mount_path),
            field="mountPath",
        ),
        Rule(
            f"!{cel_string_list(RESERVED_MOUNT_PATHS)}.exists(r, self.mountPath == r || "
            "self.mountPath.startsWith(r + '/') || r.startsWith(self.mountPath + '/'))",
            f"mountPath must not be at, inside or above {', '.join(RESERVED_MOUNT_PATHS)}: the operator "
            "mounts the job's config, scratch space and claims there",
            lambda v: _mount_path_clear(v.mount_path),
            field="mountPath",
        ),
    )

    name: str = Field(min_length=1, max_length=_VOLUME_NAME_MAX, pattern=k8s.DNS_LABEL)
    """Name of the volume (unique in the job); in the pods it is user-<name>, so it never meets the
    operator's own volumes."""
    mount_path: str = Field(min_length=2, max_length=4096, pattern=r"^/[^:]*$")
    """Absolute path in the trainer container."""
    read_only: bool = False
    """Mount read-only."""
    persistent_volume_claim: ClaimVolumeSource | None = None
    """Mount a PersistentVolumeClaim (shared by the nodes; survives restarts)."""
    config_map: ConfigMapVolumeSource | None = None
    """Mount a ConfigMap's keys as files."""
    empty_dir: EmptyDirVolumeSource | None = None
    """Mount a scratch folder per pod."""


def _section_rules() -> tuple[Rule, ...]:
    """Each method's settings go in the section of its name: dpo and rft need theirs, no other is allowed."""
    rules = []
    for section in ("dpo", "rft"):
        rules.append(
            Rule(
                f"self.method != '{section}' || has(self.{section})",
                f"spec.{section} is required when method is {section}",
                lambda s, section=section: s.method != section or getattr(s, section) is not None,
                field=section,
            )
        )
    for section in ("sft", "dpo", "rft"):
        rules.append(
            Rule(
                f"self.method == '{section}' || !has(self.{section})",
                f"spec.{section} is only allowed when method is {section}",
                lambda s, section=section: s.method == section or getattr(s, section) is None,
                field=section,
            )
        )
    return tuple(rules)


LabelValue = Annotated[str, Field(max_length=k8s.LABEL_VALUE_MAX, pattern=k8s.LABEL_VALUE)]


class PodFailurePolicyOnExitCodes(ApiModel):
    """Exit codes of the trainer container that a rule matches."""

    operator: Literal["In", "NotIn"]
    """In: the exit code is one of values; NotIn: it is none of them."""
    values: list[Annotated[int, Field(ge=0, le=255)]] = Field(min_length=1, max_length=255)
    """Exit codes (0-255). torchrun exits 1 when a training process fails; the trainer's own permanent errors
    fail the job without a rule."""


class PodFailurePolicyOnPodCondition(ApiModel):
    """A pod condition that a rule matches, e.g. DisruptionTarget."""

    type: str = Field(min_length=1, max_length=316)
    """The pod condition type."""
    status: Literal["True", "False", "Unknown"] = "True"
    """The status it must have."""


class PodFailurePolicyRule(ApiModel):
    """What to do when a failed trainer pod matches. Rules are checked in order; the first match decides."""

    RULES = (
        Rule(
            "[has(self.onExitCodes), has(self.onPodConditions), has(self.onReasons)]"
            ".filter(x, x).size() == 1",
            "exactly one of onExitCodes, onPodConditions or onReasons must be set",
            lambda r: sum(m is not None for m in (r.on_exit_codes, r.on_pod_conditions, r.on_reasons)) == 1,
        ),
    )

    action: Literal["FailJob", "Ignore", "Count"]
    """FailJob: fail the job at once; Ignore: restart the group without counting against backoffLimit (counted
    against maxDisruptions instead); Count: restart counting against backoffLimit."""
    on_exit_codes: PodFailurePolicyOnExitCodes | None = None
    """Match the trainer container's exit code."""
    on_pod_conditions: list[PodFailurePolicyOnPodCondition] | None = Field(default=None, max_length=20)
    """Match when the pod has any of these conditions."""
    on_reasons: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = Field(
        default=None, max_length=20
    )
    """Match the trainer container's termination reason or the pod's reason, e.g. OOMKilled, Evicted."""


class PodFailurePolicy(ApiModel):
    """How failed trainer pods are judged, like a Job's podFailurePolicy. Without a matching rule: a pod
    disrupted by the cluster (DisruptionTarget, eviction, preemption, node loss) is Ignore, the trainer's
    permanent error is FailJob, anything else is Count."""

    rules: list[PodFailurePolicyRule] = Field(min_length=1, max_length=20)
    """Rules, checked in order."""


class EnvVar(ApiModel):
    """An environment variable for the collective-communication libraries of the trainer pods."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^(NCCL|TORCH_NCCL|UCX)_[A-Z0-9_]+$")
    """Only NCCL_*, TORCH_NCCL_* and UCX_* names: tuning of the GPU interconnect (e.g. NCCL_IB_HCA,
    NCCL_SOCKET_IFNAME, NCCL_DEBUG, UCX_TLS). The rendezvous and the trainer's own settings are not set
    here."""
    value: str = Field(max_length=4096)
    """Its value."""


class DistributedSpec(ApiModel):
    """How the trainer processes of all nodes share the work (data parallel in every case)."""

    RULES = (
        Rule(
            "!(has(self.offloadOptimizer) && self.offloadOptimizer) || "
            "(has(self.strategy) && self.strategy != 'ddp')",
            "offloadOptimizer needs strategy zero2 or zero3",
            lambda d: not d.offload_optimizer or d.strategy != "ddp",
            field="offloadOptimizer",
        ),
        Rule(
            "!(has(self.offloadParams) && self.offloadParams) || "
            "(has(self.strategy) && self.strategy == 'zero3')",
            "offloadParams needs strategy zero3",
            lambda d: not d.offload_params or d.strategy == "zero3",
            field="offloadParams",
        ),
    )

    strategy: Literal["ddp", "zero2", "zero3"] = "ddp"
    """ddp: every process holds the whole model and optimizer (PyTorch DistributedDataParallel; the only
    choice for LoRA). zero2: DeepSpeed ZeRO stage 2 shards the optimizer state and gradients over the
    processes. zero3: ZeRO stage 3 also shards the weights, for models too big for one GPU. ZeRO needs
    fullParameter."""
    offload_optimizer: bool = False
    """ZeRO only: keep the optimizer state in CPU memory (slower steps, much less GPU memory)."""
    offload_params: bool = False
    """zero3 only: keep the sharded weights in CPU memory between uses."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra NCCL_*, TORCH_NCCL_* and UCX_* environment variables for every trainer pod."""
    shm_size: Quantity | None = None
    """Size limit of the memory-backed /dev/shm of a GPU trainer pod (NCCL's intra-node transport and
    data loaders use it), e.g. 64Gi; unset: bounded by the pod's memory limit."""

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage, or None for DDP."""
        return {"zero2": 2, "zero3": 3}.get(self.strategy)


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what, how, and where it runs."""

    RULES = (
        Rule(
            "has(self.lora) != has(self.fullParameter)",
            "exactly one of spec.lora or spec.fullParameter must be set",
            lambda s: (s.lora is None) != (s.full_parameter is None),
            reason="FieldValueInvalid",
        ),
        *_section_rules(),
        Rule(
            "!has(self.distributed) || !has(self.distributed.strategy) || "
            "self.distributed.strategy == 'ddp' || has(self.fullParameter)",
            "spec.distributed.strategy zero2 and zero3 need spec.fullParameter (LoRA trains with ddp)",
            lambda s: s.distributed.strategy == "ddp" or s.full_parameter is not None,
            field="distributed.strategy",
        ),
        Rule(
            LABEL_MAP_CEL.replace("self.", "self.nodeSelector.", 1),
            "nodeSelector keys must be label keys (an optional DNS-subdomain prefix and '/', then at most 63 "
            "letters, digits, '-', '_' and '.')",
            lambda s: label_map_problem(s.node_selector, "nodeSelector") is None,
            field="nodeSelector",
            detail=lambda s: label_map_problem(s.node_selector, "nodeSelector") or "",
        ),
        Rule(
            "self.volumes.all(a, self.volumes.filter(b, b.mountPath == a.mountPath).size() == 1)",
            "volumes: every mountPath must be different",
            lambda s: len({v.mount_path for v in s.volumes}) == len(s.volumes),
            field="volumes",
        ),
    )

    method: Method
    """The training method: sft, dpo or rft. Its settings go in the section of the same name."""
    base_model: ModelSpec
    """The model to start from."""
    dataset: DatasetSpec
    """The training data."""
    eval_dataset: DatasetSpec | None = None
    """Held-out data for the eval loss; unset: hyperparameters.evalFraction of the training data."""
    sft: SFTSpec | None = None
    """Settings of method sft (defaults apply when unset)."""
    dpo: DPOSpec | None = None
    """Settings of method dpo (required for dpo)."""
    rft: RFTSpec | None = None
    """Settings of method rft (required for rft)."""
    lora: LoRASpec | None = None
    """Train LoRA adapters. Exactly one of lora and fullParameter is set."""
    full_parameter: FullParameterSpec | None = None
    """Train all weights. Exactly one of lora and fullParameter is set."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    """Optimisation settings."""
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec)
    """Checkpoint frequency and retention."""
    output: OutputSpec
    """Where checkpoints and the result are written."""
    nodes: int = Field(default=1, ge=1, le=1024)
    """Trainer pods (machines); rank 0 is the master."""
    gpus_per_node: int = Field(default=0, ge=0, le=16)
    """GPUs (nvidia.com/gpu) per pod, one training process each; 0 trains on the CPU."""
    gpu_type: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
    )
    """GPU model to run on, as the NVIDIA GPU feature discovery labels nodes (nvidia.com/gpu.product), e.g.
    NVIDIA-H100-80GB-HBM3; unset: any node with free GPUs."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """Data parallelism across processes and nodes: DDP, or DeepSpeed ZeRO for full-parameter training."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory of each trainer pod."""
    image: str | None = Field(default=None, min_length=1, max_length=1024, pattern=r"^[^\s]+$")
    """Trainer image; unset: the operator's default."""
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    """Secrets for pulling the trainer image."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    """Labels a node must have to run a trainer pod."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Taints the trainer pods tolerate (GPU pools usually taint their nodes)."""
    # Kept as the wire dict (checked by the Affinity model, which also gives the CRD its schema): the operator
    # copies it into the pods as it is.
    affinity: Annotated[dict[str, Any] | None, WithJsonSchema(inline_schema(Affinity))] = None
    """Pod affinity and anti-affinity, as in a pod's spec.affinity."""
    volumes: list[TrainerVolume] = Field(default_factory=list, max_length=32)
    """Extra volumes for data, models or output (PersistentVolumeClaim, ConfigMap or emptyDir), mounted in
    every trainer pod."""
    suspend: bool = False
    """True: run no pods (running ones are deleted, checkpoints kept). Back to false resumes from the latest
    checkpoint. The only field that may change after creation."""
    active_deadline_seconds: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    """Fail the job when it has run this long (counted from the last start or resume)."""
    backoff_limit: int = Field(default=3, ge=0, le=1000)
    """Restarts of the whole pod group after a failure before the job fails."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, le=MAX_STEPS)
    """Delete the job (and its pods) this long after it succeeds or fails; checkpoints stay in storage, and
    the <job>-final Checkpoint and Checkpoints annotated whetstone.dev/keep=true stay as resources."""
    startup_deadline_seconds: int = Field(default=600, ge=1, le=86400)
    """How long a trainer pod may fail to start: an image that does not pull or a container configuration
    error (a missing ConfigMap or Secret key) fails the job after this long; a pod the scheduler cannot place
    is reported after this long (condition Stalled, reason UnschedulableTooLong, a Warning Event) while the
    job keeps waiting."""
    max_disruptions: int = Field(default=10, ge=0, le=1000)
    """Group restarts after disruptions (eviction, preemption, a drained or lost node, podFailurePolicy
    Ignore) before the job fails; they do not count against backoffLimit."""
    pod_failure_policy: PodFailurePolicy | None = None
    """Rules that decide, by exit code, pod condition or reason, whether a failed pod fails the job, restarts
    the group counting against backoffLimit, or restarts it without counting."""

    @field_validator("affinity", mode="before")
    @classmethod
    def _typed_affinity(cls, value: Any) -> Any:
        if value is None:
            return None
        return Affinity.model_validate(value).model_dump(by_alias=True, exclude_unset=True, mode="json")

    @property
    def sft_settings(self) -> SFTSpec:
        return self.sft or SFTSpec()

    @property
    def gradient_checkpointing(self) -> bool:
        """hyperparameters.gradientCheckpointing resolved: unset is on with lora, off with fullParameter."""
        wanted = self.hyperparameters.gradient_checkpointing
        return self.lora is not None if wanted is None else wanted

    @property
    def processes_per_node(self) -> int:
        """Training processes per pod: one per GPU, one on a CPU-only pod."""
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        """Training processes over all pods."""
        return self.nodes * self.processes_per_node


class Progress(ApiModel):
    """How far the training has come, as reported by the rank-0 trainer."""

    step: int = Field(default=0, ge=0)
    """Optimizer steps done."""
    total_steps: int | None = Field(default=None, ge=0)
    """Optimizer steps planned."""
    steps: str | None = None
    """step/totalSteps, for kubectl get."""
    epoch: float | None = None
    """Epochs done (fractional)."""
    loss: float | None = None
    """Training loss of the latest step."""
    eval_loss: float | None = None
    """Latest eval loss."""
    reward: float | None = None
    """Mean reward of the latest RFT step."""
    tokens_per_second: float | None = None
    """Training throughput over all processes."""
    eta_seconds: int | None = None
    """Estimated time to completion."""
    last_update_time: datetime | None = None
    """When this progress was read from the trainer."""


class CheckpointRef(ApiModel):
    """A saved checkpoint."""

    name: str | None = None
    """The Checkpoint resource."""
    step: int = Field(ge=0)
    """Optimizer step of the checkpoint."""
    uri: str | None = None
    """Where it is stored."""


class GraderSnapshot(ApiModel):
    """A RewardGrader as an RFT job took it when it started."""

    name: str = Field(min_length=1, max_length=253)
    """The RewardGrader."""
    resource_version: str | None = None
    """Its metadata.resourceVersion at the snapshot."""
    generation: int | None = None
    """Its metadata.generation at the snapshot."""


class NodeCounts(ApiModel):
    """Trainer pods by state."""

    active: int = 0
    """Pods pending or running."""
    succeeded: int = 0
    """Pods that exited 0."""
    failed: int = 0
    """Pods that failed in the current attempt."""


class FineTuneJobStatus(ApiModel):
    """The observed state of a FineTuneJob; written only by the operator."""

    phase: JobPhase | None = None
    """Pending, Suspended, Running, Restarting, Succeeded or Failed."""
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    """Created, Running, Restarting, Suspended, Succeeded, Failed and Stalled, each True/False with a reason;
    GradersReady for RFT jobs."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    message: str | None = None
    """A human-readable summary of the current state."""
    start_time: datetime | None = None
    """When the current run (first start or last resume) started."""
    completion_time: datetime | None = None
    """When the job succeeded or failed."""
    restart_count: int = 0
    """Whole-group restarts after failures so far (bounded by spec.backoffLimit)."""
    disruption_count: int = 0
    """Whole-group restarts after disruptions so far (bounded by spec.maxDisruptions)."""
    attempt: int | None = None
    """The attempt whose pods run now (their whetstone.dev/attempt label): every group restart and every
    resume starts a new one, so pods of an earlier attempt never count."""
    nodes: NodeCounts | None = None
    """Trainer pods by state."""
    progress: Progress | None = None
    """Training progress."""
    latest_checkpoint: CheckpointRef | None = None
    """The newest resumable checkpoint."""
    output_uri: str | None = None
    """Where the final adapter or model was written."""
    graders: list[GraderSnapshot] = Field(default_factory=list, max_length=64)
    """RFT jobs: the RewardGraders snapshotted into the trainer's configuration when the job started; later
    edits of a grader never change a running job."""


class FineTuneJob(ApiModel):
    """A fine-tuning run: SFT, DPO or RFT of a base model, LoRA or full-parameter, on one or more nodes."""

    RULES = (
        Rule(
            f"self.metadata.name.matches('{k8s.DNS_1035_LABEL}')",
            "metadata.name must be a DNS label starting with a letter (lower-case letters, digits and "
            "'-'): it names the headless Service and the trainer pods",
            lambda j: re.match(k8s.DNS_1035_LABEL, j.metadata.name) is not None,
            field="metadata.name",
        ),
        Rule(
            f"self.metadata.name.size() <= {_name_budget_cel()}",
            f"metadata.name is too long for spec.nodes: the pod names <name>{_POD_SUFFIX}<rank> must be at "
            f"most {k8s.DNS_LABEL_MAX} characters",
            lambda j: len(j.metadata.name) <= max_job_name_length(j.spec.nodes),
            field="metadata.name",
            detail=lambda j: (
                f"{len(j.metadata.name)} characters; at most {max_job_name_length(j.spec.nodes)} "
                f"with {j.spec.nodes} node(s)"
            ),
        ),
    )

    api_version: Literal["whetstone.dev/v1alpha1"] = GROUP_VERSION
    """whetstone.dev/v1alpha1"""
    kind: Literal["FineTuneJob"] = KIND
    """FineTuneJob"""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: FineTuneJobSpec
    """The desired run."""
    status: FineTuneJobStatus | None = None
    """The observed state."""
