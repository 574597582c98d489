"""The operator's background Event recorder: a pass records and goes on; Events go out in order, a failing
post never stops the ones after it, and a flood is dropped (counted), never queued without bound."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from whetstone_operator.events import EventRecorder

GUARD = 10.0


def job(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"}}


def test_events_are_posted_in_order_with_the_time_they_were_recorded_and_a_failure_is_skipped() -> None:
    posted: list[tuple[str, str, datetime]] = []

    def post(obj: dict, kind: str, etype: str, reason: str, message: str, when: datetime) -> None:
        if reason == "Boom":
            raise OSError("connection reset")
        posted.append((obj["metadata"]["name"], reason, when))

    recorder = EventRecorder(post)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    try:
        for i, reason in enumerate(["Created", "Boom", "Running", "Succeeded"]):
            recorder.record(job(f"j{i}"), "FineTuneJob", "Normal", reason, "m", t0.replace(second=i))
        assert recorder.flush(GUARD)
    finally:
        recorder.close()
    assert posted == [
        ("j0", "Created", t0),
        ("j2", "Running", t0.replace(second=2)),
        ("j3", "Succeeded", t0.replace(second=3)),
    ]


def test_a_flood_beyond_capacity_is_dropped_and_counted_while_the_server_is_slow() -> None:
    gate, in_flight = threading.Event(), threading.Event()
    posted: list[str] = []
    dropped: list[int] = []

    def post(obj: dict, *_: Any) -> None:
        in_flight.set()
        gate.wait(GUARD)  # the API server does not answer yet
        posted.append(obj["metadata"]["name"])

    recorder = EventRecorder(post, capacity=3, on_drop=lambda: dropped.append(1))
    now = datetime.now(UTC)
    try:
        recorder.record(job("j0"), "FineTuneJob", "Normal", "Created", "m", now)
        assert in_flight.wait(GUARD)
        for i in range(1, 10):
            recorder.record(job(f"j{i}"), "FineTuneJob", "Normal", "Created", "m", now)
        assert not recorder.flush(0.05)  # one in flight, three queued, the rest dropped
        gate.set()
        assert recorder.flush(GUARD)
    finally:
        recorder.close()
    assert posted == ["j0", "j1", "j2", "j3"]
    assert len(dropped) == 6


def test_close_gives_up_on_what_the_server_never_takes_and_records_nothing_after() -> None:
    gate = threading.Event()
    posted: list[str] = []

    def post(obj: dict, *_: Any) -> None:
        gate.wait(GUARD)
        posted.append(obj["metadata"]["name"])

    recorder = EventRecorder(post)
    now = datetime.now(UTC)
    for i in range(3):
        recorder.record(job(f"j{i}"), "FineTuneJob", "Normal", "Created", "m", now)
    recorder.close(timeout=0.05)  # returns although the first post still hangs
    recorder.record(job("late"), "FineTuneJob", "Normal", "Created", "m", now)
    gate.set()
    recorder.flush(GUARD)
    assert "late" not in posted and set(posted) <= {"j0"}
