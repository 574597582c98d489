"""A work queue of job keys, like client-go's: a key is queued at most once, a key being worked on is
queued again after (never worked on twice at once), delayed adds for time-based transitions, and a bounded
number of worker threads. Watch events and the periodic resync only add keys, so a burst of pod events for one
job costs one reconcile, and 500 jobs never run more than `workers` reconciles at a time.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

LOG = logging.getLogger("whetstone.operator")

# Back-off of a key whose reconcile raised: 1 s doubling to a minute.
ERROR_BACKOFF = (1.0, 60.0)


class WorkQueue:
    def __init__(self, handler: Callable[[Hashable], float | None], workers: int, name: str = "reconcile"):
        self._handler = handler
        self._workers = workers
        self._name = name
        self._cv = threading.Condition(threading.RLock())  # workers wait on it for keys
        self._ready: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []
        self._due: dict[Hashable, float] = {}  # earliest delayed add per key: later ones are redundant
        self._seq = 0
        self._failures: dict[Hashable, int] = {}
        self._stopping = False
        self._last_done = time.monotonic()
        self._threads: list[threading.Thread] = []

    def add(self, key: Hashable, delay: float = 0.0) -> None:
        with self._cv:
            if delay > 0:
                when = time.monotonic() + delay
                if self._due.get(key, float("inf")) <= when:
                    return
                self._due[key] = when
                self._seq += 1
                heapq.heappush(self._delayed, (when, self._seq, key))
            elif key in self._processing:
                self._dirty.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._ready.append(key)
            self._cv.notify()

    def __len__(self) -> int:
        with self._cv:
            return len(self._ready)

    def idle_for(self) -> float:
        """Seconds since the last pass ended, while no key is ready or being worked on; 0 while busy."""
        with self._cv:
            if self._ready or self._processing:
                return 0.0
            return time.monotonic() - self._last_done

    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _next(self) -> Hashable | None:
        with self._cv:
            while not self._stopping:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    when, _, key = heapq.heappop(self._delayed)
                    if self._due.get(key) == when:
                        del self._due[key]
                    if key in self._processing:
                        self._dirty.add(key)
                    elif key not in self._queued:
                        self._queued.add(key)
                        self._ready.append(key)
                if self._ready:
                    key = self._ready.popleft()
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                wait = self._delayed[0][0] - now if self._delayed else None
                self._cv.wait(wait)
            return None

    def _done(self, key: Hashable) -> None:
        with self._cv:
            self._processing.discard(key)
            self._last_done = time.monotonic()
            if key in self._dirty:
                self._dirty.discard(key)
                if key not in self._queued:
                    self._queued.add(key)
                    self._ready.append(key)
                    self._cv.notify()

    def _work(self) -> None:
        while (key := self._next()) is not None:
            try:
                again = self._handler(key)
                self._failures.pop(key, None)
            except Exception:
                n = self._failures.get(key, 0)
                self._failures[key] = n + 1
                again = min(ERROR_BACKOFF[0] * 2**n, ERROR_BACKOFF[1])
                LOG.exception("%s of %s failed; again in %.0f s", self._name, key, again)
            finally:
                self._done(key)
            if again is not None:
                self.add(key, again)
