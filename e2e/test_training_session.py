"""A TrainingSession on the real control plane: the operator turns it into a Deployment and a Service, the
pod runner runs `whetstone serve` in the session's pod, the official `tinker` client trains through the
Service's address (its EndpointSlice: the pod's IP, as the runner has no ClusterIP routing), and a saved
state appears as a Checkpoint resource. Deleting the session releases its children."""

from __future__ import annotations

import os

import kubernetes
import numpy as np
import pytest
from helpers import RUNNER_TOLERATION, Cluster, wait_for
from localcluster import RUNNER_NODE_LABEL
from operator_fixtures import *  # noqa: F403
from operator_fixtures import CLAIM, GROUP, VERSION, OperatorProcess, free_port

tinker = pytest.importorskip("tinker", reason="the dev extra installs the tinker client")
from tinker import types  # noqa: E402
from whetstone_trainer.models.tiny import load_tiny_tokenizer  # noqa: E402

KEY = "tml-e2e-session-key"


def test_training_session_serves_the_tinker_client_and_records_checkpoints(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim
) -> None:
    name, port = "lab", free_port()
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "lab-keys"}, "stringData": {"apiKeys": f"{KEY}\n"}}
    )
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingSession",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "whetstone://tiny"},
            "checkpointUri": f"pvc://{CLAIM}/sessions/{name}",
            "apiKeySecret": "lab-keys",
            "port": port,
            "nodeSelector": {RUNNER_NODE_LABEL: "true"},
            "tolerations": [RUNNER_TOLERATION],
        },
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainingsessions", body)

    def session() -> dict:
        return cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "trainingsessions", name
        )

    def ready() -> dict | None:
        status = session().get("status") or {}
        return status if status.get("phase") == "Ready" else None

    status = wait_for(ready, 300, "the session Ready", 1)
    assert status["endpoint"] == f"http://{name}.{namespace}.svc:{port}"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"

    discovery = kubernetes.client.DiscoveryV1Api(cluster.api)
    addresses = wait_for(
        lambda: [
            a
            for s in discovery.list_namespaced_endpoint_slice(
                namespace, label_selector=f"kubernetes.io/service-name={name}"
            ).items
            for e in (s.endpoints or [])
            for a in e.addresses
        ],
        120,
        "the Service's endpoints",
    )
    os.environ["TINKER_TELEMETRY"] = "0"
    sc = tinker.ServiceClient(base_url=f"http://{addresses[0]}:{port}", api_key=KEY)
    tc = sc.create_lora_training_client(base_model="whetstone://tiny", rank=4).result()
    # get_info names the pod's own model folder, which this process cannot see: the tiny tokenizer ships here.
    tokens = load_tiny_tokenizer().encode("Reverse 1234: 4321")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(tokens[1:]),
            "weights": np.ones(len(tokens) - 1, np.float32),
        },
    )
    losses = []
    for _ in range(3):
        losses.append(tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"])
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert losses[-1] < losses[0]
    path = tc.save_state("e2e").result().path
    with pytest.raises(Exception, match="401|API key"):
        tinker.ServiceClient(
            base_url=f"http://{addresses[0]}:{port}", api_key="tml-wrong"
        ).create_lora_training_client(base_model="whetstone://tiny").result()

    def checkpoint() -> dict | None:
        items = cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "checkpoints", label_selector=f"whetstone.dev/session={name}"
        )["items"]
        return next(
            (c for c in items if c["metadata"]["annotations"]["whetstone.dev/tinker-path"] == path), None
        )

    ckpt = wait_for(checkpoint, 120, "the Checkpoint of the saved state", 1)
    assert ckpt["spec"]["source"] == {"kind": "TrainingSession", "name": name}
    assert ckpt["spec"]["uri"].startswith(f"pvc://{CLAIM}/sessions/{name}/")
    assert (work_claim / ckpt["spec"]["uri"][len(f"pvc://{CLAIM}/") :] / "weights.safetensors").is_file()
    wait_for(
        lambda: any(m["modelId"] == tc.model_id for m in (ready() or {}).get("models", [])),
        60,
        "the model in the session's status",
        1,
    )

    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "trainingsessions", name)
    apps = kubernetes.client.AppsV1Api(cluster.api)
    wait_for(
        lambda: not apps.list_namespaced_deployment(namespace).items,
        120,
        "the Deployment garbage-collected",
        1,
    )
    assert (work_claim / ckpt["spec"]["uri"][len(f"pvc://{CLAIM}/") :]).is_dir()  # the files stay
