"""Reading rank 0's /status without trusting it. The pod runs the user's image, so its answer may be slow,
endless, huge or malformed:

- one overall deadline per read (connect, send, every byte of the answer), not a per-recv timeout, so a
  drip-feed ends at the deadline;
- at most MAX_REPORT_BYTES read, then the connection is dropped;
- a small pool of poll threads, separate from the reconcile workers and never under a job's lock: a slow pod
  holds one poll thread for at most the deadline, and at most one read per job is in flight;
- the reconcile takes the latest result (wire.TrainerReport.parse: strict and typed) on its next pass.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from whetstone_api.wire import MAX_REPORT_BYTES, ReportError, TrainerReport


class FetchError(OSError):
    """The status server did not give a usable answer in time."""


def fetch(host: str, port: int, path: str, deadline: float, max_bytes: int = MAX_REPORT_BYTES) -> bytes:
    """GET http://host:port/path (HTTP/1.0, the connection closes after the answer) within `deadline`
    seconds overall; the body, or FetchError."""
    end = time.monotonic() + deadline

    def left() -> float:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"no complete answer within {deadline:g} s")
        return remaining

    try:
        with socket.create_connection((host, port), timeout=left()) as sock:
            sock.settimeout(left())
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n".encode())
            chunks: list[bytes] = []
            size = 0
            limit = max_bytes + 16384  # the body plus room for the headers
            while True:
                sock.settimeout(left())
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise FetchError(f"answer larger than {max_bytes} bytes")
    except TimeoutError as e:
        raise FetchError(f"no complete answer within {deadline:g} s") from e
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise FetchError("malformed HTTP answer")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or status_line[1] != b"200":
        raise FetchError(f"HTTP status {status_line[1:2]!r}")
    return body


@dataclass(frozen=True)
class PollResult:
    report: TrainerReport | None
    error: str | None
    at: float  # time.monotonic() when the read finished


class StatusPoller:
    def __init__(
        self,
        threads: int = 4,
        deadline: float = 2.0,
        on_done: Callable[[Hashable], None] | None = None,
        max_bytes: int = MAX_REPORT_BYTES,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="status-poll")
        self._deadline = deadline
        self._max_bytes = max_bytes
        self._on_done = on_done
        self._lock = threading.Lock()
        self._in_flight: set[Hashable] = set()
        self._results: dict[Hashable, PollResult] = {}
        self._started: dict[Hashable, float] = {}

    def due(self, key: Hashable, interval: float) -> bool:
        with self._lock:
            return key not in self._in_flight and time.monotonic() - self._started.get(key, -1e9) >= interval

    def request(self, key: Hashable, host: str, port: int) -> bool:
        """Start a read of http://host:port/status unless one is in flight for `key`."""
        with self._lock:
            if key in self._in_flight:
                return False
            self._in_flight.add(key)
            self._started[key] = time.monotonic()
        self._pool.submit(self._poll, key, host, port)
        return True

    def _poll(self, key: Hashable, host: str, port: int) -> None:
        try:
            report, error = (
                TrainerReport.parse(fetch(host, port, "/status", self._deadline, self._max_bytes)),
                None,
            )
        except (OSError, ReportError) as e:
            report, error = None, str(e)
        except Exception as e:  # never lose the in-flight slot
            report, error = None, f"{type(e).__name__}: {e}"
        with self._lock:
            self._in_flight.discard(key)
            self._results[key] = PollResult(report, error, time.monotonic())
        if self._on_done is not None:
            self._on_done(key)

    def take(self, key: Hashable) -> PollResult | None:
        """The latest finished read for `key`, once."""
        with self._lock:
            return self._results.pop(key, None)

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._results.pop(key, None)
            self._started.pop(key, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
