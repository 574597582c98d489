"""FineTuneJob: one SFT, DPO or RFT run of a base model on a dataset.

The same models validate a manifest in `whetstone validate`, generate the CRD's OpenAPI schema, and configure
the trainer, so a job the API server accepts is a job the trainer understands.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from .base import (
    GROUP_VERSION,
    ApiModel,
    Condition,
    LocalObjectReference,
    ObjectMeta,
    Quantity,
    ResourceRequirements,
    Toleration,
    cel,
)
from .reasons import JobPhase

KIND = "FineTuneJob"

Method = Literal["sft", "dpo", "rft"]


class ModelSpec(ApiModel):
    """Where the base model comes from."""

    uri: str = Field(min_length=1, max_length=4096)
    """The model: a local Hugging Face folder (a path, relative to the manifest, or file://), a .gguf file,
    whetstone://tiny (a bundled tiny model; also tiny-10m, tiny-50m) or whetstone://smollm2, and in a
    cluster pvc://<claim>/<path>, hf://<org>/<name> or s3://<bucket>/<key>."""
    revision: str | None = Field(default=None, max_length=256)
    """For hf:// models: the branch, tag or commit to use."""


class DatasetSpec(ApiModel):
    """A JSONL dataset: one example per line."""

    uri: str = Field(min_length=1, max_length=4096)
    """The JSONL file: a path (relative to the manifest), file://, pvc://<claim>/<path> or s3://<bucket>/<key>.
    SFT reads chat rows ({"messages": [...]}), DPO preference rows, RFT prompt rows."""
    max_examples: int | None = Field(default=None, ge=1)
    """Use only the first N examples (for quick trials)."""


class SFTSpec(ApiModel):
    """Supervised fine-tuning: next-token cross-entropy on the assistant turns."""

    packing: bool = True
    """Pack several examples into one sequence (attention never crosses examples). Saves the padding."""
    train_on_all_turns: bool = False
    """Also compute the loss on system, user and tool turns. Off: assistant turns only (per-message weight
    0/1 can switch single assistant turns off)."""


class DPOSpec(ApiModel):
    """Direct preference optimisation on {input, preferred_output, non_preferred_output} rows."""

    beta: float = Field(default=0.1, gt=0, le=10)
    """Strength of the KL constraint to the reference model."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """The preference loss: sigmoid (DPO), ipo, hinge (SLiC) or robust (noise-robust DPO)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """Assumed share of flipped preference labels (cDPO / robust DPO)."""
    rpo_alpha: float | None = Field(default=None, ge=0)
    """Weight of an extra NLL term on the preferred answer (RPO); unset: none."""


class GraderRef(ApiModel):
    """A RewardGrader used by an RFT job, with its weight in the total reward."""

    name: str = Field(min_length=1, max_length=253)
    """Name of a RewardGrader in the job's namespace."""
    weight: float = Field(default=1.0, ge=0)
    """Weight of this grader's score in the weighted sum."""


class RFTSpec(ApiModel):
    """Reinforcement fine-tuning: sample answers, grade them, update with a policy-gradient loss."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.algorithm == 'grpo' || !has(self.klBeta) || self.klBeta == 0.0",
                    "klBeta must be 0 unless algorithm is grpo (dapo and gspo-token use no KL term)",
                    field_path=".klBeta",
                )
            ]
        }
    }

    algorithm: Literal["grpo", "dapo", "gspo-token"] = "grpo"
    """The policy loss: grpo (clipped ratio, optional KL), dapo (clip-higher, dynamic sampling, no KL) or
    gspo-token (sequence-level ratio)."""
    graders: list[GraderRef] = Field(min_length=1, max_length=16)
    """The RewardGraders whose weighted sum is the reward."""
    samples_per_prompt: int = Field(default=8, ge=2, le=256)
    """Answers sampled per prompt (the group size G)."""
    temperature: float = Field(default=1.0, gt=0, le=4)
    """Sampling temperature of the rollouts."""
    max_completion_tokens: int = Field(default=256, ge=1, le=131072)
    """Longest answer sampled."""
    kl_beta: float = Field(default=0.0, ge=0)
    """Weight of the KL penalty to the reference (grpo only; dapo and gspo-token use none)."""
    clip_low: float | None = Field(default=None, gt=0, lt=1)
    """Lower clip epsilon of the ratio; unset: the algorithm's default."""
    clip_high: float | None = Field(default=None, gt=0)
    """Upper clip epsilon of the ratio; unset: the algorithm's default."""

    @model_validator(mode="after")
    def _kl_only_for_grpo(self) -> RFTSpec:
        if self.algorithm != "grpo" and self.kl_beta != 0:
            raise ValueError("klBeta must be 0 unless algorithm is grpo (dapo and gspo-token use no KL term)")
        return self


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

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    # has(): the API server checks the default {} against this rule before defaulting.
                    "!has(self.batchSize) || !has(self.gradientAccumulationSteps) || "
                    "self.batchSize % self.gradientAccumulationSteps == 0",
                    "gradientAccumulationSteps must divide batchSize",
                    field_path=".gradientAccumulationSteps",
                )
            ]
        }
    }

    epochs: float | None = Field(default=None, gt=0, le=1000)
    """Passes over the dataset (fractions allowed). Default 1 when maxSteps is unset."""
    max_steps: int | None = Field(default=None, ge=1)
    """Optimizer steps to run; overrides epochs."""
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    """Peak learning rate of AdamW."""
    batch_size: int = Field(default=8, ge=1, le=65536)
    """Sequences (packed rows when packing) per optimizer step, over all nodes and GPUs."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    """Micro-batches per optimizer step; batchSize is split into this many parts."""
    max_seq_len: int = Field(default=1024, ge=8, le=1048576)
    """Longest tokenised example (and packed row). Longer examples are rejected in validation, not cut."""
    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warm-up from 0 to learningRate."""
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up: constant, linear to 0, or cosine to minLearningRateRatio."""
    min_learning_rate_ratio: float = Field(default=0.0, ge=0, le=1)
    """Final learning rate as a fraction of the peak (cosine and linear)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, ge=0)
    """Gradient clipping by global norm; 0 disables it."""
    seed: int = Field(default=42, ge=0)
    """Seed of the data order, dropout and initialisation; the same seed gives the same run."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: auto is bf16 on GPU and fp32 on CPU."""
    eval_every_steps: int | None = Field(default=None, ge=1)
    """Compute the eval loss every N steps (and at the end); unset: at each checkpoint and at the end."""
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Share of the training set held out for eval when evalDataset is unset (0: no eval)."""

    @model_validator(mode="after")
    def _accumulation_divides_batch(self) -> Hyperparameters:
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradientAccumulationSteps ({self.gradient_accumulation_steps}) must divide "
                f"batchSize ({self.batch_size})"
            )
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.gradient_accumulation_steps


class CheckpointingSpec(ApiModel):
    """When checkpoints are written and how many are kept."""

    every_steps: int | None = Field(default=None, ge=1)
    """Save a resumable checkpoint every N optimizer steps; unset: only at the end."""
    keep_last: int = Field(default=3, ge=1, le=1000)
    """Resumable checkpoints kept; older ones are pruned (the final output is always kept)."""


class OutputSpec(ApiModel):
    """Where the result goes."""

    uri: str = Field(min_length=1, max_length=4096)
    """Folder for checkpoints, the final adapter or model, and metrics.jsonl: a path (relative to the
    manifest), file://, pvc://<claim>/<path> or s3://<bucket>/<prefix>."""


