"""kube.Kube's requests, against a small local HTTP server standing in for the API server (only its HTTP
surface: what each call sends, and how answers and refusals come back). Kube builds the requests itself on
the kubernetes client's ApiClient, without the generated API classes (kube.py says why); the e2e tier runs
the same calls against a real API server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import kubernetes
import pytest
from kubernetes.client.rest import ApiException
from whetstone_operator.kube import Kube
from whetstone_operator.transport import Transport

Json = dict[str, Any]


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the API server
    seen: list[Json] = []
    answers: dict[tuple[str, str], tuple[int, Json]] = {}

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "type": self.headers.get("Content-Type"),
                "auth": self.headers.get("Authorization"),
                "body": body,
                "port": self.client_address[1],
            }
        )
        status, answer = self.answers.get((self.command, self.path.split("?")[0]), (200, {"ok": True}))
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(params=["transport", "client"])
def kube(request: pytest.FixtureRequest) -> Iterator[Kube]:
    """Kube as the operator builds it (its own transport), and on the kubernetes client's path (a proxy)."""
    Recorder.seen, Recorder.answers = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = kubernetes.client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
    config.api_key = {"BearerToken": "tok"}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    transport = Transport.for_configuration(config) if request.param == "transport" else None
    yield Kube(kubernetes.client.ApiClient(config), transport)
    server.shutdown()


def test_each_call_sends_its_method_path_content_type_and_the_token(kube: Kube) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j-node-0"}}
    kube.create_pod("ns", pod)
    Recorder.answers[("PATCH", "/apis/whetstone.dev/v1alpha1/namespaces/ns/finetunejobs/j/status")] = (
        200,
        {"metadata": {"resourceVersion": "8"}},
    )
    written = kube.patch_job_status("ns", "j", {"phase": "Pending"}, "7")
    kube.list_pods("ns", "whetstone.dev/job=j")
    kube.delete_pod("ns", "j-node-0", "uid-1", grace_seconds=0)
    kube.scale_deployment("ns", "s", 0)
    create, patch, listing, delete, scale = Recorder.seen
    assert create.pop("port") and create == {
        "method": "POST",
        "path": "/api/v1/namespaces/ns/pods",
        "type": "application/json",
        "auth": "Bearer tok",
        "body": pod,
    }
    assert patch["type"] == "application/merge-patch+json" and written["metadata"]["resourceVersion"] == "8"
    assert patch["body"] == {"metadata": {"resourceVersion": "7"}, "status": {"phase": "Pending"}}
    path, _, query = listing["path"].partition("?")
    assert path == "/api/v1/namespaces/ns/pods" and parse_qs(query) == {
        "labelSelector": ["whetstone.dev/job=j"]
    }
    assert delete["method"] == "DELETE" and delete["path"] == "/api/v1/namespaces/ns/pods/j-node-0"
    assert delete["body"] == {"preconditions": {"uid": "uid-1"}, "gracePeriodSeconds": 0}
    assert scale["type"] == "application/strategic-merge-patch+json"
    assert scale["path"] == "/apis/apps/v1/namespaces/ns/deployments/s"
    assert kube.calls[("pods", "create")] == 1 and kube.calls[("finetunejobs/status", "patch")] == 1


def test_missing_objects_are_none_and_refusals_carry_the_servers_status_and_message(kube: Kube) -> None:
    job = "/apis/whetstone.dev/v1alpha1/namespaces/ns/finetunejobs/j"
    Recorder.answers[("GET", job)] = (404, {"kind": "Status", "code": 404})
    assert kube.get_job("ns", "j") is None
    assert kube.node_ready("n1") is False  # an answer without conditions
    Recorder.answers[("POST", "/api/v1/namespaces/ns/configmaps")] = (
        409,
        {"kind": "Status", "code": 409, "message": 'configmaps "j-config" already exists'},
    )
    with pytest.raises(ApiException) as refused:
        kube.create_config_map("ns", {"metadata": {"name": "j-config"}})
    assert refused.value.status == 409 and "already exists" in json.loads(refused.value.body)["message"]
    Recorder.answers[("GET", "/apis/whetstone.dev/v1alpha1")] = (
        200,
        {"resources": [{"name": "finetunejobs"}, {"name": "finetunejobs/status"}]},
    )
    assert kube.served_resources("whetstone.dev", "v1alpha1") == {"finetunejobs", "finetunejobs/status"}
    Recorder.answers[("GET", "/apis/kueue.x-k8s.io/v1beta1")] = (404, {})
    assert kube.served_resources("kueue.x-k8s.io", "v1beta1") == set()


def test_requests_share_one_connection_even_when_the_answer_is_not_used(kube: Kube) -> None:
    """A create's answer is not used, but it is read to its end: otherwise the connection is never put back,
    and each request opens a new one (a TLS handshake on both sides, at start-up once per child)."""
    for i in range(5):
        kube.create_service("ns", {"metadata": {"name": f"s{i}"}})
        kube.create_event(
            {"metadata": {"name": "j", "namespace": "ns"}}, "FineTuneJob", "Normal", "R", "m", "me"
        )
    assert len(Recorder.seen) == 10 and len({r["port"] for r in Recorder.seen}) == 1


def test_the_proxy_is_resolved_once_not_on_every_request(tmp_path, monkeypatch) -> None:
    """A kubeconfig token's refresh hook sets the host on every request; left to the environment, the client
    then scanned os.environ for a proxy each time (more CPU than the request's JSON)."""
    import kubernetes.client.configuration as client_configuration
    from whetstone_operator.config import OperatorConfig
    from whetstone_operator.operator_main import _api_client

    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "tok"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "config").write_text(json.dumps(kubeconfig))
    import kubernetes.config.kube_config

    # Read from $KUBECONFIG when the client is imported: set where load_kube_config looks.
    monkeypatch.setattr(
        kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "config")
    )
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    api = _api_client(OperatorConfig())
    assert api.configuration.proxy == "http://proxy.example:3128", "the environment's proxy still applies"
    looked_up = []
    monkeypatch.setattr(client_configuration, "getproxies", lambda: looked_up.append(1) or {})
    for _ in range(3):
        api.param_serialize("GET", "/api/v1/nodes", auth_settings=["BearerToken"])
    assert looked_up == [] and api.configuration.proxy == "http://proxy.example:3128"
    # Through a proxy requests stay on the client's path; a host the proxy is bypassed for gets the transport.
    assert Transport.for_configuration(api.configuration) is None
    api.configuration.no_proxy = "127.0.0.1"
    assert Transport.for_configuration(api.configuration) is not None
