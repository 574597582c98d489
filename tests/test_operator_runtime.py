"""The operator's moving parts besides the plan: the watch cache, the work queue, the /status poller (a pod
that answers slowly, endlessly, hugely or wrongly), and leader election over a Lease."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest
from kubernetes.client.rest import ApiException
from whetstone_operator.leader import LeaseElector
from whetstone_operator.poller import FetchError, StatusPoller, fetch
from whetstone_operator.store import Store
from whetstone_operator.workqueue import WorkQueue

Json = dict[str, Any]
GUARD = 60  # seconds before a test that should end calls it a hang


# --- the cache


def job(rv: str, phase: str) -> Json:
    return {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "resourceVersion": rv},
        "status": {"phase": phase},
    }


def pod(name: str, phase: str = "Running", uid: str = "p1", **meta: Any) -> Json:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": uid,
            "labels": {"whetstone.dev/job": "j"},
            **meta,
        },
        "status": {"phase": phase},
    }


def test_the_cache_never_goes_back_to_a_status_older_than_its_own_write() -> None:
    store = Store()
    store.put_job(job("20", "Restarting"))  # the answer to our own write
    store.put_job(job("19", "Running"))  # a watch event from before it, delivered late
    assert store.job(("ns", "j"))["status"]["phase"] == "Restarting"
    store.put_job(job("21", "Running"))
    assert store.job(("ns", "j"))["status"]["phase"] == "Running"
    recreated = job("5", "Pending")
    recreated["metadata"]["uid"] = "u2"  # a new job of the same name starts over
    store.put_job(recreated)
    assert store.job(("ns", "j"))["metadata"]["uid"] == "u2"


def test_a_vanished_pod_leaves_a_tombstone_with_its_last_state() -> None:
    store = Store()
    evicted = pod("j-node-0")
    evicted["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    ]
    store.put_pod(evicted)
    store.remove_pod(evicted)
    (view,) = store.pods(("ns", "j"))
    assert view.gone and view.disruption_reason == "EvictionByEvictionAPI"
    store.put_pod(pod("j-node-0", "Pending", uid="p2"))
    (view,) = store.pods(("ns", "j"))
    assert not view.gone and view.uid == "p2"
    # A late DELETED of the old pod does not bury the new one.
    store.remove_pod(evicted)
    assert not store.pods(("ns", "j"))[0].gone
    # A fresh list replaces the cache; what it lacks becomes a tombstone.
    store.put_pod(pod("j-node-1", uid="p3"))
    views = {v.name: v for v in store.replace_pods(("ns", "j"), [pod("j-node-0", "Running", uid="p2")])}
    assert views["j-node-1"].gone and views["j-node-0"].phase == "Running"
    # A pod deleted (the watch said so) while the list was under way is not brought back by the list.
    store.remove_pod(pod("j-node-0", "Running", uid="p2"))
    views = {v.name: v for v in store.replace_pods(("ns", "j"), [pod("j-node-0", "Running", uid="p2")])}
    assert views["j-node-0"].gone
    views = {v.name: v for v in store.replace_pods(("ns", "j"), [pod("j-node-0", "Pending", uid="p4")])}
    assert not views["j-node-0"].gone and views["j-node-0"].uid == "p4", "a new pod of that name is"


def test_a_created_child_is_expected_until_the_watch_delivers_it() -> None:
    store, key = Store(), ("ns", "j")
    store.expect(key, "Pod", "j-node-0", "u", attempt=1)
    store.expect(key, "Service", "j", "u")
    assert {(e.kind, e.name, e.attempt) for e in store.expected(key, "u")} == {
        ("Pod", "j-node-0", 1),
        ("Service", "j", 0),
    }
    assert store.expected(key, "u2") == [], "never counted for another job of the same name"
    store.put_pod(pod("j-node-0"))
    assert [e.kind for e in store.expected(key, "u")] == ["Service"]
    # Seen already (the watch was quicker than the create's answer): nothing to wait for.
    owned = {"name": "j", "namespace": "ns", "labels": {"whetstone.dev/job": "j"}}
    owned["ownerReferences"] = [{"controller": True, "uid": "u"}]
    store.put_child("Service", {"metadata": owned})
    store.expect(key, "Service", "j", "u")
    assert store.expected(key, "u") == []
    # A deleted job takes its expectations with it.
    store.put_job(job("3", "Pending"))
    store.expect(key, "ConfigMap", "j-config", "u")
    store.remove_job(job("3", "Pending"))
    assert store.expected(key, "u") == []


def test_kopf_builds_an_essence_only_for_kinds_with_change_detecting_handlers() -> None:
    """The essence (two deep copies of a body per watch event) is built only where a handler reads it: the
    TrainingSession's on.create / on.field / timer. Every other kind the operator only watches."""
    import kopf
    from whetstone_api.crd import KINDS
    from whetstone_operator import graders, sessions
    from whetstone_operator.config import OperatorConfig
    from whetstone_operator.diffbase import CHANGE_DETECTED_KINDS, ChangeDetectedOnly

    registry = kopf.OperatorRegistry()
    graders.register(registry, graders.GraderChecker(api=lambda: None, leading=lambda: True))
    sessions.register(registry, OperatorConfig(), None)
    plurals = {
        s.plural or s.any_name
        for reg in (registry._changing, registry._spawning)  # kopf's own registries: no public listing
        for s in reg.get_all_selectors()
    }
    kind_of = {k.plural: k.model.__name__ for k in KINDS}
    assert plurals and {kind_of[p] for p in plurals} == set(CHANGE_DETECTED_KINDS)

    storage = ChangeDetectedOnly()
    session = kopf.Body({"kind": "TrainingSession", "metadata": {"name": "s"}, "spec": {"suspend": True}})
    assert storage.build(body=session)["spec"] == {"suspend": True}
    watched = kopf.Body({"kind": "FineTuneJob", "metadata": {"name": "j"}, "spec": {"nodes": 2}})
    assert storage.build(body=watched) == {}


