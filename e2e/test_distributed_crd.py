"""The API server enforces spec.distributed and spec.gpuType as `whetstone validate` does (CEL in the CRD)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from helpers import Cluster
from operator_fixtures import crds_applied  # noqa: F401 - fixture

EXAMPLE = Path(__file__).resolve().parent.parent / "manifests" / "examples" / "sft-tiny-reverse.yaml"
Json = dict[str, Any]


def job(**spec: Any) -> Json:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"].update(spec)
    return doc


def dry_run_create(cluster: Cluster, namespace: str, doc: Json) -> None:
    cluster.custom.create_namespaced_custom_object(
        "whetstone.dev", "v1alpha1", namespace, "finetunejobs", doc, dry_run="All"
    )


def test_zero_with_offload_on_full_parameter_is_accepted(
    cluster: Cluster,
    crds_applied: list[str],  # noqa: F811
    namespace: str,
) -> None:
    doc = job(
        nodes=2,
        gpusPerNode=8,
        gpuType="NVIDIA-H100-80GB-HBM3",
        distributed={
            "strategy": "zero3",
            "offloadOptimizer": True,
            "offloadParams": True,
            "shmSize": "64Gi",
            "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        },
    )
    dry_run_create(cluster, namespace, doc)
    dry_run_create(cluster, namespace, job())  # no distributed section: ddp by default


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"lora": {"rank": 8}, "distributed": {"strategy": "zero2"}},
            "zero2 and zero3 need spec.fullParameter",
        ),
        ({"distributed": {"offloadOptimizer": True}}, "offloadOptimizer needs strategy zero2 or zero3"),
        ({"distributed": {"strategy": "zero2", "offloadParams": True}}, "offloadParams needs strategy zero3"),
        ({"distributed": {"env": [{"name": "LD_PRELOAD", "value": "x"}]}}, "spec.distributed.env[0].name"),
        ({"gpuType": "not a label"}, "spec.gpuType"),
    ],
)
def test_bad_distributed_settings_are_rejected_naming_the_field(
    cluster: Cluster,
    crds_applied: list[str],  # noqa: F811
    namespace: str,
    change: Json,
    message: str,
) -> None:
    doc = copy.deepcopy(job())
    if "lora" in change:
        doc["spec"].pop("fullParameter")
    doc["spec"].update(change)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        dry_run_create(cluster, namespace, doc)
    assert refused.value.status == 422
    assert message in json.loads(refused.value.body)["message"]
