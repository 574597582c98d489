"""spec.distributed: DDP or DeepSpeed ZeRO, with the same rules in Python as in the CRD's CEL."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from conftest import ROOT, valid_job
from pydantic import ValidationError
from whetstone_api.finetunejob import FineTuneJobSpec


def spec_of(**spec: Any) -> FineTuneJobSpec:
    doc = valid_job()["spec"]
    doc.update(spec)
    return FineTuneJobSpec.model_validate(doc)


def test_ddp_is_the_default_and_zero_stages_are_named() -> None:
    assert spec_of().distributed.strategy == "ddp" and spec_of().distributed.zero_stage is None
    assert spec_of(distributed={"strategy": "zero2"}).distributed.zero_stage == 2
    z3 = spec_of(distributed={"strategy": "zero3", "offloadOptimizer": True, "offloadParams": True})
    assert z3.distributed.zero_stage == 3 and z3.distributed.offload_params


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"lora": {"rank": 8}, "fullParameter": None, "distributed": {"strategy": "zero2"}},
            "zero2 and zero3 need spec.fullParameter",
        ),
        ({"distributed": {"offloadOptimizer": True}}, "offloadOptimizer needs strategy zero2 or zero3"),
        ({"distributed": {"strategy": "zero2", "offloadParams": True}}, "offloadParams needs strategy zero3"),
        ({"distributed": {"strategy": "fsdp"}}, "strategy"),
    ],
)
def test_rules_name_the_field(change: dict[str, Any], message: str) -> None:
    doc = valid_job()["spec"]
    doc.update(change)
    doc = {k: v for k, v in doc.items() if v is not None}
    with pytest.raises(ValidationError, match=message):
        FineTuneJobSpec.model_validate(doc)


def test_the_crd_carries_the_same_rules() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "whetstone.dev_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert any("need spec.fullParameter" in m for m in messages)
    dist = spec["properties"]["distributed"]
    assert dist["properties"]["strategy"]["enum"] == ["ddp", "zero2", "zero3"]
    assert {r["message"] for r in dist["x-kubernetes-validations"]} >= {
        "offloadOptimizer needs strategy zero2 or zero3",
        "offloadParams needs strategy zero3",
    }
    assert spec["properties"]["gpuType"]["description"].startswith("GPU model")