# --- the informers (list, then watch; a lost resourceVersion lists again)


def obj(uid: str, rv: str, **status: Any) -> Json:
    return {"metadata": {"name": f"o-{uid}", "uid": uid, "resourceVersion": rv}, "status": status}


def managed(o: Json) -> Json:
    o["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    return o


class FakeCollection:
    """An API server collection for one informer: LIST answers `lists` in turn; each WATCH answers the next
    script of events (an exception raised mid-stream, like a dropped connection); every call is recorded."""

    def __init__(self, lists: list[list[Json]], watches: list[list[Any]]) -> None:
        self.lists, self.watches = lists, watches
        self.calls: list[tuple[str, str]] = []
        self.done = threading.Event()

    def list_objects(self) -> tuple[list[Json], str]:
        items = self.lists.pop(0)
        version = str(max([int(o["metadata"]["resourceVersion"]) for o in items] or [1]))
        self.calls.append(("list", version))
        return items, version

    def watch_objects(self, since: str, seconds: int) -> Any:
        self.calls.append(("watch", since))
        if not self.watches:
            self.done.set()
            time.sleep(0.05)
            return
        for event in self.watches.pop(0):
            if isinstance(event, Exception):
                raise event
            yield event


def run_informer(collection: FakeCollection) -> list[tuple[str, str, Json]]:
    from whetstone_operator import informers

    delivered: list[tuple[str, str, Json]] = []
    stopping = threading.Event()
    informer = informers.Informer(
        "things",
        collection.list_objects,
        collection.watch_objects,
        lambda kind, o: delivered.append((kind, o["metadata"]["uid"], o)),
        stopping,
    )
    informers.BACKOFF = (0.01, 0.01)
    informer.start()
    assert collection.done.wait(10)
    assert informer.listed.is_set()
    stopping.set()
    informer.join(5)
    return delivered


def test_an_informer_lists_then_watches_from_the_last_version_it_saw() -> None:
    collection = FakeCollection(
        [[obj("a", "5"), obj("b", "6")]],
        [
            [
                {"type": "MODIFIED", "object": managed(obj("a", "7", phase="Running"))},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}},
            ],
            # The server ends the watch; the next starts from the bookmark. A dropped connection mid-stream
            # resumes from the last event delivered, without a LIST.
            [{"type": "DELETED", "object": obj("b", "10")}, ConnectionResetError("reset by peer")],
        ],
    )
    delivered = run_informer(collection)
    assert [(k, uid) for k, uid, _ in delivered] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    assert delivered[2][2]["status"] == {"phase": "Running"}
    assert "managedFields" not in delivered[2][2]["metadata"], "the cache keeps no field managers"
    assert collection.calls == [("list", "6"), ("watch", "6"), ("watch", "9"), ("watch", "10")]


