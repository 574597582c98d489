"""Events posted in the background, as client-go's event recorder does: a pass records its Events and goes
on; one thread posts them in order. An Event tells a user what happened; nothing waits on one, so a job's
pods are never created later because its Events were being posted. The queue is bounded: when the API server
cannot keep up, the newest Events are dropped (counted and logged), never the operator's memory."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any

LOG = logging.getLogger("whetstone.operator")
Json = dict[str, Any]
# (the object, its kind, Normal or Warning, reason, message, when it happened)
Post = Callable[[Json, str, str, str, str, datetime], None]


class EventRecorder:
    def __init__(self, post: Post, capacity: int = 1000, on_drop: Callable[[], None] | None = None) -> None:
        self._post = post
        self._capacity = capacity
        self._on_drop = on_drop
        self._queue: deque[tuple[Json, str, str, str, str, datetime]] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def record(self, obj: Json, kind: str, etype: str, reason: str, message: str, when: datetime) -> None:
        with self._cv:
            if self._closed:
                return
            if len(self._queue) >= self._capacity:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 100 == 0:
                    LOG.warning("events: %d dropped (the API server is behind)", self._dropped)
                if self._on_drop is not None:
                    self._on_drop()
                return
            self._queue.append((obj, kind, etype, reason, message, when))
            self._cv.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until every recorded Event was posted (or given up on); False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def close(self, timeout: float = 2.0) -> None:
        """Post what is queued for at most `timeout` seconds, then drop the rest."""
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                item = self._queue.popleft()
                self._busy = True
            try:
                self._post(*item)
            except Exception as e:  # noqa: BLE001 (an Event never stops the operator)
                obj, _kind, _etype, reason = item[:4]
                meta = obj.get("metadata") or {}
                LOG.warning(
                    "%s %s/%s: event %s not posted: %s",
                    item[1],
                    meta.get("namespace"),
                    meta.get("name"),
                    reason,
                    e,
                )
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
