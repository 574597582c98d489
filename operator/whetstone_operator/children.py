"""What a FineTuneJob owns, as pure functions of the job: the trainer ConfigMap, the headless Service, the
NetworkPolicy of its pods, one pod per node, and Checkpoint resources. No API calls here, so every field is
unit-tested (tests/test_operator_children.py).

Every child carries the label `whetstone.dev/job=<name>` (what the operator watches) and a controller
ownerReference to the job (what makes it the job's: objects with our names but another controller are never
adopted), and has a deterministic name, so creating it twice is an AlreadyExists (409), never a second copy.
Two exceptions to the ownerReference, so they outlive the job: the `<job>-final` Checkpoint, and Checkpoints a
user annotates `whetstone.dev/keep: "true"` (the operator orphans those when it sees the annotation).
"""

from __future__ import annotations

import math
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
    ENV_GRADER_SECRETS,
    ENV_POD_IP,
    ENV_PVC_ROOT,
    ENV_STATUS_PORT,
    ENV_TERMINATION_LOG,
    GRADER_SECRETS_DIR,
    MASTER_PORT,
    PVC_ROOT,
    SCRATCH_DIR,
    STATUS_PORT,
    TERMINATION_LOG,
    checkpoint_resource_name,
)

from .gpu import GPU_RESOURCE, apply_gpu_settings
from .rendezvous import hostname, pod_name, rendezvous_env

Json = dict[str, Any]

JOB_LABEL = "whetstone.dev/job"
RANK_LABEL = "whetstone.dev/node-rank"
ROLE_LABEL = "whetstone.dev/role"
ATTEMPT_LABEL = "whetstone.dev/attempt"
STEP_LABEL = "whetstone.dev/step"
# Which job (of that name) recorded a Checkpoint: kept and final Checkpoints have no owner to say so.
JOB_UID_LABEL = "whetstone.dev/job-uid"
# The operator watches only objects with this label (a server-side selector): every child carries it.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "whetstone-operator"
# A Checkpoint annotated so survives the deletion (and TTL) of its job.
KEEP_ANNOTATION = "whetstone.dev/keep"

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

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
    # The NetworkPolicy of a job's pods: the operator's pods (namespace and labels) may reach the status port.
    network_policy: bool = True
    operator_namespace: str = "whetstone-system"
    operator_pod_labels: tuple[tuple[str, str], ...] = (("app.kubernetes.io/name", "whetstone-operator"),)
    # Namespaces (e.g. monitoring) whose pods may also scrape the status port (/metrics).
    status_port_namespaces: tuple[str, ...] = ()


def config_map_name(job: str) -> str:
    return f"{job}-config"


def quantity(value: Any) -> str:
    """A resource quantity as the API (and the kubernetes client) wants it: a string."""
    return str(value)


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


def child_metadata(
    job: Json, name: str, extra_labels: dict[str, str] | None = None, owned: bool = True
) -> Json:
    # Only our own labels: copying the job's labels would copy Argo CD's tracking and let it prune children.
    labels = {JOB_LABEL: job["metadata"]["name"], MANAGED_BY_LABEL: MANAGED_BY, **(extra_labels or {})}
    meta: Json = {"name": name, "namespace": job["metadata"]["namespace"], "labels": labels}
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def parse_spec(job: Json) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(job["spec"])


def trainer_config(job: Json, graders: list[Json] | None = None) -> str:
    """The job as the trainer reads it: the same schema `kubectl apply` took, followed (RFT) by the
    RewardGraders it uses as they were when it started, one YAML document each."""
    meta = job["metadata"]
    docs: list[Json] = [
        {
            "apiVersion": GROUP_VERSION,
            "kind": "FineTuneJob",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "spec": job["spec"],
        }
    ]
    for grader in graders or []:
        docs.append(
            {
                "apiVersion": GROUP_VERSION,
                "kind": "RewardGrader",
                "metadata": {"name": grader["metadata"]["name"], "namespace": meta["namespace"]},
                "spec": grader["spec"],
            }
        )
    # libyaml's emitter where PyYAML has it: the pure-Python one cost ~30 ms per job (the operator's largest
    # CPU cost at start-up, N jobs at once); the text is the same YAML, read by the trainer's safe_load.
    return yaml.dump_all(docs, Dumper=_DUMPER, sort_keys=False)


def config_map(job: Json, graders: list[Json] | None = None) -> Json:
    name = job["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(job, config_map_name(name)),
        "data": {CONFIG_KEY: trainer_config(job, graders)},
    }


def network_policy(job: Json, settings: ChildSettings | None = None) -> Json:
    """Ingress to the job's pods: every port from the job's own pods (the rendezvous, and the collective
    backends' own ports), the status port from the operator (and namespaces allowed to scrape /metrics)."""
    settings = settings or ChildSettings()
    name = job["metadata"]["name"]
    own_pods = {"podSelector": {"matchLabels": {JOB_LABEL: name}}}
    status_from: list[Json] = [
        {
            "namespaceSelector": {
                "matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}
            },
            "podSelector": {"matchLabels": dict(settings.operator_pod_labels)},
        }
    ]
    status_from += [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
        for ns in settings.status_port_namespaces
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(job, name),
        "spec": {
            "podSelector": {"matchLabels": {JOB_LABEL: name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own_pods]},
                {"from": status_from, "ports": [{"protocol": "TCP", "port": settings.status_port}]},
            ],
        },
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


