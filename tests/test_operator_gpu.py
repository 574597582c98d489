"""GPU awareness of trainer pods as pure functions: GPU model, /dev/shm, NCCL/UCX pass-through, threads."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from conftest import EXAMPLES
from pydantic import ValidationError
from whetstone_api.finetunejob import FineTuneJobSpec
from whetstone_operator import children, gpu

Json = dict[str, Any]


def job(**spec: Any) -> Json:
    doc = yaml.safe_load((EXAMPLES / "sft-tiny-reverse.yaml").read_text())
    doc["metadata"].update(namespace="ns", uid="u-1", generation=1)
    doc["spec"].update(spec)
    return doc


def spec_of(**spec: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(job(**spec)["spec"])


def env_of(pod: Json) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_gpu_type_selects_the_gpu_model_label() -> None:
    s = spec_of(gpusPerNode=8, gpuType="NVIDIA-H100-80GB-HBM3", nodeSelector={"pool": "a"})
    assert gpu.merged_node_selector(s) == {"pool": "a", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # A CPU job ignores gpuType: there is no GPU to choose.
    assert gpu.gpu_node_selector(spec_of(gpuType="NVIDIA-H100-80GB-HBM3")) == {}
    clash = spec_of(
        gpusPerNode=8, gpuType="NVIDIA-A100", nodeSelector={"nvidia.com/gpu.product": "NVIDIA-L4"}
    )
    with pytest.raises(ValueError, match="contradicts spec.gpuType NVIDIA-A100"):
        gpu.merged_node_selector(clash)
    with pytest.raises(ValidationError, match="gpuType"):
        spec_of(gpusPerNode=8, gpuType="not a label value")


def test_gpu_pods_get_a_memory_backed_dev_shm() -> None:
    assert gpu.shm_volume(spec_of()) is None  # CPU pods: gloo needs none
    volume, mount = gpu.shm_volume(spec_of(gpusPerNode=8))
    assert volume == {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    assert mount == {"name": "dshm", "mountPath": "/dev/shm"}
    volume, _ = gpu.shm_volume(spec_of(gpusPerNode=8, distributed={"shmSize": "64Gi"}))
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}


def test_only_nccl_and_ucx_settings_pass_through() -> None:
    s = spec_of(
        distributed={"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "UCX_TLS", "value": "rc"}]}
    )
    assert gpu.passthrough_env(s) == [
        {"name": "NCCL_DEBUG", "value": "INFO"},
        {"name": "UCX_TLS", "value": "rc"},
    ]
    for name in ("MASTER_ADDR", "PET_NNODES", "LD_PRELOAD", "nccl_debug"):
        with pytest.raises(ValidationError, match="env"):
            spec_of(distributed={"env": [{"name": name, "value": "x"}]})


def test_threads_follow_the_pods_cpus_and_processes() -> None:
    assert gpu.threads_per_process(spec_of()) is None
    assert gpu.threads_per_process(spec_of(resources={"limits": {"cpu": "6"}})) == 6
    assert gpu.threads_per_process(spec_of(resources={"requests": {"cpu": "1500m"}})) == 1
    # Eight processes (one per GPU) share 96 cores: 12 threads each.
    assert gpu.threads_per_process(spec_of(gpusPerNode=8, resources={"limits": {"cpu": 96}})) == 12
    assert gpu.threads_per_process(spec_of(gpusPerNode=8, resources={"requests": {"cpu": "4"}})) == 1
    assert gpu.cpu_count("250m") == 0.25 and gpu.cpu_count(2) == 2.0


def test_apply_gpu_settings_to_a_trainer_pod() -> None:
    j = job(
        nodes=2,
        gpusPerNode=8,
        gpuType="NVIDIA-H100-80GB-HBM3",
        resources={"limits": {"cpu": "64", "memory": "512Gi"}},
        distributed={"env": [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}], "shmSize": "32Gi"},
    )
    # The pod builder applies them itself; applying them again changes nothing.
    out = children.trainer_pod(j, 1, 0, children.ChildSettings())
    assert out["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in out["spec"]["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in out["spec"]["containers"][0]["volumeMounts"]
    env = env_of(out)
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["OMP_NUM_THREADS"] == "8"
    assert env["PET_NPROC_PER_NODE"] == "8" and env["WORLD_SIZE"] == "16"  # rendezvous.py's, unchanged
    assert out["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # Idempotent: the pod builder may apply it to a pod that already has it.
    again = gpu.apply_gpu_settings(out, children.parse_spec(j))
    assert [v["name"] for v in again["spec"]["volumes"]].count("dshm") == 1
    assert [e["name"] for e in again["spec"]["containers"][0]["env"]].count("OMP_NUM_THREADS") == 1