def test_a_version_the_server_no_longer_has_lists_again_and_what_vanished_meanwhile_is_deleted() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
    collection = FakeCollection(
        [[obj("a", "5"), obj("b", "6")], [obj("a", "20", phase="Failed"), obj("c", "21")]],
        [[{"type": "MODIFIED", "object": obj("b", "8", phase="Running")}, gone]],
    )
    delivered = run_informer(collection)
    # b was deleted while no watch ran: delivered as DELETED with its last state (a pod's tombstone needs it).
    assert [(k, uid) for k, uid, _ in delivered] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("MODIFIED", "b"),
        ("DELETED", "b"),
        ("MODIFIED", "a"),
        ("ADDED", "c"),
    ]
    assert delivered[3][2]["status"] == {"phase": "Running"}
    assert collection.calls == [("list", "6"), ("watch", "6"), ("list", "21"), ("watch", "21")]


def test_a_failing_delivery_does_not_stop_the_watch() -> None:
    from whetstone_operator import informers

    collection = FakeCollection([[obj("a", "5"), obj("b", "6")]], [])
    seen: list[str] = []

    def deliver(kind: str, o: Json) -> None:
        if o["metadata"]["uid"] == "a":
            raise KeyError("metadata")
        seen.append(o["metadata"]["uid"])

    stopping = threading.Event()
    informer = informers.Informer(
        "things", collection.list_objects, collection.watch_objects, deliver, stopping
    )
    informer.start()
    assert collection.done.wait(10)
    stopping.set()
    informer.join(5)
    assert seen == ["b"] and informer.listed.is_set()


def test_a_watch_event_updates_the_cache_and_queues_the_job_it_concerns() -> None:
    from whetstone_operator.handlers import WATCHED, _delivery
    from whetstone_operator.metrics import OperatorMetrics

    store, queued, forgotten = Store(), [], []
    queue = WorkQueue(lambda k: None, 1)
    queue.add = lambda key, delay=0.0: queued.append(key)  # type: ignore[method-assign]
    metrics = OperatorMetrics()
    deliver = {w.plural: _delivery(w, store, queue, metrics, lambda *a: forgotten.append(a)) for w in WATCHED}
    rft = {**job("5", "Pending"), "spec": {"method": "rft"}}
    deliver["finetunejobs"]("ADDED", rft)
    deliver["pods"]("ADDED", pod("j-node-0"))
    deliver["pods"]("DELETED", pod("j-node-0", phase="Failed"))
    assert [(p.name, p.gone, p.phase) for p in store.pods(("ns", "j"))] == [("j-node-0", True, "Failed")]
    # A grader's change queues the RFT jobs of its namespace still waiting for their graders.
    grader = {"metadata": {"name": "g", "namespace": "ns", "uid": "g1", "resourceVersion": "1"}, "spec": {}}
    deliver["rewardgraders"]("ADDED", grader)
    deliver["finetunejobs"]("DELETED", rft)
    assert queued == [("ns", "j")] * 4 and forgotten == [("ns", "j", "u")] and store.job(("ns", "j")) is None
    assert 'whetstone_operator_watch_events_total{resource="pods"} 2.0' in metrics.exposition().decode()


# --- the work queue


