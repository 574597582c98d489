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
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> parameter number
MMAP_THRESHOLD = 1 << 20  # 1 MiB: every activation of a real model is above it


def return_large_frees_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve host allocations of at least `threshold` bytes from their own mmap (glibc), so that freeing one
    returns its memory instead of leaving a hole in the heap. Applies to the whole process from now on;
    True when set, False where the C library is not glibc (musl, macOS: left as it is)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
