"""The children of a FineTuneJob are pure functions of the job: names, labels, owners, env, volumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from whetstone_operator import children, rbac
from whetstone_operator.rendezvous import rendezvous_env

EXAMPLE = Path(__file__).resolve().parent.parent / "manifests" / "examples" / "sft-tiny-reverse.yaml"


def job(**spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"].update(namespace="ns", uid="u-1", generation=1, labels={"kueue.x-k8s.io/queue-name": "q"})
    doc["spec"]["dataset"]["uri"] = "pvc://data/reverse-train.jsonl"
    doc["spec"]["output"]["uri"] = "pvc://out/sft"
    doc["spec"].update(spec)
    return doc


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


def test_every_child_is_labelled_and_owned_by_the_job() -> None:
    j = job()
    bodies = [
        children.config_map(j),
        children.headless_service(j),
        children.trainer_pod(j, 0, 0, children.ChildSettings()),
        children.checkpoint_resource(j, 40, "pvc://out/sft/checkpoints/step-00000040", "resumable"),
    ]
    for body in bodies:
        meta = body["metadata"]
        assert meta["labels"][children.JOB_LABEL] == "sft-tiny-reverse"
        (owner,) = meta["ownerReferences"]
        assert owner["uid"] == "u-1" and owner["controller"] and owner["kind"] == "FineTuneJob"
    assert [b["metadata"]["name"] for b in bodies] == [
        "sft-tiny-reverse-config",
        "sft-tiny-reverse",
        "sft-tiny-reverse-node-0",
        "sft-tiny-reverse-step-00000040",
    ]


def test_config_map_holds_the_job_the_trainer_validates() -> None:
    from whetstone_api import FineTuneJob

    text = children.config_map(job())["data"]["job.yaml"]
    parsed = FineTuneJob.model_validate(yaml.safe_load(text))
    assert parsed.spec.dataset.uri == "pvc://data/reverse-train.jsonl"


def test_headless_service_selects_the_job_and_publishes_unready_pods() -> None:
    svc = children.headless_service(job())
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {children.JOB_LABEL: "sft-tiny-reverse"}
    assert svc["spec"]["publishNotReadyAddresses"] is True


def test_rendezvous_env_of_a_two_node_gpu_job() -> None:
    env = {e["name"]: e["value"] for e in rendezvous_env("j", 1, nodes=2, gpus_per_node=8)}
    assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "j-node-0.j"
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "29500"
    assert env["WORLD_SIZE"] == "16" and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "8"
    assert env["NODE_RANK"] == env["PET_NODE_RANK"] == "1"


def test_pod_spec() -> None:
    j = job(
        nodes=2,
        gpusPerNode=4,
        image="registry/trainer:1",
        imagePullSecrets=[{"name": "pull"}],
        nodeSelector={"pool": "gpu"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {}},
        resources={"requests": {"cpu": "8", "memory": "64Gi"}},
        volumes=[
            {"name": "scratch", "mountPath": "/scratch", "emptyDir": {"sizeLimit": "10Gi"}},
            {"name": "prompts", "mountPath": "/prompts", "readOnly": True, "configMap": {"name": "p"}},
        ],
    )
    pod = children.trainer_pod(j, 1, 2, children.ChildSettings())
    spec, (c,) = pod["spec"], pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert labels[children.RANK_LABEL] == "1" and labels[children.ROLE_LABEL] == "worker"
    assert labels[children.ATTEMPT_LABEL] == "2" and labels["kueue.x-k8s.io/queue-name"] == "q"
    assert spec["hostname"] == "sft-tiny-reverse-node-1" and spec["subdomain"] == "sft-tiny-reverse"
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["image"] == "registry/trainer:1" and spec["imagePullSecrets"] == [{"name": "pull"}]
    assert c["command"][:2] == ["torchrun", "-m"] and c["command"][-1] == "/etc/whetstone/job.yaml"
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 4}
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["affinity"] == {"nodeAffinity": {}}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"rendezvous": 29500, "metrics": 8080}
    env = env_of(pod)
    assert env["PET_NODE_RANK"] == "1" and env["WHETSTONE_PVC_ROOT"] == "/mnt/pvc"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["pvc-data"] == "/mnt/pvc/data" and mounts["pvc-out"] == "/mnt/pvc/out"
    assert mounts["job-config"] == "/etc/whetstone" and mounts["user-scratch"] == "/scratch"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pvc-out"]["persistentVolumeClaim"] == {"claimName": "out"}
    assert volumes["user-scratch"]["emptyDir"] == {"sizeLimit": "10Gi"}
    assert volumes["user-prompts"]["configMap"] == {"name": "p"}


def test_default_image_and_no_gpu_resources_on_cpu() -> None:
    pod = children.trainer_pod(job(), 0, 0, children.ChildSettings(trainer_image="img:dev"))
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "img:dev" and "resources" not in c
    assert pod["metadata"]["labels"][children.ROLE_LABEL] == "master"


def test_checkpoint_resource() -> None:
    ck = children.checkpoint_resource(
        job(), 40, "pvc://out/sft/checkpoints/step-00000040", "resumable", {"loss": 1}
    )
    assert ck["metadata"]["labels"][children.STEP_LABEL] == "40"
    assert ck["spec"]["source"] == {"kind": "FineTuneJob", "name": "sft-tiny-reverse"}
    assert ck["spec"]["metrics"] == {"loss": 1.0} and ck["spec"]["lora"] is False
    final = children.checkpoint_resource(job(), 120, "pvc://out/sft/final", "export")
    assert final["metadata"]["name"] == "sft-tiny-reverse-final"


def test_rbac_files_are_fresh() -> None:
    assert rbac.KUSTOMIZE_FILE.read_text() == rbac.render_kustomize(), "run python -m whetstone_operator.rbac"
    assert rbac.HELM_FILE.read_text() == rbac.render_helm(), "run python -m whetstone_operator.rbac"


def test_the_operator_does_not_import_torch() -> None:
    code = (
        "import sys, whetstone_cli.main, whetstone_operator.handlers, whetstone_operator.operator_main, "
        "whetstone_operator.children, whetstone_operator.lifecycle, whetstone_operator.metrics; "
        "whetstone_cli.main.build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ports_follow_the_operator_settings() -> None:
    settings = children.ChildSettings(master_port=31000, status_port=31001)
    pod = children.trainer_pod(job(), 0, 0, settings)
    env = env_of(pod)
    assert env["MASTER_PORT"] == env["PET_MASTER_PORT"] == "31000" and env["WHETSTONE_STATUS_PORT"] == "31001"
    assert {p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]} == {31000, 31001}
    assert children.headless_service(job(), settings)["spec"]["ports"][0]["port"] == 31000