def test_a_key_is_queued_once_and_never_worked_on_twice_at_once() -> None:
    started, release = threading.Event(), threading.Event()
    seen: list[str] = []
    active: list[int] = [0]
    overlap: list[bool] = []
    lock = threading.Lock()

    def handler(key: Any) -> None:
        with lock:
            active[0] += 1
            overlap.append(active[0] > 1)
        seen.append(key)
        started.set()
        release.wait(GUARD)
        with lock:
            active[0] -= 1

    queue = WorkQueue(handler, workers=4)
    queue.start()
    try:
        queue.add("a")
        assert started.wait(GUARD)
        for _ in range(5):
            queue.add("a")  # while it is being worked on: once more afterwards, not five times
        release.set()
        deadline = time.monotonic() + GUARD
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert seen == ["a", "a"] and not any(overlap)
    finally:
        release.set()
        queue.stop()


def test_delayed_adds_and_requeue_after() -> None:
    done = threading.Event()
    calls: list[str] = []

    def handler(key: Any) -> float | None:
        calls.append(key)
        if len(calls) == 2:
            done.set()
        return 0.01 if len(calls) == 1 else None  # the first pass asks to come back

    queue = WorkQueue(handler, workers=1)
    queue.start()
    try:
        queue.add("k", delay=0.01)
        assert done.wait(GUARD) and calls == ["k", "k"]
    finally:
        queue.stop()


def test_idle_for_counts_from_the_last_pass_and_is_zero_while_keys_wait_or_run() -> None:
    release = threading.Event()
    started = threading.Event()
    done: list[str] = []

    def handler(key: Any) -> float | None:
        started.set()
        release.wait(GUARD)
        done.append(key)
        return 60.0  # a delayed re-add: does not count as work left

    queue = WorkQueue(handler, workers=1)
    queue.start()
    try:
        for key in "abc":
            queue.add(key)
        assert started.wait(GUARD)
        assert queue.idle_for() == 0.0  # a key is being worked on, two wait
        release.set()
        deadline = time.monotonic() + GUARD
        while (len(done) < 3 or queue.idle_for() == 0.0) and time.monotonic() < deadline:
            time.sleep(0.01)  # the last pass's bookkeeping ends just after its handler
        assert sorted(done) == ["a", "b", "c"]
        first = queue.idle_for()
        assert first > 0.0
        time.sleep(0.05)
        assert queue.idle_for() >= first + 0.05  # grows while nothing is queued (delayed adds aside)
        release.clear()
        started.clear()
        queue.add("d")
        assert started.wait(GUARD) and queue.idle_for() == 0.0
    finally:
        release.set()
        queue.stop()


# --- reading /status without trusting it


