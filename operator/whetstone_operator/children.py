"""What a FineTuneJob owns, as pure functions of the job: the trainer ConfigMap, the headless Service and one
pod per node. No API calls here, so every field is unit-tested (tests/test_operator_children.py).

Every child carries the label `whetstone.dev/job=<name>` and a controller ownerReference to the job, and has a
deterministic name, so creating it twice is an AlreadyExists (409), never a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from whetstone_api import GROUP_VERSION
from whetstone_api.finetunejob import FineTuneJobSpec
from whetstone_api.uris import claim_volume_name, claims_of, parse_uri
from whetstone_api.wire import (
    CONFIG_DIR,
    CONFIG_KEY,
    ENV_CACHE,
    ENV_PVC_ROOT,
    ENV_STATUS_PORT,
    MASTER_PORT,
    PVC_ROOT,
    SCRATCH_DIR,
    STATUS_PORT,
    checkpoint_resource_name,
)

from .rendezvous import pod_name, rendezvous_env

Json = dict[str, Any]

JOB_LABEL = "whetstone.dev/job"
RANK_LABEL = "whetstone.dev/node-rank"
ROLE_LABEL = "whetstone.dev/role"
ATTEMPT_LABEL = "whetstone.dev/attempt"
STEP_LABEL = "whetstone.dev/step"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

TRAINER_CONTAINER = "trainer"
DEFAULT_TRAINER_IMAGE = "ghcr.io/whetstone-dev/whetstone-trainer:0.1.0"
# Non-root user of the trainer image.
TRAINER_UID = 1000


@dataclass(frozen=True)
class ChildSettings:
    """Operator-wide settings that shape the children."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    termination_grace_seconds: int = 30
    # Other ports than the defaults only where pods share a network (the e2e pod runner runs two clusters).
    master_port: int = MASTER_PORT
    status_port: int = STATUS_PORT
    # Where jobs that say nothing about placement go (the chart's trainer.nodeSelector / trainer.tolerations,
    # e.g. a GPU pool): a job's own nodeSelector or tolerations replace these, they are never merged.
    default_node_selector: tuple[tuple[str, str], ...] = ()
    default_tolerations: tuple[tuple[tuple[str, str], ...], ...] = ()


def config_map_name(job: str) -> str:
    return f"{job}-config"


def owner_reference(job: Json) -> Json:
    meta = job["metadata"]
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "FineTuneJob",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(job: Json, name: str, extra_labels: dict[str, str] | None = None) -> Json:
    # Only our own labels: copying the job's labels would copy Argo CD's tracking and let it prune children.
    labels = {JOB_LABEL: job["metadata"]["name"], **(extra_labels or {})}
    return {
        "name": name,
        "namespace": job["metadata"]["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(job)],
    }


def parse_spec(job: Json) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(job["spec"])


def trainer_config(job: Json) -> str:
    """The job as the trainer reads it: the same schema `kubectl apply` took."""
    meta = job["metadata"]
    doc = {
        "apiVersion": GROUP_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "spec": job["spec"],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def config_map(job: Json) -> Json:
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(job, config_map_name(name)),
        "data": {CONFIG_KEY: trainer_config(job)},
    }


def headless_service(job: Json, settings: ChildSettings | None = None) -> Json:
    name = job["metadata"]["name"]
    port = (settings or ChildSettings()).master_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, name),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            # The rendezvous starts before any pod is Ready; the names must resolve from the start.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port}],
        },
    }


def claims_in_uris(spec: FineTuneJobSpec) -> list[str]:
    """Claims named by pvc://<claim>/<path> URIs: the trainer resolves them under PVC_ROOT/<claim>."""
    uris = [spec.base_model.uri, spec.dataset.uri, spec.output.uri]
    if spec.eval_dataset:
        uris.append(spec.eval_dataset.uri)
    return claims_of(uris)


