"""The local sandbox backend: a pool of confined worker processes for one grader's code.

Workers are started lazily, reused across calls (module state and the scratch folder persist in a worker)
and replaced when one dies, breaks a limit or has used most of its lifetime CPU budget. A batch of calls is
split over the pool; each worker answers call by call, so a call that hangs costs its own timeout and the
rest of its batch continues on a fresh worker. The caller never sees an exception from what the grader's
code does: every failure becomes an Outcome with a reason.

Limits enforced here, outside the worker: the wall clock of every call (the worker is killed), the CPU time
of every call (read from /proc/<pid>/stat while waiting), and the size of every answer frame.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from whetstone_api.rewardgrader import SandboxLimits

from .. import types as r
from . import Outcome

LOG = logging.getLogger("whetstone.graders.sandbox")
WORKER = Path(__file__).with_name("worker.py")
ALL_LAYERS = ("namespaces", "uid", "landlock", "seccomp", "audit")
"""Every isolation layer; the default asks for all and uses those this host allows."""
DEVICES = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
SYSTEM_LIBRARIES = ["/usr", "/lib", "/lib64", "/lib32", "/libx32"]
SANDBOX_UID_BASE = 0x70000000
"""Root-started workers become uid SANDBOX_UID_BASE + (their pid mod 65536)."""
MAX_ANSWER_FRAME = 16 * 1024
"""The worker's answers are a score or a short message; a larger frame is forged or broken."""
START_SECONDS = 20.0
"""Time a worker may take to start and confine itself, on top of the grader's own timeout for its
module-level code (a busy 2-core machine starts Python slowly)."""
CPU_POLL_SECONDS = 0.1
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_ERRORS = set(r.REASONS)


def python_roots() -> list[str]:
    """The standard library folders (read-only in the sandbox) and the system libraries they load."""
    paths = sysconfig.get_paths()
    stdlib = {paths["stdlib"], paths["platstdlib"]}
    stdlib |= {os.path.join(p, "lib-dynload") for p in stdlib}
    return sorted(p for p in stdlib | set(SYSTEM_LIBRARIES) if os.path.exists(p))


