"""The Argo CD health checks in Argo CD's own Lua: gopher-lua, set up as Argo CD runs argocd-cm scripts
(e2e/tools/luahealth), on the scripts users install (manifests/argocd/argocd-cm-health.yaml) and the
fixtures in Argo CD's test format (health_test.yaml beside each health.lua), which cover every phase."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from deploy_tools import REPO, Tools
from whetstone_api import reasons
from whetstone_api.checkpoint import CheckpointStatus
from whetstone_api.rewardgrader import RewardGraderStatus
from whetstone_api.trainingsession import TrainingSessionStatus

HEALTH = REPO / "manifests" / "argocd" / "health" / "whetstone.dev"
CONFIGMAP = REPO / "manifests" / "argocd" / "argocd-cm-health.yaml"
PHASES = {
    "FineTuneJob": set(reasons.JOB_PHASES),
    "Checkpoint": set(get_args(CheckpointStatus.model_fields["phase"].annotation.__args__[0])),
    "RewardGrader": set(get_args(RewardGraderStatus.model_fields["phase"].annotation.__args__[0])),
    "TrainingSession": set(get_args(TrainingSessionStatus.model_fields["phase"].annotation.__args__[0])),
}


def lua(script: str, objects: list[dict[str, Any]], tmp: Path) -> list[dict[str, str]]:
    path = tmp / "health.lua"
    path.write_text(script)
    done = subprocess.run(
        [str(Tools.locate().luahealth), str(path)], input=json.dumps(objects), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def installed_scripts() -> dict[str, str]:
    data = yaml.safe_load(CONFIGMAP.read_text())["data"]
    return {key.rsplit("_", 1)[1]: script for key, script in data.items()}


@pytest.mark.parametrize("kind", sorted(PHASES))
def test_health_of_every_phase(kind: str, tmp_path: Path) -> None:
    cases = yaml.safe_load((HEALTH / kind / "health_test.yaml").read_text())["tests"]
    objects = [yaml.safe_load((HEALTH / kind / c["inputPath"]).read_text()) for c in cases]
    got = lua(installed_scripts()[kind], objects, tmp_path)
    for case, result in zip(cases, got, strict=True):
        assert result == case["healthStatus"], case["inputPath"]
    # Every phase the API defines has a fixture, and so does an object the operator has not seen yet.
    seen = {(o.get("status") or {}).get("phase") for o in objects}
    assert PHASES[kind] <= seen and None in seen
    assert {c["healthStatus"]["status"] for c in cases} >= {"Healthy", "Progressing"}


def test_the_installed_scripts_are_the_files_of_each_kind() -> None:
    assert installed_scripts() == {k: (HEALTH / k / "health.lua").read_text() for k in PHASES}


def test_the_runner_has_argo_cds_libraries_only(tmp_path: Path) -> None:
    # Without useOpenLibs Argo CD opens no string library: a script that uses one fails there, and here.
    (result,) = lua('return {status = string.upper("healthy")}', [{"metadata": {}}], tmp_path)
    assert "string" in result.get("error", ""), result
    (result,) = lua('return {status = "Fine"}', [{"metadata": {}}], tmp_path)
    assert result == {"status": "Unknown", "message": "Lua returned an invalid health status"}
