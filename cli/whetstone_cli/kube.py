"""What the cluster commands (get, describe, logs, wait, delete, create) share: the resource kinds and the
names users call them by, a small client over the Kubernetes API, and errors as one-line messages.

The kubernetes package is imported only when a command talks to a cluster (`whetstone --help` and the
local commands never load it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from whetstone_api import API_GROUP, API_VERSION, GROUP_VERSION

Json = dict[str, Any]

JOB_LABEL = "whetstone.dev/job"
TRAINER_CONTAINER = "trainer"


class CliError(Exception):
    """A problem to print as `error: ...` and exit 1, never a traceback."""


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short: str
    aliases: tuple[str, ...]

    @property
    def resource(self) -> str:
        """kubectl's spelling: finetunejobs.whetstone.dev"""
        return f"{self.plural}.{API_GROUP}"

    def names(self) -> tuple[str, ...]:
        return (self.kind.lower(), self.plural, self.short, self.resource, *self.aliases)


KINDS = (
    Kind("FineTuneJob", "finetunejobs", "ftj", ("job", "jobs", "ftjs")),
    Kind("Checkpoint", "checkpoints", "ckpt", ("ckpts",)),
    Kind("RewardGrader", "rewardgraders", "rg", ("grader", "graders")),
    Kind("TrainingSession", "trainingsessions", "ts", ("session", "sessions")),
)
FINETUNEJOB = KINDS[0]


def kind_of(word: str) -> Kind:
    for kind in KINDS:
        if word.lower() in kind.names():
            return kind
    known = ", ".join(f"{k.plural} ({k.short})" for k in KINDS)
    raise CliError(f"unknown resource type {word!r}; known: {known}")


def parse_refs(words: list[str], default_kind: Kind | None = None) -> tuple[Kind, list[str]]:
    """`ftj a b`, `ftj/a ftj/b` or, with a default kind, just `a b`: one kind and its names."""
    if not words:
        if default_kind is None:
            raise CliError("name a resource type, e.g. `ftj` or `ftj/NAME`")
        return default_kind, []
    if all("/" in w for w in words):
        pairs = [w.split("/", 1) for w in words]
        kinds = {kind_of(k) for k, _ in pairs}
        if len(kinds) > 1:
            raise CliError("name resources of one type at a time")
        return kinds.pop(), [n for _, n in pairs]
    if any("/" in w for w in words):
        raise CliError("use either TYPE NAME... or TYPE/NAME..., not both")
    try:
        return kind_of(words[0]), words[1:]
    except CliError:
        if default_kind is None:
            raise
        return default_kind, words


def add_cluster_arguments(p: argparse.ArgumentParser, all_namespaces: bool = False) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    if all_namespaces:
        p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
    p.add_argument("--context", help="kubeconfig context")


