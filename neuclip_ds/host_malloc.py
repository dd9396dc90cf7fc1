"""glibc malloc settings for training on the CPU (docs/performance.md#host-memory-allocator).

On a CPU every activation and gradient of a step is a host allocation, freed again by the end of the step. glibc's
defaults give such blocks back to the kernel (the top of the heap is trimmed past twice the dynamic mmap threshold,
and blocks past that threshold, at most 32 MiB, are mmap'ed and unmapped one by one), so the next step gets them back
as new pages that the kernel must fault in and zero. An 8-step ViT-B-32 run at batch 32 took 4.0 M minor page
faults, and a quarter of its CPU time went to the kernel. Keeping freed memory in the heap for the next step (what
PyTorch's caching allocator does for GPU memory, and jemalloc / tcmalloc for CPU training) removes them: no block
is mmap'ed (the largest too: ZeRO's flat fp32 gradient copies are one block of the model's size, 0.6 GB at
ViT-B-32, and the embedding's gradient is 100 MB), and the heap is never trimmed. The price is that the process keeps
its peak heap until it exits, which a training run reaches on every step anyway, plus what the heap cannot reuse
between differently sized blocks (ViT-B-32 under zero1: a 7.0 GiB peak instead of 5.5, benchmarks/host_malloc.py).

Left alone where the user chose: an allocator in LD_PRELOAD (jemalloc, tcmalloc, ...), glibc's MALLOC_*_ variables
or GLIBC_TUNABLES malloc settings, or `--host-malloc glibc`; and off glibc (musl, macOS), where mallopt differs."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MiB = 2**20
# mallopt(3) parameters and the values applied: no mmap'ed blocks at all (a threshold cannot do it: glibc caps it at
# 32 MiB on 64-bit and maps every larger block anew), and no trimming (-1, which glibc reads as the largest size_t:
# a finite threshold, even 2 GiB, is passed when ZeRO's flat gradient copies at the heap's top are freed, and those
# pages come back as page faults on the next step)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1, M_TOP_PAD: 64 * MiB}
APPLIED = "glibc: every block from the heap, freed memory kept for the next step (mallopt)"
VARIABLES = {M_MMAP_MAX: "MALLOC_MMAP_MAX_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_TOP_PAD: "MALLOC_TOP_PAD_"}
USER_VARIABLES = (*VARIABLES.values(), "MALLOC_MMAP_THRESHOLD_")


def as_environment() -> dict[str, str]:
    """SETTINGS as glibc's environment variables: the same allocator for a program that does not call mallopt
    itself (benchmarks/vs_openclip.py runs open_clip_train with it, beside it as released)."""
    return {VARIABLES[param]: str(value % 2**64) for param, value in SETTINGS.items()}  # as the size_t glibc reads


def user_choice(env: dict[str, str] | os._Environ) -> str | None:
    """What in `env` says the user picked the allocator or its settings (then it is theirs to keep), or None."""
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if "malloc" in os.path.basename(p)]
    if preload:
        return f"LD_PRELOAD {preload[0]}"
    for name in USER_VARIABLES:
        if name in env:
            return f"{name} is set"
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    return None


def tune_host_malloc(mode: str, *, on_cpu: bool) -> str:
    """Apply SETTINGS to this process's glibc malloc when `mode` is "tuned" and the tensors live in host memory
    (`on_cpu`); returns one line for the start-up banner saying what the allocator does and why."""
    if mode == "glibc":
        return "glibc's defaults (--host-malloc glibc)"
    if not on_cpu:
        return "as found (GPU run: activations are in device memory)"
    chosen = user_choice(os.environ)
    if chosen is not None:
        return f"as found ({chosen})"
    libc_name, _ = platform.libc_ver()
    path = ctypes.util.find_library("c")
    if libc_name != "glibc" or path is None:
        return f"as found (not glibc: {libc_name or platform.system()})"
    libc = ctypes.CDLL(path)
    refused = [param for param, value in SETTINGS.items() if libc.mallopt(param, value) != 1]
    if refused:  # mallopt returns 0 for a value this glibc does not accept; the others stay applied
        return f"{APPLIED}; this glibc refused mallopt parameter(s) {refused}"
    return APPLIED
