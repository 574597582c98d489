"""TrainingSession: the Tinker-compatible training service as a Deployment (one replica, `whetstone serve`)
and a Service, its status read from the service's own /whetstone/status, and its saved checkpoints recorded
as Checkpoint resources (source kind TrainingSession).

The story of a session, as these handlers see it:
- created (or found at operator start): the Deployment and Service are created (deterministic names,
  AlreadyExists counts as done), status Pending;
- every resync: the session's pod is found by label; when it runs, its /whetstone/status is read (bounded,
  strictly parsed: it is a user-reachable process) into status (Ready, endpoint, the models it holds) and
  new checkpoints become Checkpoint resources;
- `spec.suspend` flips: the Deployment scales to 0 (checkpoints stay) or back to 1;
- `kubectl delete`: the Deployment, Service and Checkpoints go with it (owner references, garbage
  collection); the checkpoint files stay on their claim.

The builders and the status are pure functions of the session (tested in tests/test_service_operator.py);
the handler acts.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from whetstone_api import API_GROUP, API_VERSION, GROUP_VERSION
from whetstone_api.trainingsession import (
    API_KEYS_DIR,
    API_KEYS_KEY,
    MAX_STATUS_BYTES,
    SESSION_STATUS_PATH,
    SessionReport,
    TrainingSessionSpec,
)
from whetstone_api.uris import claim_volume_name, claims_of, parse_uri, uri_of_pod_path
from whetstone_api.wire import ENV_CACHE, ENV_PVC_ROOT, PVC_ROOT, SCRATCH_DIR

from .children import TRAINER_UID, ChildSettings
from .config import OperatorConfig
from .kube import Kube

Json = dict[str, Any]
LOG = logging.getLogger("whetstone.operator")
TS = "trainingsessions"
CKPT = "checkpoints"
SESSION_LABEL = "whetstone.dev/session"
CONTAINER = "service"
READY = "Ready"


# --- pure: children --------


def owner_reference(session: Json) -> Json:
    meta = session["metadata"]
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "TrainingSession",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(session: Json, name: str) -> Json:
    return {
        "name": name,
        "namespace": session["metadata"]["namespace"],
        "labels": {SESSION_LABEL: session["metadata"]["name"]},
        "ownerReferences": [owner_reference(session)],
    }


def parse_spec(session: Json) -> TrainingSessionSpec:
    return TrainingSessionSpec.model_validate(session["spec"])


def checkpoint_dir(spec: TrainingSessionSpec) -> str:
    if spec.checkpoint_uri:
        parsed = parse_uri(spec.checkpoint_uri)
        if parsed.scheme == "pvc":
            return parsed.pod_path or PVC_ROOT
        return parsed.path
    return f"{SCRATCH_DIR}/checkpoints"


def service_command(spec: TrainingSessionSpec) -> list[str]:
    command = [
        "whetstone",
        "serve",
        "--base-model",
        spec.base_model.uri,
        "--host",
        "$(POD_IP)",
        "--port",
        str(spec.port),
        "--checkpoint-dir",
        checkpoint_dir(spec),
        "--max-training-clients",
        str(spec.max_training_clients),
        "--max-sampler-snapshots",
        str(spec.max_sampler_snapshots),
        "--idle-timeout-seconds",
        str(spec.idle_timeout_seconds),
    ]
    if spec.model_name:
        command += ["--model-name", spec.model_name]
    if spec.api_key_secret:
        command += ["--api-keys-file", f"{API_KEYS_DIR}/{API_KEYS_KEY}"]
    return command


def deployment(session: Json, settings: ChildSettings) -> Json:
    name = session["metadata"]["name"]
    spec = parse_spec(session)
    volumes: list[Json] = [{"name": "scratch", "emptyDir": {}}]
    mounts: list[Json] = [{"name": "scratch", "mountPath": SCRATCH_DIR}]
    uris = [spec.base_model.uri] + ([spec.checkpoint_uri] if spec.checkpoint_uri else [])
    for claim in claims_of(uris):
        vol = claim_volume_name(claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": vol, "mountPath": parse_uri(f"pvc://{claim}").pod_path})
    if spec.api_key_secret:
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": spec.api_key_secret,
                    "items": [{"key": API_KEYS_KEY, "path": API_KEYS_KEY}],
                },
            }
        )
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    container: Json = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": service_command(spec),
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": ENV_PVC_ROOT, "value": PVC_ROOT},
            {"name": ENV_CACHE, "value": f"{SCRATCH_DIR}/models"},
            {"name": "HOME", "value": SCRATCH_DIR},
            {"name": "TMPDIR", "value": SCRATCH_DIR},
        ],
        "ports": [{"name": "tinker", "containerPort": spec.port}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": spec.port}, "periodSeconds": 5},
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    requests, limits = dict(spec.resources.requests), dict(spec.resources.limits)
    if spec.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = spec.gpus
    if requests or limits:
        container["resources"] = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    pod_spec: Json = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in spec.tolerations]
    labels = {SESSION_LABEL: name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(session, name),
        "spec": {
            "replicas": 0 if spec.suspend else 1,
            # One process owns the checkpoint folder and the models: never two at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def service(session: Json) -> Json:
    name = session["metadata"]["name"]
    port = parse_spec(session).port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(session, name),
        "spec": {
            "selector": {SESSION_LABEL: name},
            "ports": [{"name": "tinker", "port": port, "targetPort": port}],
        },
    }


def endpoint(session: Json) -> str:
    meta = session["metadata"]
    return f"http://{meta['name']}.{meta['namespace']}.svc:{parse_spec(session).port}"


def checkpoint_name(session: str, tinker_path: str) -> str:
    """A Checkpoint resource name per saved state: session, checkpoint name, a digest of its path."""
    tail = tinker_path.rsplit("/", 1)[-1].lower()
    slug = "".join(ch if ch.isalnum() else "-" for ch in tail).strip("-")[:40] or "ckpt"
    return f"{session[:150]}-{slug}-{hashlib.sha256(tinker_path.encode()).hexdigest()[:8]}"


def checkpoint_resource(session: Json, c: Any) -> Json:
    spec = parse_spec(session)
    name = session["metadata"]["name"]
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "Checkpoint",
        "metadata": {
            **metadata(session, checkpoint_name(name, c.tinker_path)),
            "annotations": {"whetstone.dev/tinker-path": c.tinker_path},
        },
        "spec": {
            "source": {"kind": "TrainingSession", "name": name},
            "step": c.step,
            "uri": uri_of_pod_path(c.folder),
            "kind": "resumable" if c.kind == "training" else "sampler",
            "baseModel": spec.base_model.uri,
            "lora": True,
            "metrics": {},
        },
    }


# --- pure: status --------


def condition(status: str, reason: str, message: str, now: str, previous: list[Json]) -> Json:
    old = next((c for c in previous if c.get("type") == READY), None)
    changed = old is None or old.get("status") != status
    return {
        "type": READY,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
    }


def status_of(session: Json, pod: Json | None, report: SessionReport | None, now: str) -> Json:
    spec = parse_spec(session)
    previous = (session.get("status") or {}).get("conditions") or []
    out: Json = {
        "observedGeneration": session["metadata"].get("generation", 1),
        "endpoint": endpoint(session),
    }
    if spec.suspend:
        out.update(
            phase="Suspended",
            message="suspended: the service pod is stopped, checkpoints are kept",
            conditions=[condition("False", "Suspended", "spec.suspend is true", now, previous)],
        )
        return out
    if report is None:
        phase_of_pod = ((pod or {}).get("status") or {}).get("phase", "none")
        message = f"waiting for the service (pod {phase_of_pod})"
        out.update(
            phase="Pending",
            message=message,
            conditions=[condition("False", "Starting", message, now, previous)],
        )
        return out
    out.update(
        phase="Ready",
        message=f"serving {report.model_name}: {report.training_clients} training clients, "
        f"{report.samplers} samplers",
        trainingClients=report.training_clients,
        models=[
            {"modelId": m.model_id, "lora": m.lora, "rank": m.rank, "step": m.step} for m in report.models
        ],
        checkpoints=len(report.checkpoints),
        conditions=[
            condition("True", "Serving", f"{report.model_name} on {endpoint(session)}", now, previous)
        ],
    )
    if report.last_request_time:
        out["lastRequestTime"] = report.last_request_time
    return out


# --- acting --------


class SessionReconciler:
    def __init__(self, kube: Kube, settings: ChildSettings) -> None:
        self.kube, self.settings = kube, settings

    @staticmethod
    def _create(fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def _pod(self, namespace: str, name: str) -> Json | None:
        pods = self.kube.list_pods(namespace, f"{SESSION_LABEL}={name}")
        running = [
            p
            for p in pods
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        ]
        return running[0] if running else (pods[0] if pods else None)

    def report(self, pod: Json | None, port: int) -> SessionReport | None:
        ip = ((pod or {}).get("status") or {}).get("podIP")
        if not ip or ((pod or {}).get("status") or {}).get("phase") != "Running":
            return None
        url = f"http://{ip}:{port}{SESSION_STATUS_PATH}"
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return SessionReport.parse(resp.read(MAX_STATUS_BYTES + 1))
        except (OSError, ValueError) as e:
            LOG.debug("session status from %s unusable: %s", url, e)
            return None

    def reconcile(self, session: Json) -> None:
        meta = session["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            return
        spec = parse_spec(session)
        deploy = deployment(session, self.settings)
        if self._create(self.kube.create_deployment, namespace, deploy):
            LOG.info("TrainingSession %s/%s: deployment created", namespace, name)
        else:
            current = self.kube.get_deployment(namespace, name) or {}
            if (current.get("spec") or {}).get("replicas", 0) != deploy["spec"]["replicas"]:
                self.kube.scale_deployment(namespace, name, deploy["spec"]["replicas"])
                LOG.info("TrainingSession %s/%s: scaled to %d", namespace, name, deploy["spec"]["replicas"])
        self._create(self.kube.create_service, namespace, service(session))
        pod = None if spec.suspend else self._pod(namespace, name)
        report = self.report(pod, spec.port)
        if report is not None:
            self._sync_checkpoints(session, report)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = status_of(session, pod, report, now)
        old = session.get("status") or {}
        if status.get("phase") != old.get("phase"):
            LOG.info(
                "TrainingSession %s/%s: %s -> %s (%s)",
                namespace,
                name,
                old.get("phase"),
                status["phase"],
                status.get("message"),
            )
            try:
                self.kube.create_event(
                    session,
                    "TrainingSession",
                    "Normal",
                    status["phase"],
                    status.get("message", ""),
                    "sessions",
                )
            except ApiException as e:  # an Event is worth a log line, not a retry
                LOG.warning("TrainingSession %s/%s: could not post an Event: %s", namespace, name, e.reason)
        if (
            any(old.get(k) != v for k, v in status.items() if k != "conditions")
            or old.get("conditions") != status["conditions"]
        ):
            self.kube.patch_session_status(namespace, name, status)

    def _sync_checkpoints(self, session: Json, report: SessionReport) -> None:
        namespace, name = session["metadata"]["namespace"], session["metadata"]["name"]
        existing = {
            c["metadata"]["name"] for c in self.kube.list_checkpoints(namespace, f"{SESSION_LABEL}={name}")
        }
        for c in report.checkpoints:
            body = checkpoint_resource(session, c)
            if body["metadata"]["name"] in existing:
                continue
            if self._create(self.kube.create_checkpoint, namespace, body):
                status = {
                    "phase": "Available",
                    "createdTime": c.time or datetime.now(UTC).isoformat(),
                    "observedGeneration": 1,
                }
                self.kube.patch_checkpoint_status(namespace, body["metadata"]["name"], status)
                LOG.info(
                    "TrainingSession %s/%s: checkpoint %s (%s)",
                    namespace,
                    name,
                    body["metadata"]["name"],
                    c.tinker_path,
                )


def register(registry: kopf.OperatorRegistry, config: OperatorConfig, kube: Kube) -> None:
    """TrainingSession handlers: kopf's own create/resume/field/timer handlers (their progress in kopf's
    annotations), each a reconcile of the session."""
    reconciler = SessionReconciler(kube, config.children)

    def run(body: kopf.Body, cause: str) -> None:
        session = dict(body)
        try:
            reconciler.reconcile(_plain(session))
        except Exception:
            LOG.exception(
                "TrainingSession %s/%s: reconcile (%s) failed",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                cause,
            )
            raise

    @kopf.on.create(API_GROUP, API_VERSION, TS, id="session", backoff=5, registry=registry)
    @kopf.on.resume(API_GROUP, API_VERSION, TS, id="session", backoff=5, registry=registry)
    def session_appeared(body: kopf.Body, **_: Any) -> None:
        run(body, "create")

    @kopf.on.field(
        API_GROUP, API_VERSION, TS, id="session_suspend", field="spec.suspend", backoff=5, registry=registry
    )
    def session_suspend(body: kopf.Body, **_: Any) -> None:
        run(body, "suspend")

    @kopf.timer(
        API_GROUP, API_VERSION, TS, id="session_resync", interval=config.resync_seconds, registry=registry
    )
    def session_resync(body: kopf.Body, **_: Any) -> None:
        run(body, "resync")


def _plain(body: Json) -> Json:
    import json

    return json.loads(json.dumps(body, default=str))
