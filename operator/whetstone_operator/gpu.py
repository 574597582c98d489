"""What a trainer pod needs to use its GPUs well, as pure functions of the job: the GPU model it lands on,
a memory-backed /dev/shm for NCCL, the NCCL/UCX settings the user passes through, and the thread settings
that fit the pod (the process count, one per GPU or one on a CPU pod, is rendezvous.py's). No API calls
here; the pod builder (children.py) applies them with `apply_gpu_settings`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from whetstone_api.finetunejob import FineTuneJobSpec

from .rendezvous import processes_per_node

Json = dict[str, Any]

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""The node label NVIDIA's GPU feature discovery sets to the GPU model, e.g. NVIDIA-H100-80GB-HBM3."""
SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
# The names spec.distributed.env may carry (the API's pattern says the same; checked again here because the
# operator must never let a job override the rendezvous or the trainer's own env).
PASSTHROUGH_ENV = re.compile(r"^(NCCL|TORCH_NCCL|UCX)_[A-Z0-9_]+$")


def gpu_node_selector(spec: FineTuneJobSpec) -> dict[str, str]:
    """Node labels that pick the GPU model of spec.gpuType (nothing for CPU jobs or without gpuType)."""
    if spec.gpu_type and spec.gpus_per_node:
        return {GPU_PRODUCT_LABEL: spec.gpu_type}
    return {}


def merged_node_selector(spec: FineTuneJobSpec) -> dict[str, str]:
    """spec.nodeSelector plus the GPU model; a contradiction is the user's error, named."""
    own = dict(spec.node_selector)
    for key, value in gpu_node_selector(spec).items():
        if key in own and own[key] != value:
            raise ValueError(
                f"spec.nodeSelector {key}={own[key]} contradicts spec.gpuType {value}: set one of them"
            )
        own[key] = value
    return own


def shm_volume(spec: FineTuneJobSpec) -> tuple[Json, Json] | None:
    """A tmpfs at /dev/shm for GPU pods: container runtimes give 64 MiB by default, and NCCL's intra-node
    transport and data-loader workers need far more. Its size counts against the pod's memory."""
    if not spec.gpus_per_node:
        return None
    empty_dir: Json = {"medium": "Memory"}
    if spec.distributed.shm_size is not None:
        empty_dir["sizeLimit"] = spec.distributed.shm_size
    return {"name": SHM_VOLUME, "emptyDir": empty_dir}, {"name": SHM_VOLUME, "mountPath": SHM_PATH}


def passthrough_env(spec: FineTuneJobSpec) -> list[Json]:
    """spec.distributed.env, in order; a name outside NCCL_*, TORCH_NCCL_* and UCX_* is refused."""
    out = []
    for var in spec.distributed.env:
        if not PASSTHROUGH_ENV.match(var.name):
            raise ValueError(f"spec.distributed.env: {var.name} is not an NCCL_*, TORCH_NCCL_* or UCX_* name")
        out.append({"name": var.name, "value": var.value})
    return out


def cpu_count(quantity: int | float | str) -> float:
    """A Kubernetes CPU quantity as cores: 2, "1.5", "500m"."""
    text = str(quantity).strip()
    if text.endswith("m"):
        return int(text[:-1]) / 1000
    return float(text)


def threads_per_process(spec: FineTuneJobSpec) -> int | None:
    """CPU threads for each process: the pod's CPU limit (else request) shared by its processes, at least 1;
    None without either (torch's default then: torchrun sets 1 per process when there are several).
    torch otherwise sizes its thread pools by the node's cores, not the pod's quota, and oversubscribes."""
    cpus = spec.resources.limits.get("cpu", spec.resources.requests.get("cpu"))
    if cpus is None:
        return None
    return max(1, math.floor(cpu_count(cpus) / processes_per_node(spec.gpus_per_node)))


def launcher_env(spec: FineTuneJobSpec) -> list[Json]:
    """Settings of torch that follow from the pod's CPUs. The process count per pod (one per GPU, one on a
    CPU pod) is rendezvous.py's PET_NPROC_PER_NODE."""
    threads = threads_per_process(spec)
    return [] if threads is None else [{"name": "OMP_NUM_THREADS", "value": str(threads)}]


def apply_gpu_settings(pod: Json, spec: FineTuneJobSpec) -> Json:
    """The trainer pod with all of the above: node selector, /dev/shm, pass-through and launcher env. The
    env already on the container wins for names set twice except the pass-through ones, which the user
    asked for explicitly."""
    pod_spec = pod["spec"]
    selector = merged_node_selector(spec)
    if selector:
        pod_spec["nodeSelector"] = {**(pod_spec.get("nodeSelector") or {}), **selector}
    container = pod_spec["containers"][0]
    shm = shm_volume(spec)
    if shm is not None:
        volume, mount = shm
        pod_spec["volumes"] = [v for v in pod_spec.get("volumes") or [] if v["name"] != SHM_VOLUME] + [volume]
        mounts = [m for m in container.get("volumeMounts") or [] if m["mountPath"] != SHM_PATH]
        container["volumeMounts"] = [*mounts, mount]
    env = {e["name"]: e for e in container.get("env") or []}
    for var in launcher_env(spec):
        env.setdefault(var["name"], var)
    for var in passthrough_env(spec):
        env[var["name"]] = var
    container["env"] = list(env.values())
    return pod
