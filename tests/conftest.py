"""Shared fixtures: a valid FineTuneJob to break one field at a time, and a cache for bundled models."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "manifests" / "examples"
# The project's source folders (pyproject's pythonpath), for tests that start a fresh interpreter.
SOURCE_DIRS = [ROOT / d for d in ("api", "cli", "graders", "operator", "trainer-image")]


@pytest.fixture(scope="session", autouse=True)
def _model_cache() -> None:
    # Tests share the user's model cache (built once, keyed by builder version) unless told otherwise.
    os.environ.setdefault("WHETSTONE_CACHE", str(Path.home() / ".cache" / "whetstone" / "models"))


def valid_job() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((EXAMPLES / "sft-tiny-reverse.yaml").read_text()))


def torchrun(worker: Path, procs: int, *args: str) -> None:
    """Run a test worker under torchrun (gloo, CPU) with the checkout's sources; fail with its output."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, SOURCE_DIRS)),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    result = subprocess.run(
        [*launcher, str(worker), *args], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