def volumes_and_mounts(job: Json, spec: FineTuneJobSpec) -> tuple[list[Json], list[Json]]:
    name = job["metadata"]["name"]
    volumes: list[Json] = [
        {"name": "job-config", "configMap": {"name": config_map_name(name)}},
        # A read-only root filesystem needs one writable folder: HOME, TMPDIR and the model cache.
        {"name": "scratch", "emptyDir": {}},
    ]
    mounts: list[Json] = [
        {"name": "job-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    for claim in claims_in_uris(spec):
        vol = claim_volume_name(claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": vol, "mountPath": parse_uri(f"pvc://{claim}").pod_path})
    for v in spec.volumes:
        # Prefixed so a user's name never collides with the operator's own volumes.
        vol = f"user-{v.name}"
        if v.persistent_volume_claim:
            source: Json = {"persistentVolumeClaim": {"claimName": v.persistent_volume_claim.claim_name}}
        elif v.config_map:
            source = {"configMap": {"name": v.config_map.name}}
        else:
            assert v.empty_dir is not None
            source = {"emptyDir": v.empty_dir.to_wire()}
        volumes.append({"name": vol, **source})
        mounts.append({"name": vol, "mountPath": v.mount_path, "readOnly": v.read_only})
    return volumes, mounts


def container_resources(spec: FineTuneJobSpec) -> Json:
    requests: Json = dict(spec.resources.requests)
    limits: Json = dict(spec.resources.limits)
    if spec.gpus_per_node:
        # Extended resources must be requested and limited equally.
        requests["nvidia.com/gpu"] = spec.gpus_per_node
        limits["nvidia.com/gpu"] = spec.gpus_per_node
    out: Json = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def trainer_command() -> list[str]:
    # torchrun takes nnodes, node rank, processes per node and the master from the PET_* env.
    return ["torchrun", "-m", "whetstone_trainer", "train", f"{CONFIG_DIR}/{CONFIG_KEY}"]


def trainer_pod(job: Json, rank: int, attempt: int, settings: ChildSettings) -> Json:
    """Pod `rank` of attempt `attempt` (the group restart count) of the job."""
    name = job["metadata"]["name"]
    spec = parse_spec(job)
    labels = {
        RANK_LABEL: str(rank),
        ROLE_LABEL: "master" if rank == 0 else "worker",
        ATTEMPT_LABEL: str(attempt),
    }
    queue = job["metadata"].get("labels", {}).get(KUEUE_QUEUE_LABEL)
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    volumes, mounts = volumes_and_mounts(job, spec)
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": ENV_STATUS_PORT, "value": str(settings.status_port)},
        {"name": ENV_PVC_ROOT, "value": PVC_ROOT},
        {"name": ENV_CACHE, "value": f"{SCRATCH_DIR}/models"},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        *rendezvous_env(name, rank, spec.nodes, spec.gpus_per_node, settings.master_port),
    ]
    container: Json = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": trainer_command(),
        "env": env,
        "ports": [
            {"name": "rendezvous", "containerPort": settings.master_port},
            {"name": "metrics", "containerPort": settings.status_port},
        ],
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = container_resources(spec)
    if resources:
        container["resources"] = resources
    pod_spec: Json = {
        "hostname": pod_name(name, rank),
        "subdomain": name,
        # The group restarts as a whole, by the operator; the kubelet must not restart single pods.
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
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
    elif settings.default_node_selector:
        pod_spec["nodeSelector"] = dict(settings.default_node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in spec.tolerations]
    elif settings.default_tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.default_tolerations]
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.to_wire() for s in spec.image_pull_secrets]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": child_metadata(job, pod_name(name, rank), labels),
        "spec": pod_spec,
    }


def checkpoint_resource(
    job: Json, step: int, uri: str, kind: str, metrics: dict[str, float] | None = None
) -> Json:
    name = job["metadata"]["name"]
    spec = parse_spec(job)
    body: Json = {
        "apiVersion": GROUP_VERSION,
        "kind": "Checkpoint",
        "metadata": child_metadata(job, checkpoint_resource_name(name, step, kind), {STEP_LABEL: str(step)}),
        "spec": {
            "source": {"kind": "FineTuneJob", "name": name},
            "step": step,
            "uri": uri,
            "kind": kind,
            "baseModel": spec.base_model.uri,
            "lora": spec.lora is not None,
            "metrics": {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)},
        },
    }
    return body