def command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn CliError, API errors and a missing kubernetes package into one line on stderr and exit 1."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ModuleNotFoundError as e:
            print(f"error: {e.name} is missing: pip install 'whetstone[cli]'", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - only API errors are expected here; others are re-raised
            if type(e).__name__ != "ApiException":
                raise
            print(f"error: {api_message(e)}", file=sys.stderr)
            return 1

    return run


def api_message(e: Any) -> str:
    """The API server's own message (the Status object's), else the HTTP reason."""
    try:
        return str(json.loads(e.body)["message"])
    except (TypeError, ValueError, KeyError):
        return f"{e.status} {e.reason}".strip()


class Cluster:
    """The few API calls the commands make, with the namespace resolved once."""

    def __init__(self, args: argparse.Namespace) -> None:
        import kubernetes

        self._k = kubernetes
        config = kubernetes.client.Configuration()
        kubeconfig = getattr(args, "kubeconfig", None)
        context = getattr(args, "context", None)
        default_namespace = "default"
        try:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=config
            )
            self.kubeconfig: Path | None = Path(
                kubeconfig or os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
            ).expanduser()
            _, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
            if context:
                contexts, _ = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
                active = next((c for c in contexts if c["name"] == context), active)
            default_namespace = (active or {}).get("context", {}).get("namespace") or "default"
        except (kubernetes.config.ConfigException, OSError) as first:
            if kubeconfig or context:
                raise CliError(f"cannot load the kubeconfig: {first}") from None
            try:
                kubernetes.config.load_incluster_config(client_configuration=config)
            except kubernetes.config.ConfigException:
                raise CliError(
                    "no cluster: set KUBECONFIG or --kubeconfig (e2e/cluster up prints one)"
                ) from None
            self.kubeconfig = None
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            if ns_file.exists():
                default_namespace = ns_file.read_text().strip()
        self.api = kubernetes.client.ApiClient(config)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.namespace: str = getattr(args, "namespace", None) or default_namespace
        self.last_resource_version: str | None = None

    # --- Whetstone resources

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Json:
        try:
            return self.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace or self.namespace, kind.plural, name
            )
        except self._k.client.ApiException as e:
            if e.status == 404:
                raise CliError(
                    f'{kind.resource} "{name}" not found in namespace {namespace or self.namespace}'
                ) from None
            raise

    def list(self, kind: Kind, namespace: str | None, selector: str | None = None) -> list[Json]:
        """namespace None: every namespace."""
        kwargs = {"label_selector": selector} if selector else {}
        if namespace is None:
            listed = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, kind.plural, **kwargs)
        else:
            listed = self.custom.list_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, kind.plural, **kwargs
            )
        self.last_resource_version = listed["metadata"].get("resourceVersion")
        return listed["items"]

    def watch(
        self, kind: Kind, namespace: str | None, resource_version: str | None = None
    ) -> Iterator[tuple[str, Json]]:
        w = self._k.watch.Watch()
        kwargs: Json = {"resource_version": resource_version} if resource_version else {}
        if namespace is None:
            stream = w.stream(
                self.custom.list_cluster_custom_object, API_GROUP, API_VERSION, kind.plural, **kwargs
            )
        else:
            stream = w.stream(
                self.custom.list_namespaced_custom_object,
                API_GROUP,
                API_VERSION,
                namespace,
                kind.plural,
                **kwargs,
            )
        for event in stream:
            yield event["type"], event["object"]

    def create(self, body: Json, namespace: str, dry_run: bool = False) -> Json:
        kind = kind_of(body["kind"])
        kwargs = {"dry_run": "All"} if dry_run else {}
        return self.custom.create_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, kind.plural, body, **kwargs
        )

    def delete(self, kind: Kind, name: str, namespace: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, kind.plural, name, propagation_policy="Background"
            )
        except self._k.client.ApiException as e:
            if e.status == 404:
                raise CliError(f'{kind.resource} "{name}" not found in namespace {namespace}') from None
            raise

    # --- what the operator made for them

    def events(self, namespace: str, kind: str, name: str) -> list[Json]:
        listed = self.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}"
        )
        return [self.api.sanitize_for_serialization(e) for e in listed.items]

    def pods(self, namespace: str, selector: str) -> list[Json]:
        listed = self.core.list_namespaced_pod(namespace, label_selector=selector)
        return [self.api.sanitize_for_serialization(p) for p in listed.items]

    def pod(self, namespace: str, name: str) -> Json | None:
        try:
            return self.api.sanitize_for_serialization(self.core.read_namespaced_pod(name, namespace))
        except self._k.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def pod_proxy_get(self, namespace: str, pod: str, port: int, path: str, timeout: float = 5) -> bytes:
        """GET http://<pod>:<port>/<path> through the API server's pod proxy (as `kubectl get --raw`)."""
        response = self.core.connect_get_namespaced_pod_proxy_with_path(
            f"{pod}:{port}", namespace, path.lstrip("/"), _preload_content=False, _request_timeout=timeout
        )
        return response.data

    def pod_log_stream(self, namespace: str, pod: str, container: str, follow: bool, tail: int | None) -> Any:
        kwargs: Json = {"container": container, "follow": follow, "_preload_content": False}
        if tail is not None:
            kwargs["tail_lines"] = tail
        return self.core.read_namespaced_pod_log(pod, namespace, **kwargs)

    def is_api_error(self, e: BaseException) -> bool:
        return isinstance(e, self._k.client.ApiException)


# --- small shared helpers ----------------------------------------------------------------------


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's AGE: 45s, 12m, 3h, 5d."""
    if not timestamp:
        return "<unknown>"
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def condition(obj: Json, kind: str) -> Json | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def strip_managed_fields(obj: Json) -> Json:
    """What -o yaml/json prints: the object without the server's field-manager bookkeeping."""
    meta = obj.get("metadata") or {}
    meta.pop("managedFields", None)
    return obj


def api_version_kind(kind: Kind) -> Json:
    return {"apiVersion": GROUP_VERSION, "kind": kind.kind}
