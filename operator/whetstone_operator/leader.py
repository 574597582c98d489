"""Leader election with a coordination.k8s.io Lease, as client-go's leaderelection does it: one replica holds
the Lease and renews it every `retry` seconds; the others watch it and take it over once it has not changed
for `duration` seconds (by their own clock: the holder's timestamps are never compared with ours); a holder
that cannot renew for `renew_deadline` seconds stops acting at once and exits, so two replicas never act
together. A replica shutting down cleanly hands the Lease over at once.

Only the leader starts the watches and the reconcile workers (operator_main.py); the reconciler also checks
`leading` before every write, so a replica that lost the Lease mid-pass writes nothing more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException

from .kube import Kube

LOG = logging.getLogger("whetstone.operator")
Json = dict[str, Any]


def micro_time(t: datetime | None = None) -> str:
    return (t or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.duration, self.renew_deadline, self.retry = duration, renew_deadline, retry
        self.clock = clock
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # when we last renewed our own hold
        self._lock = threading.Lock()

    @property
    def leading(self) -> bool:
        with self._lock:
            return self._renewed_at is not None and self.clock() - self._renewed_at < self.renew_deadline

    def try_acquire_or_renew(self) -> bool:
        """One round: take, keep or leave the Lease. True while we hold it."""
        now = datetime.now(UTC)
        try:
            lease = self.kube.get_lease(self.namespace, self.name)
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(now, acquired=now, transitions=0),
                }
                self.kube.create_lease(self.namespace, body)
                return self._held()
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            record = (holder, str(spec.get("renewTime")))
            if record != self._observed:
                self._observed, self._observed_at = record, self.clock()
            duration = float(spec.get("leaseDurationSeconds") or self.duration)
            if holder and holder != self.identity and self.clock() - self._observed_at < duration:
                self._lost_if_held()
                return False
            transitions = int(spec.get("leaseTransitions") or 0)
            if holder == self.identity:
                acquired = spec.get("acquireTime") or micro_time(now)
            else:
                acquired, transitions = micro_time(now), transitions + 1
            lease["spec"] = self._spec(now, acquired=acquired, transitions=transitions)
            self.kube.replace_lease(self.namespace, self.name, lease)
            return self._held()
        except ApiException as e:
            if e.status != 409:
                LOG.warning("lease %s/%s: %s %s", self.namespace, self.name, e.status, e.reason)
            return self.leading
        except OSError as e:
            LOG.warning("lease %s/%s: %s", self.namespace, self.name, e)
            return self.leading

    def _spec(self, now: datetime, acquired: Any, transitions: int) -> Json:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration),
            "acquireTime": acquired if isinstance(acquired, str) else micro_time(acquired),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        }

    def _held(self) -> bool:
        with self._lock:
            first = self._renewed_at is None
            self._renewed_at = self.clock()
        if first:
            LOG.info("lease %s/%s: acquired by %s", self.namespace, self.name, self.identity)
        return True

    def _lost_if_held(self) -> None:
        with self._lock:
            if self._renewed_at is not None:
                LOG.warning("lease %s/%s: taken over by another replica", self.namespace, self.name)
            self._renewed_at = None

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this replica holds the Lease (True) or `stop` is set (False)."""
        LOG.info("lease %s/%s: %s waiting to lead", self.namespace, self.name, self.identity)
        while not stop.is_set():
            if self.try_acquire_or_renew():
                return True
            stop.wait(self.retry)
        return False

    def keep(self, stop: threading.Event, on_lost: Callable[[], None]) -> None:
        """Renew until `stop`; call `on_lost` once the hold cannot be kept (then return)."""
        while not stop.wait(self.retry):
            self.try_acquire_or_renew()
            if not self.leading:
                LOG.error("lease %s/%s: lost; this replica stops acting", self.namespace, self.name)
                on_lost()
                return

    def release(self) -> None:
        """Hand over at once: the Lease says it expired (a clean shutdown)."""
        if not self.leading:
            return
        try:
            lease = self.kube.get_lease(self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"].update(holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time())
                self.kube.replace_lease(self.namespace, self.name, lease)
                LOG.info("lease %s/%s: released by %s", self.namespace, self.name, self.identity)
        except (ApiException, OSError) as e:
            LOG.warning("lease %s/%s: release failed: %s", self.namespace, self.name, e)
        with self._lock:
            self._renewed_at = None