class ClaimVolumeSource(ApiModel):
    """A PersistentVolumeClaim in the job's namespace."""

    claim_name: str = Field(min_length=1, max_length=253)
    """Name of the claim."""


class ConfigMapVolumeSource(ApiModel):
    """A ConfigMap in the job's namespace, its keys as files."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the ConfigMap."""


class EmptyDirVolumeSource(ApiModel):
    """A scratch folder that lives as long as the pod (lost on a group restart)."""

    medium: Literal["", "Memory"] | None = None
    """Empty: the node's disk; Memory: a tmpfs."""
    size_limit: Quantity | None = None
    """Largest size the folder may grow to, e.g. 20Gi."""


_ONE_VOLUME_SOURCE = cel(
    "[has(self.persistentVolumeClaim), has(self.configMap), has(self.emptyDir)].filter(x, x).size() == 1",
    "exactly one of persistentVolumeClaim, configMap or emptyDir must be set",
)


class TrainerVolume(ApiModel):
    """An extra volume mounted into every trainer pod. Claims named by pvc:// URIs in the spec are mounted
    at $WHETSTONE_PVC_ROOT/<claim> without being listed here."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {"x-kubernetes-validations": [_ONE_VOLUME_SOURCE]}
    }

    name: str = Field(min_length=1, max_length=50, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Name of the volume (unique in the job)."""
    mount_path: str = Field(min_length=2, max_length=4096, pattern=r"^/")
    """Absolute path in the trainer container."""
    read_only: bool = False
    """Mount read-only."""
    persistent_volume_claim: ClaimVolumeSource | None = None
    """Mount a PersistentVolumeClaim (shared by the nodes; survives restarts)."""
    config_map: ConfigMapVolumeSource | None = None
    """Mount a ConfigMap's keys as files."""
    empty_dir: EmptyDirVolumeSource | None = None
    """Mount a scratch folder per pod."""

    @model_validator(mode="after")
    def _one_source(self) -> TrainerVolume:
        sources = [self.persistent_volume_claim, self.config_map, self.empty_dir]
        if sum(s is not None for s in sources) != 1:
            raise ValueError(_ONE_VOLUME_SOURCE["message"])
        return self


