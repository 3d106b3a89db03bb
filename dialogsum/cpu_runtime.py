"""CPU runtime settings that make training and generation on a CPU faster without changing what is computed.

Two costs of a step on a CPU besides the matmuls themselves:

* **Denormal floats.** Softmax tails produce probabilities below 1.2e-38, which x86 cores compute through a
  slow microcode path, and every matmul that reads such a tensor (lm_head's backward reads the logits gradient)
  slows down with them. Flushing denormals to zero (``torch.set_flush_denormal``, the FTZ/DAZ bits) changes only
  values smaller than 1.2e-38, i.e. nothing a loss or an update can see.
* **Page faults.** glibc returns every freed block above its mmap threshold to the kernel, so each step maps,
  faults in and zeroes its activations again. Keeping freed memory in the process (mmap threshold 32 MiB, trim
  threshold 1 GiB) and backing tensors of 2 MiB or more with transparent huge pages (PyTorch's
  ``THP_MEM_ALLOC_ENABLE``) lets a step reuse the memory of the one before.

:func:`tune_cpu_runtime` applies both (what each gave on a flan-t5-base step is in docs/cpu-profile.md);
``DIALOGSUM_CPU_TUNING=off`` leaves the process as it was (e.g. to measure the difference).

Call it first, before any tensor work: the settings must be in place before the math library starts its worker
threads (at the first matmul) to give their whole gain. :func:`dialogsum.distributed.build_accelerator` calls it
first thing on a CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

ENV_SWITCH = "DIALOGSUM_CPU_TUNING"
#: PyTorch's switch for 2 MiB-aligned, huge-page-advised CPU tensor allocations (read at its first allocation).
THP_ENV = "THP_MEM_ALLOC_ENABLE"

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks above this are still mapped per allocation (and given back when freed): the largest value glibc takes.
MMAP_THRESHOLD_BYTES = 32 << 20
#: Free memory at the top of the heap is given back to the kernel only beyond this.
TRIM_THRESHOLD_BYTES = 1 << 30


def tuning_enabled() -> bool:
    """False when ``DIALOGSUM_CPU_TUNING`` is ``off``/``0``/``false``/``no``."""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def request_huge_pages() -> bool:
    """Ask PyTorch to back large CPU tensors with transparent huge pages (Linux; before big allocations).

    Only sets ``THP_MEM_ALLOC_ENABLE=1`` when the user has not set it; returns whether it is on.
    """
    if platform.system() != "Linux":
        return False
    os.environ.setdefault(THP_ENV, "1")
    return os.environ[THP_ENV] == "1"


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed blocks below 32 MiB (and up to 1 GiB at the heap top) for reuse.

    Returns False where the C library is not glibc (musl, macOS, Windows) and nothing was changed.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def tune_cpu_runtime() -> list[str]:
    """Apply the CPU settings above to this process; returns what was applied (empty when switched off)."""
    if not tuning_enabled():
        logger.info("CPU runtime tuning off (%s=%s)", ENV_SWITCH, os.environ.get(ENV_SWITCH))
        return []
    import torch

    applied = []
    if torch.set_flush_denormal(True):
        applied.append("denormals flushed to zero")
    if request_huge_pages():
        applied.append("huge pages for tensors >= 2 MiB")
    if keep_freed_memory():
        applied.append("freed memory kept for reuse")
    if applied:
        logger.info("CPU runtime: %s (%s=off to disable)", ", ".join(applied), ENV_SWITCH)
    return applied
