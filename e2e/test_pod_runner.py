"""The pod runner (e2e/pod_runner.py) plays the kubelet for pods on the runner nodes: real processes."""

from __future__ import annotations

import ipaddress
import textwrap
import urllib.request

import kubernetes
import pytest
from helpers import Cluster, Json, field_env, runner_pod, wait_for
from localcluster import free_port

pytestmark = pytest.mark.runner


def py(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def terminated(pod: Json, container: int = 0) -> Json:
    return pod["status"]["containerStatuses"][container]["state"]["terminated"]


def test_a_pod_runs_to_succeeded_with_its_env(cluster: Cluster, namespace: str) -> None:
    env = [
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        field_env("TEAM", "metadata.labels['team']"),
        field_env("NOTE", "metadata.annotations['note']"),
        {"name": "GREETING", "value": "hello $(POD_NAME)"},
    ]
    code = """
        import os, socket
        for key in ("POD_NAME", "POD_NAMESPACE", "POD_IP", "TEAM", "NOTE", "GREETING"):
            print(f"{key}={os.environ[key]}")
        print(f"HOSTNAME={socket.gethostname()}")
        print(f"CWD={os.getcwd()}")
    """
    pod = runner_pod(
        "hello", py(code), env=env, labels={"team": "llm"}, annotations={"note": "hi"}, workingDir="/tmp"
    )
    cluster.core.create_namespaced_pod(namespace, pod)
    done = cluster.wait_pod_phase(namespace, "hello", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", cluster.container_log(namespace, "hello")
    assert terminated(done) | {"exitCode": 0, "reason": "Completed"} == terminated(done)
    ip = done["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(cluster.state.pod_network)
    assert done["spec"]["nodeName"] in cluster.state.runner_nodes
    conditions = {c["type"]: c["status"] for c in done["status"]["conditions"]}
    assert conditions["PodScheduled"] == "True" and conditions["Initialized"] == "True"
    assert conditions["Ready"] == "False"  # a completed pod is no longer ready
    log = cluster.container_log(namespace, "hello")
    for line in (
        "POD_NAME=hello",
        f"POD_NAMESPACE={namespace}",
        f"POD_IP={ip}",
        "TEAM=llm",
        "NOTE=hi",
        "GREETING=hello hello",
        "HOSTNAME=hello",
        "CWD=/tmp",
    ):
        assert line in log


def test_a_failing_pod_is_failed_with_its_exit_code(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_pod(namespace, runner_pod("boom", py("import sys; sys.exit(3)")))
    done = cluster.wait_pod_phase(namespace, "boom", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Failed"
    assert terminated(done)["exitCode"] == 3
    assert terminated(done)["reason"] == "Error"
    assert done["status"]["containerStatuses"][0]["restartCount"] == 0


def test_on_failure_restarts_and_empty_dir_survives_restarts(cluster: Cluster, namespace: str) -> None:
    code = """
        import os, sys
        path = "/scratch/attempts"
        n = int(open(path).read()) if os.path.exists(path) else 0
        open(path, "w").write(str(n + 1))
        print("attempt", n)
        sys.exit(0 if n >= 1 else 7)
    """
    pod = runner_pod(
        "retry",
        py(code),
        restartPolicy="OnFailure",
        volumes=[{"name": "scratch", "emptyDir": {}}],
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    cluster.core.create_namespaced_pod(namespace, pod)
    done = cluster.wait_pod_phase(namespace, "retry", ("Succeeded", "Failed"))
    status = done["status"]["containerStatuses"][0]
    assert done["status"]["phase"] == "Succeeded", cluster.container_log(namespace, "retry")
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7
    assert status["state"]["terminated"]["exitCode"] == 0


def test_config_map_volume_and_env_and_init_container(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"model.yaml": "lr: 0.001\n", "MODE": "sft"}}
    )
    pod = runner_pod(
        "configured",
        py("""
            import os
            print("MODE=" + os.environ["MODE"])
            print("FILE=" + open("/etc/whetstone/model.yaml").read().strip())
            print("INIT=" + open("/work/from-init").read())
        """),
        envFrom=[{"configMapRef": {"name": "settings"}}],
        volumes=[
            {
                "name": "settings",
                "configMap": {"name": "settings", "items": [{"key": "model.yaml", "path": "model.yaml"}]},
            },
            {"name": "work", "emptyDir": {}},
        ],
        volumeMounts=[
            {"name": "settings", "mountPath": "/etc/whetstone", "readOnly": True},
            {"name": "work", "mountPath": "/work"},
        ],
        initContainers=[
            {
                "name": "prepare",
                "image": "busybox",
                "command": ["sh", "-c", "printf ready > /work/from-init"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }
        ],
    )
    cluster.core.create_namespaced_pod(namespace, pod)
    done = cluster.wait_pod_phase(namespace, "configured", ("Succeeded", "Failed"))
    log = cluster.container_log(namespace, "configured")
    assert done["status"]["phase"] == "Succeeded", log
    assert "MODE=sft" in log and "FILE=lr: 0.001" in log and "INIT=ready" in log
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


SERVER = """
    import http.server, os
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = os.environ["POD_NAME"].encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
    http.server.HTTPServer((os.environ["POD_IP"], int(os.environ["PORT"])), Handler).serve_forever()
"""


def test_two_pods_listen_on_the_same_port_on_their_own_ips(cluster: Cluster, namespace: str) -> None:
    # One port for both pods; chosen free because a process of the host that binds 0.0.0.0 would take it
    # from every pod address (no network namespaces).
    port = free_port()
    env = [field_env("POD_NAME", "metadata.name"), field_env("POD_IP", "status.podIP")]
    env.append({"name": "PORT", "value": str(port)})
    for name in ("web-a", "web-b"):
        cluster.core.create_namespaced_pod(namespace, runner_pod(name, py(SERVER), env=env))
    ips = {
        name: cluster.wait_pod_phase(namespace, name, ("Running",))["status"]["podIP"]
        for name in ("web-a", "web-b")
    }
    assert ips["web-a"] != ips["web-b"]

    def answers(ip: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}/", timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            return None

    for name, ip in ips.items():
        assert wait_for(lambda ip=ip: answers(ip), 60, f"{name} to answer on {ip}:{port}") == name


def test_headless_service_names_resolve_between_pods(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "rdzv"},
            "spec": {
                "clusterIP": "None",
                "selector": {"job": "rdzv"},
                "ports": [{"name": "c10d", "port": 29500}],
            },
        },
    )
    sleeper = runner_pod(
        "job-node-0",
        py("import time; time.sleep(600)"),
        hostname="job-node-0",
        subdomain="rdzv",
        labels={"job": "rdzv"},
    )
    cluster.core.create_namespaced_pod(namespace, sleeper)
    target_ip = cluster.wait_pod_phase(namespace, "job-node-0", ("Running",))["status"]["podIP"]
    if not ipaddress.ip_address(target_ip).is_loopback:
        # The endpoint controllers accept the runner's pod IPs, as they would a CNI's.
        discovery = kubernetes.client.DiscoveryV1Api(cluster.api)

        def sliced() -> bool:
            slices = discovery.list_namespaced_endpoint_slice(
                namespace, label_selector="kubernetes.io/service-name=rdzv"
            )
            return any(target_ip in e.addresses for s in slices.items for e in s.endpoints or [])

        wait_for(sliced, 60, f"an EndpointSlice of rdzv with {target_ip}")
    code = f"""
        import socket, time
        names = ["job-node-0.rdzv", "job-node-0.rdzv.{namespace}.svc.cluster.local", "rdzv"]
        deadline = time.time() + 60
        while True:
            try:
                for name in names:
                    print(name, socket.gethostbyname(name))
                break
            except OSError as e:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        print("self", socket.gethostbyname(socket.gethostname()))
    """
    client = runner_pod(
        "job-node-1", py(code), hostname="job-node-1", subdomain="rdzv", labels={"job": "rdzv"}
    )
    cluster.core.create_namespaced_pod(namespace, client)
    done = cluster.wait_pod_phase(namespace, "job-node-1", ("Succeeded", "Failed"))
    log = cluster.container_log(namespace, "job-node-1")
    assert done["status"]["phase"] == "Succeeded", log
    assert f"job-node-0.rdzv {target_ip}" in log
    assert f"job-node-0.rdzv.{namespace}.svc.cluster.local {target_ip}" in log
    assert f"self {done['status']['podIP']}" in log


def test_deleting_a_pod_stops_its_process_gracefully(cluster: Cluster, namespace: str) -> None:
    code = """
        import signal, sys, time
        def stop(*_):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("serving", flush=True)
        time.sleep(600)
    """
    cluster.core.create_namespaced_pod(namespace, runner_pod("long", py(code)))
    cluster.wait_pod_phase(namespace, "long", ("Running",))
    wait_for(lambda: "serving" in cluster.container_log(namespace, "long"), 60, "the process to start")
    cluster.core.delete_namespaced_pod("long", namespace, grace_period_seconds=10)
    cluster.wait_pod_gone(namespace, "long")
    assert "got SIGTERM" in cluster.container_log(namespace, "long")


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(
    cluster: Cluster, namespace: str
) -> None:
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stubborn", flush=True)
        time.sleep(600)
    """
    cluster.core.create_namespaced_pod(namespace, runner_pod("stubborn", py(code)))
    cluster.wait_pod_phase(namespace, "stubborn", ("Running",))
    wait_for(lambda: "stubborn" in cluster.container_log(namespace, "stubborn"), 60, "the process to start")
    cluster.core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=2)
    cluster.wait_pod_gone(namespace, "stubborn")


def test_a_container_without_command_cannot_start(cluster: Cluster, namespace: str) -> None:
    pod = runner_pod("imageonly", ["placeholder"])
    del pod["spec"]["containers"][0]["command"]
    cluster.core.create_namespaced_pod(namespace, pod)

    def waiting_reason() -> str | None:
        statuses = cluster.pod(namespace, "imageonly").get("status", {}).get("containerStatuses") or []
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    assert wait_for(waiting_reason, 60, "a waiting reason") in (
        "CreateContainerConfigError",
        "ContainerCreating",
    )
    wait_for(lambda: waiting_reason() == "CreateContainerConfigError", 60, "CreateContainerConfigError")


ALLREDUCE = """
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
print(f"rank={dist.get_rank()} world={dist.get_world_size()} sum={value.item():.0f}", flush=True)
dist.destroy_process_group()
"""


def test_torchrun_rendezvous_across_two_pods(cluster: Cluster, namespace: str) -> None:
    pytest.importorskip("torch")
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "script"}, "data": {"allreduce.py": ALLREDUCE}}
    )
    cluster.core.create_namespaced_service(
        namespace, {"metadata": {"name": "ddp"}, "spec": {"clusterIP": "None", "selector": {"job": "ddp"}}}
    )
    port = free_port()  # the c10d store binds every address: keep clear of other torchrun jobs of the host
    for rank in range(2):
        command = [
            "torchrun",
            "--nnodes=2",
            "--nproc-per-node=1",
            "--node-rank=$(NODE_RANK)",
            "--master-addr=ddp-node-0.ddp",
            f"--master-port={port}",
            "/opt/script/allreduce.py",
        ]
        pod = runner_pod(
            f"ddp-node-{rank}",
            command,
            env=[{"name": "NODE_RANK", "value": str(rank)}, {"name": "OMP_NUM_THREADS", "value": "1"}],
            hostname=f"ddp-node-{rank}",
            subdomain="ddp",
            labels={"job": "ddp"},
            volumes=[{"name": "script", "configMap": {"name": "script"}}],
            volumeMounts=[{"name": "script", "mountPath": "/opt/script"}],
        )
        cluster.core.create_namespaced_pod(namespace, pod)
    for rank in range(2):
        done = cluster.wait_pod_phase(namespace, f"ddp-node-{rank}", ("Succeeded", "Failed"), timeout=240)
        log = cluster.container_log(namespace, f"ddp-node-{rank}")
        assert done["status"]["phase"] == "Succeeded", log
        assert f"rank={rank} world=2 sum=3" in log


def test_runner_pods_need_the_runner_toleration(cluster: Cluster, namespace: str) -> None:
    pod = runner_pod("untolerated", py("print(1)"))
    pod["spec"]["tolerations"] = []
    cluster.core.create_namespaced_pod(namespace, pod)

    def unschedulable() -> bool:
        conds = cluster.pod(namespace, "untolerated").get("status", {}).get("conditions") or []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    wait_for(unschedulable, 120, "the runner taint to keep the pod off the runner nodes")
    assert not cluster.pod(namespace, "untolerated")["spec"].get("nodeName")


def test_in_cluster_client_uses_the_service_account_token(cluster: Cluster, namespace: str) -> None:
    # The projected token volume, kube-root-ca.crt and KUBERNETES_SERVICE_* make in-cluster config work; the
    # default ServiceAccount may read pods only once RBAC says so.
    kubernetes.client.RbacAuthorizationV1Api(cluster.api).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "default-view"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
        },
    )
    code = """
        import os
        from kubernetes import client, config
        config.load_incluster_config()
        me = client.CoreV1Api().read_namespaced_pod(os.environ["POD_NAME"], os.environ["POD_NAMESPACE"])
        print("node", me.spec.node_name)
        try:
            client.CoreV1Api().list_namespaced_secret(os.environ["POD_NAMESPACE"])
        except client.ApiException as e:
            print("secrets", e.status)
    """
    env = [field_env("POD_NAME", "metadata.name"), field_env("POD_NAMESPACE", "metadata.namespace")]
    cluster.core.create_namespaced_pod(namespace, runner_pod("incluster", py(code), env=env))
    done = cluster.wait_pod_phase(namespace, "incluster", ("Succeeded", "Failed"))
    log = cluster.container_log(namespace, "incluster")
    assert done["status"]["phase"] == "Succeeded", log
    assert f"node {done['spec']['nodeName']}" in log
    assert "secrets 403" in log  # the view role does not include secrets


def test_active_deadline_fails_the_pod(cluster: Cluster, namespace: str) -> None:
    pod = runner_pod("late", py("import time; time.sleep(600)"), activeDeadlineSeconds=2)
    cluster.core.create_namespaced_pod(namespace, pod)
    done = cluster.wait_pod_phase(namespace, "late", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["reason"] == "DeadlineExceeded"