class _Dead(Exception):
    """The worker cannot go on: the call it was on gets this outcome."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.outcome = Outcome(None, error, r.short(message))


class _Worker:
    """One worker process and its end of the protocol."""

    def __init__(self, source: str, limits: SandboxLimits, layers: Sequence[str]) -> None:
        self.limits = limits
        self.cpu_cap = int(max(60.0, limits.cpu_seconds * 20))
        self.scratch = tempfile.mkdtemp(prefix="whetstone-grader-")
        config = {
            "scratch": self.scratch,
            "read_roots": python_roots(),
            "devices": DEVICES,
            "limits": limits.model_dump(),
            "layers": list(layers),
            "uid_base": SANDBOX_UID_BASE,
            "cpu_cap_seconds": self.cpu_cap,
        }
        command = [sys.executable, "-I", "-S", "-B", "-X", "utf8", str(WORKER), json.dumps(config)]
        # An empty environment, the scratch folder as working directory, no inherited descriptors beyond the
        # pipes, its own session (so a kill reaches all of it and no terminal signal reaches it).
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=self.scratch,
            env={},
            close_fds=True,
            start_new_session=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd, self.rfd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.wfd, False)
        self.buffer = b""
        self.killed_by_us = False
        self.layers: tuple[str, ...] = ()
        self.missing: dict[str, str] = {}
        try:
            self._send({"op": "init", "source": source}, time.monotonic() + START_SECONDS)
            hello = self._receive(time.monotonic() + START_SECONDS, cpu_limit=None)
            self._check_started(hello)
            self.layers = tuple(str(x) for x in hello.get("layers", []))
            self.missing = {str(k): str(v) for k, v in dict(hello.get("missing", {})).items()}
            # The user's module-level code runs under the same limits as a call.
            loaded = self._receive(time.monotonic() + limits.timeout_seconds, cpu_limit=limits.cpu_seconds)
            self._check_started(loaded)
        except _Dead:
            self.stop()
            raise

    def _check_started(self, answer: dict[str, Any]) -> None:
        if not answer.get("ok"):
            error = answer.get("error") if answer.get("error") in _ERRORS else r.CRASHED
            raise _Dead(error, str(answer.get("message", "the worker did not start")))

    # --- the protocol, with deadlines

    def _send(self, message: dict[str, Any], deadline: float) -> None:
        body = json.dumps(message).encode()
        data = memoryview(struct.pack(">I", len(body)) + body)
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._kill(r.TIMEOUT, "the worker did not take its request in time")
            _, writable, _ = select.select([], [self.wfd], [], remaining)
            if writable:
                try:
                    data = data[os.write(self.wfd, data) :]
                except BlockingIOError:
                    continue
                except OSError:
                    raise self._died() from None

    def _cpu_seconds(self) -> float | None:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime

    def _receive(self, deadline: float, cpu_limit: float | None) -> dict[str, Any]:
        cpu_start = self._cpu_seconds() if cpu_limit is not None else None
        while True:
            if len(self.buffer) >= 4:
                (length,) = struct.unpack(">I", self.buffer[:4])
                if length > MAX_ANSWER_FRAME:
                    raise self._kill(r.OUTPUT_TOO_LARGE, f"the worker answered {length} bytes")
                if len(self.buffer) >= 4 + length:
                    frame, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
                    try:
                        answer = json.loads(frame)
                    except ValueError:
                        raise self._kill(r.CRASHED, "the worker's answer is not JSON") from None
                    if not isinstance(answer, dict):
                        raise self._kill(r.CRASHED, "the worker's answer is not an object")
                    return answer
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._kill(r.TIMEOUT, f"the call ran past {self.limits.timeout_seconds:g} s")
            wait = remaining if cpu_start is None else min(remaining, CPU_POLL_SECONDS)
            readable, _, _ = select.select([self.rfd], [], [], wait)
            if readable:
                chunk = os.read(self.rfd, 65536)
                if not chunk:
                    raise self._died()
                self.buffer += chunk
            elif cpu_start is not None and cpu_limit is not None:
                used = self._cpu_seconds()
                if used is not None and used - cpu_start > cpu_limit:
                    raise self._kill(r.CPU_TIME, f"the call used more than {cpu_limit:g} s of CPU")

    def _kill(self, error: str, message: str) -> _Dead:
        self.killed_by_us = True
        self.stop()
        return _Dead(error, message)

    def _died(self) -> _Dead:
        """The worker ended on its own during a call: say why, from how it ended."""
        deadline = time.monotonic() + 5
        while True:  # wait4, not Popen.wait: the CPU time it used tells RLIMIT_CPU's SIGKILL from others
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                return self._kill(r.CRASHED, "the worker closed its output and hung")
            time.sleep(0.01)
        code = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.stop()
        cpu = usage.ru_utime + usage.ru_stime
        if code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu >= self.cpu_cap - 1):
            return _Dead(r.CPU_TIME, "the worker used up its CPU-time limit")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return _Dead(r.CRASHED, f"the worker died of {name}")
        return _Dead(r.CRASHED, f"the worker exited with code {code} during the call")

    # --- calls

    def grade(self, calls: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Outcome]:
        """Outcomes of the leading calls; if the worker died on one, that one's outcome is the last and the
        worker is gone (`alive` is false)."""
        outcomes: list[Outcome] = []
        try:
            self._send({"op": "grade", "calls": [[s, i] for s, i in calls]}, time.monotonic() + START_SECONDS)
            for index in range(len(calls)):
                deadline = time.monotonic() + self.limits.timeout_seconds
                answer = self._receive(deadline, cpu_limit=self.limits.cpu_seconds)
                outcomes.append(self._outcome(answer, index))
        except _Dead as dead:
            outcomes.append(dead.outcome)
        return outcomes

    def _outcome(self, answer: dict[str, Any], index: int) -> Outcome:
        if answer.get("i") != index:
            raise self._kill(r.CRASHED, "the worker answered out of turn")
        seconds = answer.get("seconds")
        seconds = float(seconds) if type(seconds) in (int, float) and 0 <= seconds < 1e6 else 0.0
        if "error" in answer:
            error = answer["error"] if answer["error"] in _ERRORS else r.CRASHED
            message = answer.get("message")
            return Outcome(None, error, r.short(message) if isinstance(message, str) else None, seconds)
        score = answer.get("score")
        if type(score) not in (int, float) or score != score or abs(score) == float("inf"):
            raise self._kill(r.CRASHED, "the worker's answer holds no valid score")
        return Outcome(float(score), None, None, seconds)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def worn_out(self) -> bool:
        used = self._cpu_seconds()
        return used is not None and used > self.cpu_cap - 2 * self.limits.cpu_seconds - 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()  # type: ignore[union-attr]
        shutil.rmtree(self.scratch, ignore_errors=True)


class LocalSandbox:
    """A pool of up to `workers` confined processes running one grader's source."""

    def __init__(
        self,
        source: str,
        limits: SandboxLimits | None = None,
        workers: int = 2,
        layers: Sequence[str] = ALL_LAYERS,
        name: str = "grader",
    ) -> None:
        unknown = set(layers) - set(ALL_LAYERS)
        if unknown:
            raise ValueError(f"unknown sandbox layers {sorted(unknown)}; known: {', '.join(ALL_LAYERS)}")
        self.source = source
        self.limits = limits or SandboxLimits()
        self.workers = max(1, workers)
        self.requested = tuple(layers)
        self.name = name
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.workers)
        self._pool: ThreadPoolExecutor | None = None
        self._load_error: Outcome | None = None
        self._layers: tuple[str, ...] = ()
        self.missing: dict[str, str] = {}
        self.started = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_all, self._idle, self._lock)

    @property
    def layers(self) -> tuple[str, ...]:
        return self._layers

    def run(self, calls: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Outcome]:
        if self._closed:
            raise RuntimeError(f"the sandbox of {self.name} is closed")
        calls = list(calls)
        if not calls:
            return []
        n = min(self.workers, len(calls))
        size = -(-len(calls) // n)
        chunks = [calls[i : i + size] for i in range(0, len(calls), size)]
        if len(chunks) == 1:
            return self._run_chunk(chunks[0])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"sandbox-{self.name}")
        results: list[Outcome] = []
        for part in self._pool.map(self._run_chunk, chunks):
            results.extend(part)
        return results

    def _run_chunk(self, calls: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Outcome]:
        results: list[Outcome] = []
        while len(results) < len(calls):
            if self._load_error is not None:
                results.extend([self._load_error] * (len(calls) - len(results)))
                break
            with self._slots:
                try:
                    worker = self._take()
                except _Dead as dead:
                    results.append(dead.outcome)
                    continue
                outcomes = worker.grade(calls[len(results) :])
                results.extend(outcomes)
                if worker.alive and not worker.worn_out():
                    with self._lock:
                        self._idle.append(worker)
                else:
                    worker.stop()
        return results

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            worker = _Worker(self.source, self.limits, self.requested)
        except _Dead as dead:
            outcome = Outcome(
                None, dead.outcome.error, r.short(f"loading the grader: {dead.outcome.message}")
            )
            # Module-level code that does not load will not load next time either.
            if outcome.error in (r.INVALID_SOURCE, r.FORBIDDEN, r.NETWORK, r.TIMEOUT, r.CPU_TIME, r.MEMORY):
                self._load_error = outcome
            raise _Dead(outcome.error or r.CRASHED, outcome.message or "") from None
        with self._lock:
            self.started += 1
            first = not self._layers
            self._layers, self.missing = worker.layers, worker.missing
        if first:
            LOG.info(
                "sandbox of %s: layers %s%s",
                self.name,
                ", ".join(worker.layers),
                "".join(f"; no {k} ({v})" for k, v in worker.missing.items()),
            )
        return worker

    def preload(self) -> Outcome | None:
        if self._load_error is not None:
            return self._load_error
        with self._slots:
            try:
                worker = self._take()
            except _Dead as dead:
                return dead.outcome
            with self._lock:
                self._idle.append(worker)
        return None

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._finalizer()

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_all(idle: list[_Worker], lock: threading.Lock) -> None:
    with lock:
        workers, idle[:] = list(idle), []
    for worker in workers:
        worker.stop()
