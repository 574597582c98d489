"""The CRDs in crds/ are generated from the models: they must be fresh, structural and complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from whetstone_api import openapi, yamlload
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


def _nodes(node: dict[str, Any], path: str) -> Any:
    """Every schema node under `node`, with its path."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def _schemas_as_the_server_reads_them() -> list[tuple[str, dict[str, Any]]]:
    """Each CRD file read the way kubectl sends it: Go's YAML rules, whole-number floats as integers."""
    out = []
    for kind in KINDS:
        (doc,) = yamlload.load((CRDS / file_name(kind)).read_bytes())
        out.append((kind.model.__name__, doc.value["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    return out


def test_every_default_is_valid_as_kubectl_sends_it() -> None:
    problems = []
    for kind, schema in _schemas_as_the_server_reads_them():
        for path, node in _nodes(schema, kind):
            if "default" in node:
                found = openapi.check(node["default"], {k: v for k, v in node.items() if k != "default"})
                problems += [f"{path}: default {node['default']!r}: {p.message}" for p in found]
    assert not problems, "\n".join(problems)


def test_the_server_truncates_bounds_for_integers() -> None:
    # The bug this guards against: `default: 0.0` reaches the server as 0, which it compares with an
    # exclusive maximum 0.5 truncated to 0. The generator writes such bounds as CEL rules instead.
    assert yamlload.load(b"x: 0.0\n")[0].value == {"x": 0}
    old = {"type": "number", "minimum": 0, "maximum": 0.5, "exclusiveMaximum": True}
    assert [p.message for p in openapi.check(0, old)] == ["Invalid value: 0: should be less than 0"]
    assert openapi.check(0.0, old) == [] and openapi.check(0.25, old) == []
    for kind, schema in _schemas_as_the_server_reads_them():
        for path, node in _nodes(schema, kind):
            for bound in ("minimum", "maximum"):
                if node.get("type") == "number" and bound in node:
                    assert node[bound] == int(node[bound]), f"{path}: fractional {bound} {node[bound]}"


def test_rules_checked_on_an_empty_default_allow_absent_fields() -> None:
    # The server checks a `default: {}` against the node's CEL rules before filling in the defaults inside,
    # so a rule there must not assume that a defaulted field is present.
    problems = []
    for kind, schema in _schemas_as_the_server_reads_them():
        for path, node in _nodes(schema, kind):
            if node.get("default") != {}:
                continue
            for rule in node.get("x-kubernetes-validations", []):
                for name in node.get("properties", {}):
                    if f"self.{name}" in rule["rule"] and f"has(self.{name})" not in rule["rule"]:
                        problems.append(f"{path}: {rule['rule']!r} uses self.{name} without has()")
    assert not problems, "\n".join(problems)


def test_crds_fit_the_client_side_apply_annotation() -> None:
    # `kubectl apply` (client-side) stores the whole object in an annotation of at most 256 KiB.
    for kind in KINDS:
        crd = yaml.safe_load((CRDS / file_name(kind)).read_text())
        assert len(json.dumps(crd, separators=(",", ":"))) < 200 * 1024, kind.plural


def test_map_lists_are_marked_by_type() -> None:
    crd = yaml.safe_load((CRDS / "whetstone.dev_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["volumes"]["x-kubernetes-list-map-keys"] == ["name"]
    assert spec["imagePullSecrets"]["x-kubernetes-list-map-keys"] == ["name"]
    assert "x-kubernetes-list-type" not in spec["tolerations"]
