"""How the trainer's process hands freed host memory back to the operating system when it trains on the CPU.

Measured (SmolLM2-135M, LoRA r16, 2 × 1000 tokens, gradient checkpointing, torch 2.15, glibc 2.36): the
tensors alive at the end of a checkpointed forward are ~350 MiB, yet the process's resident memory grows by
~2 GiB, all of it memory glibc's malloc holds as *free* (mallinfo2's fordblks: 1.3 GiB after the forward,
2.1 GiB after the backward). glibc raises its mmap threshold dynamically up to 32 MiB once a large mmapped
block is freed, so every activation (4–25 MiB at this shape) is then carved from the main heap; each layer
leaves a long-lived tensor (its checkpointed input) and small C++ objects (autograd nodes, tensor
structs) inside the holes its transients freed, and the next layer's larger transients no longer fit them
(malloc_info: ~360 free holes of 0.9–24 MiB). The heap only grows.

Pinning the threshold (mallopt M_MMAP_THRESHOLD, which also switches the dynamic raise off) serves every
allocation of at least `threshold` bytes with its own mmap, returned to the kernel when the tensor is freed,
so resident memory follows the tensors alive. The price is a page fault per 4 KiB page of every large
tensor each time it is allocated (~6 M faults per step at that shape) instead of reusing resident pages:
kernel time on the CPU; nothing on a GPU, where activations never touch malloc. Even a tiny model's
activations reach the threshold at an RFT update's batch (1–4 MiB), and its steps slow too: hence opt-in
(hyperparameters.hostMemory: release).

The default (hyperparameters.hostMemory: trim) bounds the holes instead of preventing them: a forward pre-hook
on the parts of every decoder layer (attention, MLP, norms; they run again in the checkpoint's recompute
during the backward) reads the process's
anonymous resident memory (/proc/self/statm, ~2 µs) and, only when it has grown by more than a budget since
the last trim, calls glibc's `malloc_trim(0)`, which madvises the whole free pages inside the heap away: the
holes stop being resident and the allocations that stay are untouched; a trimmed page faults again only when
a later tensor reuses it. So at most about `budget` of free memory is resident between two trims (a SmolLM2
step: peak 3.6 → 2.1 GiB at 512 MiB for ~12 % step time, bench/RESULTS.md); a small model, whose step never
grows by the budget, never trims and pays a few microseconds a layer.

Trim also keeps the top of the heap (`keep_heap_top`). glibc hands the free memory at the top of its heap back
whenever more than its trim threshold is free there: twice the mmap threshold, 64 MiB once raised. A small
model's step (an RFT update of 64 answers at whetstone://tiny: ~100 MiB of activations, allocated and freed
at the top, step after step) is just above that, so every step gave its pages back and the next faulted them
in again, ~10 000 page faults a step and ~15 % of the bench's step time. Trim raises the top's threshold to
128 MiB and has glibc keep 128 MiB when it does hand the top back (M_TOP_PAD; otherwise a step just above
the threshold would keep nothing); the budget trim still bounds what stays resident, since `malloc_trim`
returns the top with the holes. The mmap threshold is pinned at 32 MiB, where glibc's dynamic raise ends
(setting any of these switches that raise off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import Any

import torch

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # 1 MiB: every activation of a real model is above it
HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64 bits: where its dynamic raise ends
HEAP_TOP_KEPT = 128 << 20  # above a small model's step (bench/RESULTS.md); the budget trim bounds the rest
# Bytes of resident growth between two trims, by measurement (bench/RESULTS.md): 512 MiB bounds a SmolLM2
# step's peak to about TRL's 0.4x for ~12 % step time; 256 MiB saved 10 % more memory for 25-45 %.
TRIM_BUDGET = 512 << 20


def _libc() -> Any:
    """glibc, or None where the C library is something else (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc's own entry points, absent elsewhere)
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt for each (parameter, value); True when every one was set, False where the C library
    is not glibc (left as it is)."""
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all([bool(mallopt(parameter, value)) for parameter, value in settings])


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve host allocations of at least `threshold` bytes from their own mmap (glibc), so that freeing one
    returns its memory instead of leaving a hole in the heap. Applies to the whole process from now on;
    True when set, False where the C library is not glibc (musl, macOS: left as it is)."""
    return _mallopt((M_MMAP_THRESHOLD, threshold))


def keep_heap_top(kept: int = HEAP_TOP_KEPT, threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Let up to `kept` bytes stay free at the top of glibc's heap instead of going back to the operating
    system at every free (hostMemory: trim; see the module docstring), with allocations below `threshold`
    bytes served from the heap. Applies to the whole process from now on; True when set, False where the C
    library is not glibc (left as it is)."""
    return _mallopt((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, kept), (M_TOP_PAD, kept))


def trim_due(resident: int, since: int, budget: int) -> bool:
    """Whether the heap should be trimmed now: resident memory has grown by more than `budget` bytes since
    `since` (what was resident after the last trim, or the lowest seen since)."""
    return resident - since > budget


class BoundedTrim:
    """Calls `trim` whenever `resident()` has grown by more than `budget` bytes since the last trim (or since
    the lowest it has been); `trims` counts the calls. Check it as often as is cheap (every layer)."""

    def __init__(self, resident: Callable[[], int], trim: Callable[[], object], budget: int) -> None:
        self.resident, self.trim, self.budget = resident, trim, budget
        self.since = resident()
        self.trims = 0
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        now = self.resident()
        if trim_due(now, self.since, self.budget):
            self.trim()
            self.trims += 1
            self.since = self.resident()
        else:
            self.since = min(self.since, now)  # freed memory went back: the budget counts from there


class _AnonymousResident:
    """This process's resident memory that is not file-backed (statm's resident − shared, in bytes): the heap
    and the tensors, not the pages of shared libraries a first forward maps in. The file stays open; a
    pread at offset 0 makes the kernel write it afresh."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.page = os.sysconf("SC_PAGE_SIZE")

    def __call__(self) -> int:
        fields = os.pread(self.fd, 128, 0).split()
        return (int(fields[1]) - int(fields[2])) * self.page


class LayerTrim:
    """A BoundedTrim of glibc's heap checked before each part of each decoder layer of a model runs, in the
    forward and in the checkpoint's recompute; `remove()` takes the hooks off."""

    def __init__(self, layers: list[torch.nn.Module], libc: Any, budget: int) -> None:
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        self.resident = _AnonymousResident()
        self.policy = BoundedTrim(self.resident, lambda: libc.malloc_trim(0), budget)
        # On the layer's parts (attention, MLP, norms), not the layer: transformers checkpoints a layer's
        # forward inside its __call__, so the layer's own hooks stay out of the recompute; and pre-hooks,
        # since the recompute stops (raising out of the layer) once the backward has what it needs.
        parts = [part for layer in layers for part in layer.children()]
        self.handles = [part.register_forward_pre_hook(self._hook) for part in parts]

    def _hook(self, _module: torch.nn.Module, _args: object) -> None:
        # Only forwards that build a graph (the training forward and the checkpoint's recompute) leave
        # long-lived objects between the freed transients; sampling and reference passes skip the check.
        if torch.is_grad_enabled():
            self.policy.check()

    @property
    def trims(self) -> int:
        return self.policy.trims

    @property
    def checks(self) -> int:
        return self.policy.checks

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        os.close(self.resident.fd)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of a transformers model (any wrapper around it): the modules transformers
    checkpoints one by one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def trim_between_layers(model: torch.nn.Module, budget: int = TRIM_BUDGET) -> LayerTrim | None:
    """Bound the free-but-resident heap of a CPU training step to about `budget` bytes (hostMemory: trim).
    None where the C library is not glibc or the model has no decoder layers to hook."""
    libc = _libc()
    layers = decoder_layers(model)
    if libc is None or not layers:
        return None
    return LayerTrim(layers, libc, budget)
