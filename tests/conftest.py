"""Shared fixtures: a valid FineTuneJob to break one field at a time, and a cache for bundled models."""

from __future__ import annotations

import copy
import os
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
