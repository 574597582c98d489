"""TrainingSession children and status as pure functions of the session (whetstone_operator.sessions)."""

from __future__ import annotations

import json

import pytest
from whetstone_api.trainingsession import SessionReport
from whetstone_operator import sessions
from whetstone_operator.children import ChildSettings

NOW = "2026-01-01T00:00:00Z"


def session(**spec: object) -> dict:
    body = {"baseModel": {"uri": "whetstone://tiny"}, **spec}
    return {"metadata": {"name": "lab", "namespace": "ml", "uid": "u-1", "generation": 2}, "spec": body}


def report(**extra: object) -> SessionReport:
    body = {
        "baseModel": "whetstone://tiny",
        "modelName": "whetstone://tiny",
        "trainingClients": 1,
        "samplers": 2,
        "models": [{"modelId": "s1:train:0", "lora": True, "rank": 8, "step": 3}],
        "checkpoints": [
            {
                "tinkerPath": "tinker://s1:train:0/weights/step-3",
                "kind": "training",
                "step": 3,
                "folder": "/mnt/pvc/work/sessions/lab/t1/s1:train:0/weights/step-3",
            }
        ],
        **extra,
    }
    return SessionReport.parse(json.dumps(body).encode())


def test_deployment_runs_whetstone_serve_with_keys_from_the_secret_and_checkpoints_on_the_claim() -> None:
    d = sessions.deployment(
        session(
            apiKeySecret="keys",
            checkpointUri="pvc://work/sessions/lab",
            port=9000,
            modelName="Qwen/Qwen3-30B-A3B",
        ),
        ChildSettings(),
    )
    pod = d["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:4] == ["whetstone", "serve", "--base-model", "whetstone://tiny"]
    assert command[command.index("--host") + 1] == "$(POD_IP)"
    assert command[command.index("--checkpoint-dir") + 1] == "/mnt/pvc/work/sessions/lab"
    assert command[command.index("--api-keys-file") + 1] == "/etc/whetstone/api-keys/apiKeys"
    assert command[command.index("--model-name") + 1] == "Qwen/Qwen3-30B-A3B"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "keys"
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "work" for v in volumes.values())
    assert d["metadata"]["ownerReferences"][0]["kind"] == "TrainingSession"
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
    assert sessions.deployment(session(suspend=True), ChildSettings())["spec"]["replicas"] == 0
    svc = sessions.service(session(port=9000))
    assert svc["spec"]["ports"][0]["port"] == 9000 and svc["spec"]["selector"] == {
        sessions.SESSION_LABEL: "lab"
    }


def test_status_pending_ready_suspended() -> None:
    pending = sessions.status_of(session(), None, None, NOW)
    assert pending["phase"] == "Pending" and pending["conditions"][0]["status"] == "False"
    ready = sessions.status_of(session(), {"status": {"phase": "Running"}}, report(), NOW)
    assert ready["phase"] == "Ready" and ready["endpoint"] == "http://lab.ml.svc:8000"
    assert ready["models"] == [{"modelId": "s1:train:0", "lora": True, "rank": 8, "step": 3}]
    assert ready["conditions"][0] == {
        "type": "Ready",
        "status": "True",
        "reason": "Serving",
        "message": "whetstone://tiny on http://lab.ml.svc:8000",
        "lastTransitionTime": NOW,
    }
    assert sessions.status_of(session(suspend=True), None, None, NOW)["phase"] == "Suspended"


def test_checkpoints_become_resources_named_after_their_path() -> None:
    c = report().checkpoints[0]
    body = sessions.checkpoint_resource(session(), c)
    assert body["spec"]["source"] == {"kind": "TrainingSession", "name": "lab"}
    assert body["spec"]["uri"] == "pvc://work/sessions/lab/t1/s1:train:0/weights/step-3"
    assert body["spec"]["kind"] == "resumable" and body["spec"]["step"] == 3
    assert body["metadata"]["name"].startswith("lab-step-3-")
    assert sessions.checkpoint_name("lab", c.tinker_path) != sessions.checkpoint_name(
        "lab", c.tinker_path + "x"
    )


@pytest.mark.parametrize(
    "junk",
    [b"[]", b'{"baseModel": 3}', b"x" * (2 << 20), b'{"baseModel":"a","modelName":"b","trainingClients":-1}'],
)
def test_an_untrusted_status_is_refused(junk: bytes) -> None:
    with pytest.raises(ValueError):
        SessionReport.parse(junk)
