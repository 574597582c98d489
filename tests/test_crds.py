"""The CRDs in crds/ are generated from the models: they must be fresh, structural and complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from whetstone_api.crd import KINDS, file_name, render

CRDS = Path(__file__).resolve().parent.parent / "crds"


def test_crds_are_fresh() -> None:
    stale = [file_name(k) for k in KINDS if (CRDS / file_name(k)).read_text() != render(k)]
    assert not stale, f"crds/ is stale for {stale}: run `whetstone crds` and commit the result"


def _walk(node: dict[str, Any], path: str, out: list[str]) -> None:
    """Collect schema paths that break structural-schema rules or lack a description."""
    for banned in ("$ref", "anyOf", "oneOf", "allOf", "const", "title"):
        if banned in node:
            out.append(f"{path}: has {banned}")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        out.append(f"{path}: no type")
    for name, sub in node.get("properties", {}).items():
        child = f"{path}.{name}"
        if not sub.get("description") and name not in ("metadata",):
            out.append(f"{child}: no description")
        _walk(sub, child, out)
    if "items" in node:
        _walk(node["items"], path + "[]", out)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], path + "{}", out)


def test_every_field_is_structural_and_documented() -> None:
    problems: list[str] = []
    for kind in KINDS:
        crd = yaml.safe_load((CRDS / file_name(kind)).read_text())
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        _walk(version["schema"]["openAPIV3Schema"], kind.model.__name__, problems)
    assert not problems, "\n".join(problems)


def test_finetunejob_crd_has_columns_names_and_rules() -> None:
    crd = yaml.safe_load((CRDS / "whetstone.dev_finetunejobs.yaml").read_text())
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and "whetstone" in names["categories"]
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Method"] == ".spec.method"
    assert columns["Steps"] == ".status.progress.steps" and "Age" in columns
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "has(self.lora) != has(self.fullParameter)" in rules
    assert spec["properties"]["method"]["enum"] == ["sft", "dpo", "rft"]
    # Everything but suspend is immutable.
    assert "x-kubernetes-validations" not in spec["properties"]["suspend"]
    assert spec["properties"]["hyperparameters"]["x-kubernetes-validations"][-1]["rule"] == "self == oldSelf"
    assert spec["properties"]["hyperparameters"]["default"] == {}
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
