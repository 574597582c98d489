"""The trainer's host-memory setting (models/host_memory.py): memory freed by a layer's transient tensors goes
back to the system instead of staying in glibc's heap as holes the next layer cannot use, either as soon as
it is freed (release) or whenever the resident heap has grown by a budget (trim, the default), which a small
model's step never reaches."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from whetstone_trainer.models.host_memory import BoundedTrim, trim_due

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


def fresh_process(script: str, *args: object) -> dict:
    """The JSON line a script prints last, run in a process of its own (glibc's settings are per process)."""
    run = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def layers(mode: str) -> dict:
    return fresh_process(LAYERS, mode)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting (no-op elsewhere)")
def test_freed_transients_return_to_the_system_instead_of_fragmenting_the_heap():
    plain, returned = layers("off"), layers("on")
    assert returned["set"] is True
    # Without the setting the heap keeps holes of the freed transients: more free memory than is kept alive.
    assert plain["free"] > plain["kept"] / 8
    # With it, the large transients were their own mappings, unmapped when freed: the heap stays tight.
    assert returned["free"] < plain["free"] / 8


@pytest.mark.parametrize(
    ("setting", "applied"),
    [
        (None, "keep_heap_top"),
        ("trim", "keep_heap_top"),
        ("reuse", None),
        ("release", "return_large_frees_to_os"),
    ],
)
def test_the_job_setting_decides_it_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, applied: str | None
) -> None:
    """release (opt-in: its page faults slow every step) returns every large free; trim, the default, keeps
    the top of the heap for the next step; reuse leaves glibc as it is."""
    from conftest import valid_job
    from whetstone_api import FineTuneJob
    from whetstone_trainer import loop

    calls: list[str] = []
    for name in ("return_large_frees_to_os", "keep_heap_top"):
        monkeypatch.setattr(loop, name, lambda name=name: calls.append(name) or True)
    doc = valid_job()
    if setting is not None:
        doc["spec"]["hyperparameters"]["hostMemory"] = setting
    loop.start(FineTuneJob.model_validate(doc).spec)
    assert calls == ([applied] if applied else [])


# Steps of a small model in miniature: each allocates some MiB of transients at the top of the heap, writes
# them, and frees them all; straight through glibc's malloc, so that no small object of Python's or torch's
# lands between them. Prints the page faults of the steps after the first.
STEPS = f"""
import ctypes, json, resource, sys
sys.path.insert(0, {str(TRAINER)!r})
from whetstone_trainer.models.host_memory import keep_heap_top

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
was_set = keep_heap_top() if sys.argv[1] == "on" else None
# Freeing a large block raises glibc's dynamic thresholds, as loading a model does.
libc.free(libc.malloc(40 << 20))
for step in range(6):
    if step == 1:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(4 << 20) for _ in range(int(sys.argv[2]) // 4)]
    for block in blocks:
        ctypes.memset(block, 1, 4 << 20)
    for block in blocks:
        libc.free(block)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({{"set": was_set, "faults": faults}}))
"""


def steps_run(mode: str, step_mib: int) -> dict:
    return fresh_process(STEPS, mode, step_mib)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting (no-op elsewhere)")
def test_trim_keeps_a_small_steps_memory_for_the_next_step_and_no_more():
    plain, kept = steps_run("off", 96), steps_run("on", 96)
    assert kept["set"] is True
    # glibc alone hands a 96 MiB step's freed top back (above its 64 MiB threshold): every step faults it in
    # again, page by page. Kept, the next steps reuse the same pages.
    assert plain["faults"] > 0 and kept["faults"] * 10 < plain["faults"]
    # What is kept is bounded: of a 192 MiB step, 128 MiB stays and the rest goes back (a third of its
    # pages fault in again each step, where glibc alone faults them all).
    large_plain, large_kept = steps_run("off", 192), steps_run("on", 192)
    assert 0.2 < large_kept["faults"] / large_plain["faults"] < 0.5


# --- trim (the default): a malloc_trim whenever resident memory grew by a budget ----------------------------

MiB = 1 << 20


def test_a_trim_is_due_only_past_the_budget() -> None:
    assert not trim_due(resident=900 * MiB, since=800 * MiB, budget=256 * MiB)
    assert not trim_due(resident=1056 * MiB, since=800 * MiB, budget=256 * MiB)  # exactly the budget
    assert trim_due(resident=1057 * MiB, since=800 * MiB, budget=256 * MiB)
    assert not trim_due(resident=700 * MiB, since=800 * MiB, budget=256 * MiB)  # it shrank


def test_the_budget_counts_from_the_last_trim_or_the_lowest_since() -> None:
    resident = iter([100, 150, 90, 180, 200, 60, 110, 110])
    trims: list[int] = []
    policy = BoundedTrim(lambda: next(resident), lambda: trims.append(1), budget=50)  # starts at 100
    policy.check()  # 150: +50, not more than the budget
    assert (policy.trims, policy.since) == (0, 100)
    policy.check()  # 90: lower, the budget counts from there
    assert (policy.trims, policy.since) == (0, 90)
    policy.check()  # 180: +90 -> trim; 200 read after it (what could not be handed back)
    assert (policy.trims, policy.since) == (1, 200)
    policy.check()  # 60
    policy.check()  # 110: +50 from 60, no trim
    assert (policy.trims, policy.since, policy.checks, len(trims)) == (1, 60, 5, 1)