def secret_volume_name(secret: str) -> str:
    """The pod volume of a grader's Secret: a DNS label, distinct per Secret."""
    return "grader-" + claim_volume_name(secret)[len("pvc-") :]


def volumes_and_mounts(
    job: Json, spec: FineTuneJobSpec, grader_secrets: list[str] | None = None
) -> tuple[list[Json], list[Json]]:
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
    for secret in grader_secrets or []:
        vol = secret_volume_name(secret)
        volumes.append({"name": vol, "secret": {"secretName": secret}})
        mounts.append({"name": vol, "mountPath": f"{GRADER_SECRETS_DIR}/{secret}", "readOnly": True})
    return volumes, mounts


def container_resources(spec: FineTuneJobSpec) -> Json:
    # Quantities are strings on the wire; the kubernetes client refuses an int before sending.
    requests: Json = {k: quantity(v) for k, v in spec.resources.requests.items()}
    limits: Json = {k: quantity(v) for k, v in spec.resources.limits.items()}
    if spec.gpus_per_node:
        # Extended resources must be requested and limited equally.
        requests[GPU_RESOURCE] = quantity(spec.gpus_per_node)
        limits[GPU_RESOURCE] = quantity(spec.gpus_per_node)
    out: Json = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def trainer_command() -> list[str]:
    # torchrun takes nnodes, node rank, processes per node and the master from the PET_* env.
    return ["torchrun", "-m", "whetstone_trainer", "train", f"{CONFIG_DIR}/{CONFIG_KEY}"]


def trainer_pod(
    job: Json, rank: int, attempt: int, settings: ChildSettings, grader_secrets: list[str] | None = None
) -> Json:
    """Pod `rank` of attempt `attempt` of the job; `grader_secrets` are mounted for an RFT job's graders.
    GPU pods get what gpu.py adds (GPU model selection, /dev/shm, NCCL/UCX env, threads per process); torchrun
    starts one process per GPU (PET_NPROC_PER_NODE). Kueue's queue label stays on the job: the job's Workload
    is what Kueue admits, and a labelled pod would be taken for one of Kueue's own plain pods."""
    name = job["metadata"]["name"]
    spec = parse_spec(job)
    labels = {
        RANK_LABEL: str(rank),
        ROLE_LABEL: "master" if rank == 0 else "worker",
        ATTEMPT_LABEL: str(attempt),
    }
    volumes, mounts = volumes_and_mounts(job, spec, grader_secrets)
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": ENV_STATUS_PORT, "value": str(settings.status_port)},
        {"name": ENV_POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": ENV_PVC_ROOT, "value": PVC_ROOT},
        {"name": ENV_CACHE, "value": f"{SCRATCH_DIR}/models"},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        # The trainer writes its last error there; the kubelet copies it into the pod's status.
        {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
        *rendezvous_env(name, rank, spec.nodes, spec.gpus_per_node, settings.master_port),
    ]
    if grader_secrets:
        env.append({"name": ENV_GRADER_SECRETS, "value": GRADER_SECRETS_DIR})
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
        "terminationMessagePath": TERMINATION_LOG,
        # An unexpected crash (a traceback, no message written) still tells its last lines.
        "terminationMessagePolicy": "FallbackToLogsOnError",
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
        "hostname": hostname(name, rank),
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
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": child_metadata(job, pod_name(name, rank), labels),
        "spec": pod_spec,
    }
    return apply_gpu_settings(pod, spec)


def checkpoint_resource(
    job: Json, step: int, uri: str, kind: str, metrics: dict[str, float] | None = None
) -> Json:
    """A Checkpoint of the job. The export (`<job>-final`) has no ownerReference: the result outlives the
    job and its TTL; resumable ones are the job's until a user marks them to keep."""
    name = job["metadata"]["name"]
    spec = parse_spec(job)
    labels = {STEP_LABEL: str(step), JOB_UID_LABEL: job["metadata"]["uid"]}
    body: Json = {
        "apiVersion": GROUP_VERSION,
        "kind": "Checkpoint",
        "metadata": child_metadata(
            job, checkpoint_resource_name(name, step, kind), labels, owned=kind != "export"
        ),
        "spec": {
            "source": {"kind": "FineTuneJob", "name": name},
            "step": step,
            "uri": uri,
            "kind": kind,
            "baseModel": spec.base_model.uri,
            "lora": spec.lora is not None,
            "metrics": {
                k: float(v)
                for k, v in (metrics or {}).items()
                if isinstance(v, int | float) and math.isfinite(v)
            },
        },
    }
    return body