class Server:
    """A TCP server whose every connection is answered by `serve(conn)` in a thread of its own."""

    def __init__(self, serve: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.serve = serve
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(4096)
                self.serve(conn, self.stop)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def in_thread(fn: Any) -> Any:
    """Run fn in a thread; a call that never returns fails the test instead of hanging it."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(GUARD)
    assert not t.is_alive(), "the call did not end"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_drip_feed_ends_at_the_deadline() -> None:
    def drip(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{")
        while not stop.wait(0.05):
            conn.sendall(b" ")  # a byte now and then: each read alone would never time out

    server = Server(drip)
    try:
        with pytest.raises(FetchError, match="within"):
            in_thread(lambda: fetch("127.0.0.1", server.port, "/status", deadline=0.5))
    finally:
        server.close()


def test_a_huge_answer_is_cut_off_at_the_size_bound() -> None:
    def flood(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        chunk = b"x" * 65536
        while not stop.is_set():
            conn.sendall(chunk)

    server = Server(flood)
    try:
        with pytest.raises(FetchError, match="larger than"):
            in_thread(lambda: fetch("127.0.0.1", server.port, "/status", deadline=30, max_bytes=1 << 20))
    finally:
        server.close()


def test_a_good_answer_is_parsed_strictly_and_a_bad_one_refused() -> None:
    answers = iter(
        [
            json.dumps({"job": "j", "phase": "Training", "step": 3}).encode(),
            b'{"job": "j", "phase": "Training", "step": "latest"}',
        ]
    )

    def answer(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + next(answers))

    server = Server(answer)
    finished = threading.Semaphore(0)
    poller = StatusPoller(threads=2, deadline=5, on_done=lambda key: finished.release())
    try:
        assert poller.request("a", "127.0.0.1", server.port)
        assert finished.acquire(timeout=GUARD)
        result = poller.take("a")
        assert result is not None and result.report is not None and result.report.step == 3
        assert poller.take("a") is None, "a result is consumed once"
        poller.request("a", "127.0.0.1", server.port)
        assert finished.acquire(timeout=GUARD)
        bad = poller.take("a")
        assert bad is not None and bad.report is None and "step" in (bad.error or "")
    finally:
        poller.shutdown()
        server.close()


def test_sixteen_silent_pods_do_not_hold_anything_but_the_poll_threads() -> None:
    def silent(conn: socket.socket, stop: threading.Event) -> None:
        stop.wait(GUARD)

    server = Server(silent)
    poller = StatusPoller(threads=2, deadline=GUARD)
    try:
        # Starting reads and taking results never waits for a pod: a reconcile is never held by one.
        started = in_thread(lambda: [poller.request(f"job-{i}", "127.0.0.1", server.port) for i in range(16)])
        assert all(started)
        assert in_thread(lambda: [poller.take(f"job-{i}") for i in range(16)]) == [None] * 16
        assert not poller.request("job-0", "127.0.0.1", server.port), "one read per job at a time"
    finally:
        server.close()
        poller.shutdown()


# --- leader election


class Leases:
    """The Lease calls of kube.Kube over one in-memory Lease with resourceVersions."""

    def __init__(self) -> None:
        self.lease: Json | None = None
        self.rv = 0

    def get_lease(self, namespace: str, name: str) -> Json | None:
        return json.loads(json.dumps(self.lease)) if self.lease else None

    def create_lease(self, namespace: str, body: Json) -> Json:
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self.rv += 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}
        return self.lease

    def replace_lease(self, namespace: str, name: str, body: Json) -> Json:
        assert self.lease is not None
        if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        self.rv += 1
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.rv)}}
        return self.lease


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def electors() -> tuple[Leases, Clock, LeaseElector, LeaseElector]:
    leases, clock = Leases(), Clock()
    a = LeaseElector(leases, "ops", "op", "a", duration=15, renew_deadline=10, retry=2, clock=clock)  # type: ignore[arg-type]
    b = LeaseElector(leases, "ops", "op", "b", duration=15, renew_deadline=10, retry=2, clock=clock)  # type: ignore[arg-type]
    return leases, clock, a, b


def test_one_replica_leads_and_renews_while_the_other_waits() -> None:
    leases, clock, a, b = electors()
    assert a.try_acquire_or_renew() and a.leading
    assert not b.try_acquire_or_renew() and not b.leading
    for _ in range(20):  # a renews every 2 s: b never takes over
        clock.t += 2
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    assert leases.lease["spec"]["holderIdentity"] == "a" and leases.lease["spec"]["leaseTransitions"] == 0


def test_an_expired_lease_is_taken_over_and_the_old_leader_stops_acting() -> None:
    leases, clock, a, b = electors()
    a.try_acquire_or_renew()
    b.try_acquire_or_renew()
    clock.t += 11  # a could not renew (partitioned): past its renew deadline it no longer acts
    assert not a.leading
    clock.t += 5  # 16 s without a change of the Lease: b takes it
    assert b.try_acquire_or_renew() and b.leading
    assert leases.lease["spec"]["holderIdentity"] == "b" and leases.lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew() and not a.leading


def test_a_clean_shutdown_hands_over_at_once() -> None:
    leases, clock, a, b = electors()
    a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert not a.leading
    assert b.try_acquire_or_renew(), "no need to wait for the lease to expire"
