"""The trainer's host-memory setting (models/host_memory.py): with it, memory freed by a layer's transient
tensors goes back to the system instead of staying in glibc's heap as holes the next layer cannot use."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parent.parent / "trainer-image"

# A checkpointed forward in miniature: each "layer" allocates large transients, keeps its input and a small
# tensor, and frees the rest. Prints what glibc holds free in its heap (mallinfo2's fordblks) and in use.
LAYERS = f"""
import ctypes, json, sys
sys.path.insert(0, {str(TRAINER)!r})
import torch
from whetstone_trainer.models.host_memory import return_large_frees_to_os

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
was_set = return_large_frees_to_os() if sys.argv[1] == "on" else None
big = torch.empty(8 << 20)  # freeing a large block raises glibc's dynamic threshold, as loading a model does
del big
kept = []
for _layer in range(30):
    x = torch.empty(1 << 20)
    a, b = torch.empty(3 << 20), torch.empty(3 << 20)
    c = a.add_(1)
    kept += [x.clone(), torch.ones(3)]
    del x, a, b, c
m = libc.mallinfo2()
print(json.dumps({{"set": was_set, "free": m.fordblks, "kept": sum(t.nbytes for t in kept)}}))
"""


def layers(mode: str) -> dict:
    run = subprocess.run([sys.executable, "-c", LAYERS, mode], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting (no-op elsewhere)")
def test_freed_transients_return_to_the_system_instead_of_fragmenting_the_heap():
    plain, returned = layers("off"), layers("on")
    assert returned["set"] is True
    # Without the setting the heap keeps holes of the freed transients: more free memory than is kept alive.
    assert plain["free"] > plain["kept"] / 8
    # With it, the large transients were their own mappings, unmapped when freed: the heap stays tight.
    assert returned["free"] < plain["free"] / 8


@pytest.mark.parametrize(("setting", "applied"), [(None, False), ("reuse", False), ("release", True)])
def test_the_job_setting_decides_it_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, applied: bool
) -> None:
    """Opt-in: the page faults it costs slow every step (a tiny model's too), so only a job that asks for
    hostMemory: release gets it."""
    from conftest import valid_job
    from whetstone_api import FineTuneJob
    from whetstone_trainer import loop

    calls: list[int] = []
    monkeypatch.setattr(loop, "return_large_frees_to_os", lambda: calls.append(1) or True)
    doc = valid_job()
    if setting is not None:
        doc["spec"]["hyperparameters"]["hostMemory"] = setting
    loop.start(FineTuneJob.model_validate(doc).spec)
    assert bool(calls) is applied
