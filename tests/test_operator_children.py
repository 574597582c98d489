"""The children of a FineTuneJob are pure functions of the job: names, labels, owners, env, volumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from whetstone_operator import children
from whetstone_operator.rendezvous import hostname, rendezvous_env

EXAMPLE = Path(__file__).resolve().parent.parent / "manifests" / "examples" / "sft-tiny-reverse.yaml"


def job(**spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"].update(namespace="ns", uid="u-1", generation=1, labels={"kueue.x-k8s.io/queue-name": "q"})
    doc["spec"]["dataset"]["uri"] = "pvc://data/reverse-train.jsonl"
    doc["spec"]["output"]["uri"] = "pvc://out/sft"
    doc["spec"].update(spec)
    return doc


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


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
        assert meta["labels"][children.MANAGED_BY_LABEL] == children.MANAGED_BY
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
    # Kueue admits the job's Workload; its queue label never reaches the pods.
    assert labels[children.ATTEMPT_LABEL] == "2" and "kueue.x-k8s.io/queue-name" not in labels
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
    assert c["resources"]["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["affinity"] == {"nodeAffinity": {}}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"rendezvous": 29500, "metrics": 8080}
    env = env_of(pod)
    assert env["PET_NODE_RANK"] == "1" and env["WHETSTONE_PVC_ROOT"] == "/mnt/pvc"
    assert env["WHETSTONE_TERMINATION_LOG"] == "/dev/termination-log"
    # The status server binds the pod's own IP (downward API), not every address of the host.
    (pod_ip,) = [e for e in c["env"] if e["name"] == "WHETSTONE_POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["pvc-data"] == "/mnt/pvc/data" and mounts["pvc-out"] == "/mnt/pvc/out"
    assert mounts["job-config"] == "/etc/whetstone" and mounts["user-scratch"] == "/scratch"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pvc-out"]["persistentVolumeClaim"] == {"claimName": "out"}
    assert volumes["user-scratch"]["emptyDir"] == {"sizeLimit": "10Gi"}
    assert volumes["user-prompts"]["configMap"] == {"name": "p"}


def test_gpu_pods_get_their_model_shm_nccl_env_and_one_process_per_gpu() -> None:
    j = job(
        nodes=2,
        gpusPerNode=8,
        gpuType="NVIDIA-H100-80GB-HBM3",
        resources={"limits": {"cpu": "96", "memory": "1Ti"}},
        distributed={"env": [{"name": "NCCL_IB_HCA", "value": "mlx5"}], "shmSize": "64Gi"},
    )
    # The chart's default placement (a GPU pool) still applies; the GPU model is added to it.
    settings = children.ChildSettings(default_node_selector=(("pool", "gpu"),))
    pod = children.trainer_pod(j, 1, 0, settings)
    spec, (c,) = pod["spec"], pod["spec"]["containers"]
    assert spec["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "8" == c["resources"]["limits"]["nvidia.com/gpu"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in spec["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    env = env_of(pod)
    assert env["NCCL_IB_HCA"] == "mlx5" and env["OMP_NUM_THREADS"] == "12"  # 96 cores / 8 processes
    assert env["PET_NPROC_PER_NODE"] == "8" and env["WORLD_SIZE"] == "16" and env["PET_NNODES"] == "2"
    # A nodeSelector that contradicts gpuType is the user's error, named (the create is refused and reported).
    clash = job(gpusPerNode=8, gpuType="NVIDIA-A100", nodeSelector={"nvidia.com/gpu.product": "NVIDIA-L4"})
    with pytest.raises(ValueError, match="contradicts spec.gpuType"):
        children.trainer_pod(clash, 0, 0, children.ChildSettings())
    # CPU pods: no /dev/shm volume, no GPU model.
    cpu = children.trainer_pod(job(gpuType="NVIDIA-A100"), 0, 0, children.ChildSettings())
    assert "dshm" not in {v["name"] for v in cpu["spec"]["volumes"]} and "nodeSelector" not in cpu["spec"]


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


def test_gpu_pods_pass_the_kubernetes_clients_validation_with_string_quantities() -> None:
    """The client (37.x) validates a body before sending: quantities must be strings, an int never leaves."""
    import kubernetes

    sent: list[Any] = []

    class Sent:
        status, data, response = 201, b"{}", None

    class NoNetwork(kubernetes.client.ApiClient):
        def call_api(self, *args: Any, **kwargs: Any) -> Any:
            sent.append(args)
            return Sent()

    api = kubernetes.client.CoreV1Api(NoNetwork())
    pod = children.trainer_pod(
        job(
            nodes=2,
            gpusPerNode=8,
            resources={"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"cpu": 16}},
        ),
        0,
        0,
        children.ChildSettings(),
    )
    api.create_namespaced_pod("ns", pod, _preload_content=False)
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8"},
        "limits": {"cpu": "16", "nvidia.com/gpu": "8"},
    }
    assert len(sent) == 1 and '"nvidia.com/gpu": "8"' in str(sent[0]).replace("'", '"')


def test_hostnames_are_dns_labels_for_long_job_names_and_many_nodes() -> None:
    import re

    label = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    long_name = "a-very-long-fine-tune-job-name-for-the-llama-model-v2-xx"  # 56 characters
    names = {hostname(long_name, rank) for rank in range(1024)}
    assert len(names) == 1024 and all(label.match(n) for n in names)
    other = {hostname(long_name[:-1] + "y", rank) for rank in range(1024)}
    assert not names & other
    assert hostname("short", 3) == "short-node-3"
    pod = children.trainer_pod(job(nodes=1000), 999, 0, children.ChildSettings())
    env = env_of(pod)
    assert env["MASTER_ADDR"] == f"{hostname('sft-tiny-reverse', 0)}.sft-tiny-reverse"
    j = job()
    j["metadata"]["name"] = long_name
    pod = children.trainer_pod(j, 999, 0, children.ChildSettings())
    assert pod["spec"]["hostname"] == hostname(long_name, 999) and len(pod["spec"]["hostname"]) <= 63
    assert env_of(pod)["MASTER_ADDR"] == f"{hostname(long_name, 0)}.{long_name}"


def test_network_policy_lets_only_the_jobs_pods_and_the_operator_in() -> None:
    settings = children.ChildSettings(status_port=8123, status_port_namespaces=("monitoring",))
    policy = children.network_policy(job(), settings)
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {children.JOB_LABEL: "sft-tiny-reverse"}}
    assert spec["policyTypes"] == ["Ingress"]
    own, status = spec["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": {children.JOB_LABEL: "sft-tiny-reverse"}}}]}
    assert status["ports"] == [{"protocol": "TCP", "port": 8123}]
    operator, monitoring = status["from"]
    assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "whetstone-system"}
    assert operator["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "whetstone-operator"}
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_an_rft_job_gets_its_graders_snapshot_and_their_secrets() -> None:

    j = job()
    grader = {
        "metadata": {"name": "judge", "resourceVersion": "5"},
        "spec": {"http": {"url": "http://x", "secretName": "tok"}},
    }
    text = children.config_map(j, [grader])["data"]["job.yaml"]
    docs = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in docs] == ["FineTuneJob", "RewardGrader"]
    assert docs[1]["metadata"] == {"name": "judge", "namespace": "ns"} and docs[1]["spec"] == grader["spec"]
    pod = children.trainer_pod(j, 0, 0, children.ChildSettings(), ["tok"])
    mounts = {m["mountPath"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["/var/run/whetstone/grader-secrets/tok"]["readOnly"] is True
    volume = next(v for v in pod["spec"]["volumes"] if v.get("secret"))
    assert (
        volume["secret"] == {"secretName": "tok"}
        and volume["name"] == mounts["/var/run/whetstone/grader-secrets/tok"]["name"]
    )
    assert env_of(pod)["WHETSTONE_GRADER_SECRETS"] == "/var/run/whetstone/grader-secrets"


def test_the_final_checkpoint_has_no_owner_so_it_outlives_the_job() -> None:
    final = children.checkpoint_resource(job(), 120, "pvc://out/sft/final", "export")
    assert "ownerReferences" not in final["metadata"]
    assert final["metadata"]["labels"][children.JOB_UID_LABEL] == "u-1"
    step = children.checkpoint_resource(
        job(),
        40,
        "pvc://out/sft/checkpoints/step-00000040",
        "resumable",
        {"loss": float("nan"), "evalLoss": 2},
    )
    assert step["metadata"]["ownerReferences"][0]["uid"] == "u-1" and step["spec"]["metrics"] == {
        "evalLoss": 2.0
    }