# A checkpointed forward in miniature, as it fragments glibc's heap: each layer writes a large transient, then
# allocates a small long-lived object (an autograd node, a saved tensor) above it, then frees the transient,
# leaving a hole the next layer's slightly larger transient does not fit. The trim policy is checked before
# each layer (as the hooks do) or not. Prints the highest anonymous resident memory above the start not
# explained by the tensors kept alive: the free-but-resident heap.
RESIDENT = f"""
import json, sys, threading
sys.path.insert(0, {str(TRAINER)!r})
import torch
from whetstone_trainer.models.host_memory import BoundedTrim, _AnonymousResident, _libc

resident = _AnonymousResident()
libc = _libc()
policy = BoundedTrim(resident, lambda: libc.malloc_trim(0), budget=int(sys.argv[2]) << 20)
# Where loading a model leaves glibc (freeing a large mmapped block raises its thresholds; how far depends on
# what ran before, so set them): every tensor here comes from the heap, and its top is not trimmed.
libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
result = {{}}


def forward():
    start, kept, worst = resident(), [], 0
    for layer in range(40):
        if sys.argv[1] == "on":
            policy.check()
        transient = torch.ones((2 << 20) + layer * (16 << 10))  # 8 MiB, growing by 64 KiB a layer
        kept.append(torch.ones(16))
        del transient
        worst = max(worst, resident() - start - sum(t.nbytes for t in kept))
    result["worst"] = worst


# In a new thread: glibc gives it an arena of its own, with no free chunks left by the imports in which the
# small objects could land instead of above the transient.
thread = threading.Thread(target=forward)
thread.start()
thread.join()
worst = result["worst"]
print(json.dumps({{"free_resident": worst, "trims": policy.trims}}))
"""


def resident_run(mode: str, budget_mib: int) -> dict:
    return fresh_process(RESIDENT, mode, budget_mib)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc call (no-op elsewhere)")
def test_trimming_past_a_budget_bounds_the_free_but_resident_heap():
    budget = 64
    plain, trimmed = resident_run("off", budget), resident_run("on", budget)
    layer = 11 * MiB  # one layer's transient (at most): what can be free and resident before a check
    assert plain["trims"] == 0
    # Without trims the holes stay resident and pile up layer after layer.
    assert plain["free_resident"] > 3 * (budget * MiB + layer)
    # With them the free-but-resident heap stays about the budget (plus a layer or two), and the policy
    # trimmed every few layers, not before each one.
    assert trimmed["free_resident"] <= budget * MiB + 2 * layer
    assert 0 < trimmed["trims"] < 40 / 2


def _tiny_trainee(**hyper: object) -> object:
    from conftest import valid_job
    from whetstone_api import FineTuneJob
    from whetstone_trainer import loop
    from whetstone_trainer.models.sources import materialise, parse_model_uri

    doc = valid_job()
    doc["spec"].pop("fullParameter")
    doc["spec"]["lora"] = {"rank": 4}
    doc["spec"]["hyperparameters"].update(hyper)
    spec = FineTuneJob.model_validate(doc).spec
    folder = materialise(parse_model_uri(spec.base_model.uri))
    return loop.prepare_trainee(spec, loop.start(spec), folder, total_steps=1, micro=2)


def _tiny_step(trainee: object) -> None:
    from whetstone_trainer import loop
    from whetstone_trainer.data.formats import TokenizedExample
    from whetstone_trainer.data.packing import Row, collate

    rows = [
        Row((TokenizedExample(list(range(3, 3 + n)), [0.0] * (n // 2) + [1.0] * (n - n // 2)),))
        for n in (40, 29)
    ]
    loss, _ = loop.token_nll_sum(trainee.model, collate(rows, pad_id=0), torch.device("cpu"))
    trainee.backward(loss)
    trainee.step()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc call (no-op elsewhere)")
def test_a_tiny_models_training_step_checks_every_layer_and_never_trims():
    trainee = _tiny_trainee()  # hostMemory unset: trim
    trim = trainee.host_trim
    assert trim is not None
    layers = len(trim.handles)
    _tiny_step(trainee)
    # Checked before every part of every layer in the forward, and again in the checkpoint's recompute...
    assert trim.checks > layers
    # ...but the step never grew the heap by the budget: no trim, nothing paid but the checks.
    assert trim.trims == 0
    # The same hooks with no budget left do trim, in the forward and the recompute alike.
    checked = trim.checks
    trim.policy.budget = -1
    _tiny_step(trainee)
    assert trim.trims == trim.checks - checked > layers


@pytest.mark.parametrize("setting", ["reuse", "release"])
def test_only_the_trim_setting_hooks_the_layers(setting: str) -> None:
    assert _tiny_trainee(hostMemory=setting).host_trim is None
