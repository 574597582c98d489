"""Kueue on the loopback control plane: its CRDs, its webhooks and its controller manager as a local process.

`start_kueue` installs everything into a running cluster of `localcluster.py` (`e2e/cluster up --kueue`, or
the `kueue` fixture of e2e/test_kueue.py) and waits until Kueue is ready. The binary, the CRDs and the
webhook list come from the same Kueue module version, built by `e2e/tools/build.sh` (tool `kueue`).

How it reaches the API server, and the API server reaches it (there is no pod network or Service routing):
- Kueue runs as a process with the admin kubeconfig, leader election off, metrics off, and the visibility
  API server off (an aggregated API would need its own APIService plumbing; nothing here uses it).
- Its webhook server listens on 127.0.0.1:<free port>. The webhook configurations and the CRD conversion
  webhooks are registered with URL client configs (https://127.0.0.1:<port>/<path>), not Service refs.
- Kueue's internal certificate management stays on (the supported mode, and the only one that does not read
  a metrics certificate from a fixed /etc path), but it is seeded: before Kueue starts we write its Secret
  with a CA of our own (CN and SAN `kueue-ca`, PKCS#1 key, as the cert rotator checks) and a serving cert
  valid for both 127.0.0.1 and the Service name the rotator expects, and the same cert into its cert dir.
  The rotator finds them valid, keeps them, and injects that CA into the webhook configurations and CRDs
  it manages, which already carry it.
- Only the webhooks of Kueue's own kinds (Workload, ClusterQueue, LocalQueue, ResourceFlavor, Cohort, ...)
  are registered. Whetstone queues a FineTuneJob by creating its Workload itself
  (operator/whetstone_operator/kueue.py), so Kueue never needs to mutate pods or Jobs, and registering its
  pod webhook would make every pod of the shared e2e cluster depend on Kueue.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import yaml
from localcluster import (
    ApiClient,
    Binaries,
    ClusterError,
    ClusterState,
    _http_get,
    _openssl,
    free_port,
    log,
    start_process,
    wait_until,
)

NAMESPACE = "kueue-system"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
GROUP = "kueue.x-k8s.io"
# The CRDs Kueue serves in two versions (v1beta1, v1beta2) and converts through its webhook
# (config/components/crd/kustomization.yaml of the module); the cert rotator also manages these five.
CONVERSION_CRDS = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
# The webhook configuration names the cert rotator injects its CA into (<service base>-<type>-webhook-...).
WEBHOOK_CONFIGURATION = {
    "MutatingWebhookConfiguration": "kueue-mutating-webhook-configuration",
    "ValidatingWebhookConfiguration": "kueue-validating-webhook-configuration",
}
FIELD_MANAGER = "whetstone-e2e"


def make_kueue_pki(folder: Path) -> None:
    """A CA the cert rotator accepts and a serving cert for 127.0.0.1 and the Service name it checks."""
    folder.mkdir(parents=True, exist_ok=True)
    # -traditional: the rotator parses the CA key as PKCS#1.
    _openssl("genrsa", "-traditional", "-out", "ca.key", "2048", cwd=folder)
    (folder / "ca.ext").write_text(
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
        "subjectAltName=DNS:kueue-ca\n"
    )
    _openssl("req", "-new", "-key", "ca.key", "-out", "ca.csr", "-subj", "/O=kueue/CN=kueue-ca", cwd=folder)
    _openssl(
        "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-out", "ca.crt", "-days", "3650",
        "-extfile", "ca.ext", cwd=folder,
    )  # fmt: skip
    service = f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc"
    (folder / "tls.ext").write_text(
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        f"subjectAltName=IP:127.0.0.1,DNS:{service}\n"
    )
    _openssl("genrsa", "-traditional", "-out", "tls.key", "2048", cwd=folder)
    _openssl("req", "-new", "-key", "tls.key", "-out", "tls.csr", "-subj", f"/CN={service}", cwd=folder)
    _openssl(
        "x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "tls.crt", "-days", "3650", "-extfile", "tls.ext", cwd=folder,
    )  # fmt: skip


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def crds(kueue_dir: Path, webhook_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs from the module, with conversion webhooks that call the local process."""
    out = []
    for path in sorted((kueue_dir / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERSION_CRDS:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
        out.append(crd)
    return out


def webhook_configurations(kueue_dir: Path, webhook_url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """The webhooks of Kueue's own kinds, called by URL."""
    out = []
    for config in yaml.safe_load_all((kueue_dir / "webhook-manifests.yaml").read_text()):
        hooks = []
        for hook in config.get("webhooks") or []:
            groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
            if groups != {GROUP}:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{webhook_url}{path}", "caBundle": ca_bundle}
            hooks.append(hook)
        config["metadata"] = {"name": WEBHOOK_CONFIGURATION[config["kind"]]}
        config["webhooks"] = hooks
        out.append(config)
    return out


def kueue_config(webhook_port: int, health_port: int, cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": WEBHOOK_SERVICE,
            "webhookSecretName": WEBHOOK_SECRET,
        },
        "clientConnection": {"qps": 50, "burst": 100},
        # The smallest default; FineTuneJobs reach Kueue as Workloads, through no integration.
        "integrations": {"frameworks": ["batch/job"]},
    }


def apply(api: ApiClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply (create or update), so a restarted Kueue re-points everything at its new port."""
    return api.request(
        "PATCH",
        f"{path}?fieldManager={FIELD_MANAGER}&force=true",
        body,
        content_type="application/apply-patch+yaml",
    )


def _established(api: ApiClient, name: str) -> bool:
    crd = api.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    return any(
        c["type"] == "Established" and c["status"] == "True"
        for c in crd.get("status", {}).get("conditions", [])
    )


def start_kueue(
    state: ClusterState, bins: Binaries, api: ApiClient, attached: bool, timeout: float = 180.0
) -> subprocess.Popen[bytes]:
    """Install Kueue into the running cluster of `state` and start its controller manager; returns the
    process (recorded as `kueue` in state.pids and state.ports)."""
    kueue_bin = bins.path("kueue")
    if not kueue_bin.is_file():
        raise ClusterError(f"{kueue_bin} is missing; run WHETSTONE_E2E_TOOLS=kueue e2e/tools/build.sh")
    folder = Path(state.state_dir) / "kueue"
    pki = folder / "pki"
    make_kueue_pki(pki)
    cert_dir = folder / "certs"
    cert_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        (cert_dir / name).write_bytes((pki / name).read_bytes())
    webhook_port, health_port = free_port(), free_port()
    url, ca = f"https://127.0.0.1:{webhook_port}", _b64(pki / "ca.crt")

    crd_list = crds(bins.kueue_dir, url, ca)
    for crd in crd_list:
        apply(api, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}", crd)
    names = [crd["metadata"]["name"] for crd in crd_list]
    wait_until("Kueue CRDs established", lambda: all(_established(api, n) for n in names), timeout)
    apply(
        api,
        f"/api/v1/namespaces/{NAMESPACE}",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
    )
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": WEBHOOK_SECRET, "namespace": NAMESPACE},
        "data": {n: _b64(pki / n) for n in ("ca.crt", "ca.key", "tls.crt", "tls.key")},
    }
    apply(api, f"/api/v1/namespaces/{NAMESPACE}/secrets/{WEBHOOK_SECRET}", secret)
    for config in webhook_configurations(bins.kueue_dir, url, ca):
        plural = config["kind"].lower() + "s"
        apply(api, f"/apis/admissionregistration.k8s.io/v1/{plural}/{config['metadata']['name']}", config)

    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(kueue_config(webhook_port, health_port, cert_dir), sort_keys=False))
    argv = [
        str(kueue_bin),
        f"--config={config_file}",
        "--feature-gates=VisibilityOnDemand=false",
        "--zap-log-level=info",
    ]
    env = {"KUBECONFIG": str(Path(state.state_dir) / "admin.kubeconfig"), "PATH": "/usr/bin:/bin"}
    log(f"starting Kueue (webhooks on {url})")
    proc = start_process("kueue", argv, state.logs_dir, attached, env)
    state.pids["kueue"] = proc.pid
    state.ports.update({"kueue-webhook": webhook_port, "kueue-health": health_port})
    state.save()

    def alive() -> None:
        if proc.poll() is not None:
            tail = (state.logs_dir / "kueue.log").read_text(errors="replace").splitlines()[-20:]
            raise ClusterError(f"kueue exited with code {proc.returncode}:\n" + "\n".join(tail))

    # /readyz turns ok once the webhook server serves with the (seeded) certificates.
    wait_until(
        "Kueue /readyz", lambda: _http_get(f"http://127.0.0.1:{health_port}/readyz") == b"ok", timeout, alive
    )
    return proc