class EnvVar(ApiModel):
    """An environment variable for the collective-communication libraries of the trainer pods."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^(NCCL|TORCH_NCCL|UCX)_[A-Z0-9_]+$")
    """Only NCCL_*, TORCH_NCCL_* and UCX_* names: tuning of the GPU interconnect (e.g. NCCL_IB_HCA,
    NCCL_SOCKET_IFNAME, NCCL_DEBUG, UCX_TLS). The rendezvous and the trainer's own settings are not set
    here."""
    value: str = Field(max_length=4096)
    """Its value."""


_OFFLOAD_NEEDS_ZERO = cel(
    "!(has(self.offloadOptimizer) && self.offloadOptimizer) || "
    "(has(self.strategy) && self.strategy != 'ddp')",
    "offloadOptimizer needs strategy zero2 or zero3",
    field_path=".offloadOptimizer",
)
_OFFLOAD_PARAMS_NEEDS_ZERO3 = cel(
    "!(has(self.offloadParams) && self.offloadParams) || (has(self.strategy) && self.strategy == 'zero3')",
    "offloadParams needs strategy zero3",
    field_path=".offloadParams",
)


class DistributedSpec(ApiModel):
    """How the trainer processes of all nodes share the work (data parallel in every case)."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {"x-kubernetes-validations": [_OFFLOAD_NEEDS_ZERO, _OFFLOAD_PARAMS_NEEDS_ZERO3]}
    }

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

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DistributedSpec:
        if self.offload_optimizer and self.strategy == "ddp":
            raise ValueError(_OFFLOAD_NEEDS_ZERO["message"])
        if self.offload_params and self.strategy != "zero3":
            raise ValueError(_OFFLOAD_PARAMS_NEEDS_ZERO3["message"])
        return self

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage, or None for DDP."""
        return {"zero2": 2, "zero3": 3}.get(self.strategy)


_ZERO_NEEDS_FULL_PARAMETER = cel(
    "!has(self.distributed) || !has(self.distributed.strategy) || self.distributed.strategy == 'ddp' || "
    "has(self.fullParameter)",
    "spec.distributed.strategy zero2 and zero3 need spec.fullParameter (LoRA trains with ddp)",
    field_path=".distributed.strategy",
)


_SPEC_RULES = [
    cel(
        "has(self.lora) != has(self.fullParameter)",
        "exactly one of spec.lora or spec.fullParameter must be set",
        reason="FieldValueInvalid",
    ),
    cel(
        "self.method != 'dpo' || has(self.dpo)", "spec.dpo is required when method is dpo", field_path=".dpo"
    ),
    cel(
        "self.method != 'rft' || has(self.rft)", "spec.rft is required when method is rft", field_path=".rft"
    ),
    cel(
        "self.method == 'sft' || !has(self.sft)",
        "spec.sft is only allowed when method is sft",
        field_path=".sft",
    ),
    cel(
        "self.method == 'dpo' || !has(self.dpo)",
        "spec.dpo is only allowed when method is dpo",
        field_path=".dpo",
    ),
    cel(
        "self.method == 'rft' || !has(self.rft)",
        "spec.rft is only allowed when method is rft",
        field_path=".rft",
    ),
    _ZERO_NEEDS_FULL_PARAMETER,
]


class FineTuneJobSpec(ApiModel):
    """What to fine-tune, on what, how, and where it runs."""

    model_config = ApiModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": _SPEC_RULES}}

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
    image: str | None = Field(default=None, max_length=1024)
    """Trainer image; unset: the operator's default."""
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    """Secrets for pulling the trainer image."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Labels a node must have to run a trainer pod."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Taints the trainer pods tolerate (GPU pools usually taint their nodes)."""
    affinity: dict[str, Any] | None = None
    """Pod affinity and anti-affinity, as in a pod's spec.affinity."""
    volumes: list[TrainerVolume] = Field(default_factory=list, max_length=32)
    """Extra volumes for data, models or output (PersistentVolumeClaim, ConfigMap or emptyDir), mounted in
    every trainer pod."""
    suspend: bool = False
    """True: run no pods (running ones are deleted, checkpoints kept). Back to false resumes from the latest
    checkpoint. The only field that may change after creation."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Fail the job when it has run this long (counted from the last start or resume)."""
    backoff_limit: int = Field(default=3, ge=0, le=1000)
    """Restarts of the whole pod group after a failure before the job fails."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the job (and its pods) this long after it succeeds or fails; checkpoints stay in storage."""

    @model_validator(mode="after")
    def _mirror_cel_rules(self) -> FineTuneJobSpec:
        # The same rules as _SPEC_RULES, so local validation rejects what the API server rejects.
        if (self.lora is None) == (self.full_parameter is None):
            raise ValueError("exactly one of spec.lora or spec.fullParameter must be set")
        for section in ("sft", "dpo", "rft"):
            present = getattr(self, section) is not None
            if present and self.method != section:
                raise ValueError(f"spec.{section} is only allowed when method is {section}")
            if section != "sft" and self.method == section and not present:
                raise ValueError(f"spec.{section} is required when method is {section}")
        if self.distributed.strategy != "ddp" and self.full_parameter is None:
            raise ValueError(_ZERO_NEEDS_FULL_PARAMETER["message"])
        return self

    @property
    def sft_settings(self) -> SFTSpec:
        return self.sft or SFTSpec()


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
    """Created, Running, Restarting, Suspended, Succeeded and Failed, each True/False with a reason."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    message: str | None = None
    """A human-readable summary of the current state."""
    start_time: datetime | None = None
    """When the current run (first start or last resume) started."""
    completion_time: datetime | None = None
    """When the job succeeded or failed."""
    restart_count: int = 0
    """Whole-group restarts so far (bounded by spec.backoffLimit)."""
    nodes: NodeCounts | None = None
    """Trainer pods by state."""
    progress: Progress | None = None
    """Training progress."""
    latest_checkpoint: CheckpointRef | None = None
    """The newest resumable checkpoint."""
    output_uri: str | None = None
    """Where the final adapter or model was written."""


class FineTuneJob(ApiModel):
    """A fine-tuning run: SFT, DPO or RFT of a base model, LoRA or full-parameter, on one or more nodes."""

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
