"""`whetstone serve` as a subprocess on 127.0.0.1 for the training-service tests, and small helpers to drive
it with the official `tinker` client (installed from PyPI, unmodified)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = [ROOT / d for d in ("api", "cli", "operator", "trainer-image")]
ALICE, BOB = "tml-alice-key", "tml-bob-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    checkpoint_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def client_env() -> None:
    """What every client in a test process needs: no telemetry, no hub."""
    os.environ["TINKER_TELEMETRY"] = "0"
    os.environ["HF_HUB_OFFLINE"] = "1"


@contextlib.contextmanager
def running_server(tmp: Path, base_model: str, *extra: str, keys: str = f"{ALICE},{BOB}") -> Iterator[Server]:
    port = free_port()
    log = tmp / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", WHETSTONE_API_KEYS=keys, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, SOURCE_DIRS), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "whetstone_cli.main",
        "serve",
        "--base-model",
        base_model,
        "--port",
        str(port),
        "--checkpoint-dir",
        str(tmp / "checkpoints"),
        "--device",
        "cpu",
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    server = Server(f"http://127.0.0.1:{port}", port, tmp / "checkpoints", log, proc)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "whetstone serve did not start:\n" + server.log_text()[-4000:]
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
