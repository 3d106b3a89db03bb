"""CPU runtime tuning: denormals flushed, huge pages requested, glibc told to keep freed memory; switch off.

Each check runs in a fresh Python process so that the settings do not leak into other tests.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from helpers import HANG_TIMEOUT_S, subprocess_env

PROBE = """
import json, os, resource, torch
from dialogsum.cpu_runtime import tune_cpu_runtime
applied = tune_cpu_runtime()                   # first, as training does: before any tensor is allocated
tiny = torch.tensor([1e-39, 3e-39])            # denormal float32 values
products = (tiny * 1.0).tolist()
torch.set_num_threads(2)
big = torch.full((1 << 22,), 1e-39)            # large enough to be split over the OpenMP threads
nonzero_in_threads = int((big * 1.0).count_nonzero())
def step():                                    # allocations shaped like a training step's activations (MiB)
    keep = []
    for size in (3, 6, 12, 24, 6, 48, 12, 3, 96, 24):
        x = torch.empty(size << 20, dtype=torch.uint8); x.fill_(1); keep.append(x)
step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // 4
print(json.dumps({"applied": applied, "products": products, "faults": faults, "nonzero": nonzero_in_threads,
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""


def _probe(**extra: str) -> dict:
    env = subprocess_env(**extra)
    for key in ("THP_MEM_ALLOC_ENABLE", "DIALOGSUM_CPU_TUNING"):
        if key not in extra:  # an in-process build_accelerator of an earlier test may have set it here
            env.pop(key, None)
    cmd = [sys.executable, "-c", PROBE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="FTZ/DAZ are x86 flags")
def test_denormals_are_flushed_after_tuning() -> None:
    tuned, untouched = _probe(), _probe(DIALOGSUM_CPU_TUNING="off")
    assert untouched["products"][0] == pytest.approx(1e-39, rel=1e-3)  # the CPU computes denormals by default
    assert tuned["products"] == [0.0, 0.0]
    assert tuned["nonzero"] == 0 and untouched["nonzero"] == 1 << 22  # in every OpenMP thread too
    assert "denormals flushed to zero" in tuned["applied"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and THP settings are glibc/Linux")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    tuned, untouched = _probe(), _probe(DIALOGSUM_CPU_TUNING="off")
    assert tuned["applied"] == [
        "denormals flushed to zero",
        "huge pages for tensors >= 2 MiB",
        "freed memory kept for reuse",
    ]
    assert tuned["thp"] == "1"
    # 234 MiB written per step: ~60,000 fresh 4-KiB pages each time without tuning, reused memory with it
    assert untouched["faults"] > 20_000
    assert tuned["faults"] < untouched["faults"] / 10


def test_switched_off_changes_nothing() -> None:
    result = _probe(DIALOGSUM_CPU_TUNING="off")
    assert result["applied"] == []
    assert result["thp"] is None
    assert result["products"] != [0.0, 0.0]


def test_user_choice_of_huge_pages_is_kept() -> None:
    result = _probe(THP_MEM_ALLOC_ENABLE="0")
    assert result["thp"] == "0"
    assert "huge pages for tensors >= 2 MiB" not in result["applied"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="FTZ/DAZ are x86 flags")
def test_build_accelerator_flushes_denormals_on_cpu() -> None:
    """The training/evaluation entry point applies the tuning itself (here with its bf16 matmul probe on)."""
    code = (
        "import torch\n"
        "from dialogsum.distributed import build_accelerator\n"
        "build_accelerator()\n"
        "big = torch.full((1 << 22,), 1e-39)\n"
        "print(torch.get_num_threads(), int((big * 1.0).count_nonzero()))\n"
    )
    env = subprocess_env(ACCELERATE_MIXED_PRECISION="bf16", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads, nonzero = proc.stdout.split()
    assert nonzero == "0", f"denormals survived in an OpenMP thread ({threads} threads)"
