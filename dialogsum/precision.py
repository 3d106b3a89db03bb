"""Precision: bf16 autocast on the CPU only where it computes bf16 matmuls fast; TF32 matmuls on the GPU.

bf16 autocast speeds a training step up only where bf16 matmuls beat fp32. On CPUs without native bf16
(AVX-512 without the BF16 extension, e.g. the m5 instance class, or AVX2 only) oneDNN emulates bf16, which is
slower than fp32, so a launcher config that asks for bf16 is downgraded to fp32 there (with a log line). A native
flag is not enough either: a CPU can report ``avx512_bf16`` and still run bf16 kernels slower than fp32 (figures
in docs/benchmark-method.md), so a short timing probe decides. fp16 is refused on the CPU: T5 overflows in fp16 and CPU
fp16 matmuls are far slower than fp32.

``DIALOGSUM_CPU_BF16`` overrides the detection: ``auto`` (default), ``force`` (use bf16 even where it is
emulated, e.g. to measure it) or ``off`` (always fp32 on the CPU).

On CUDA GPUs with TF32 tensor cores (compute capability 8.0 and newer: A100, A10G, L4, H100, ...) fp32 matmuls
run in TF32 (:func:`enable_tf32`): the fp32 path (``mixed_precision: 'no'``) and every matmul left in fp32 under
bf16 autocast. ``DIALOGSUM_TF32=off`` keeps full fp32 (IEEE) matmuls.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from dialogsum.errors import UserError

logger = logging.getLogger(__name__)

#: /proc/cpuinfo flags of CPUs that compute bf16 dot products in hardware (x86: AMX or AVX-512 BF16;
#: aarch64: the BF16 extension of Armv8.6, e.g. Graviton3).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")

ENV_OVERRIDE = "DIALOGSUM_CPU_BF16"
TF32_ENV = "DIALOGSUM_TF32"
#: The first CUDA compute capability with TF32 tensor cores (Ampere).
TF32_CAPABILITY = (8, 0)
OVERRIDE_CHOICES = ("auto", "force", "off")
#: bf16 is kept only when a bf16 matmul beats fp32 by at least this factor (timing noise margin).
MIN_BF16_SPEEDUP = 1.1


def cpu_bf16_feature(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The first native-bf16 CPU flag found in ``cpuinfo`` (e.g. ``avx512_bf16``), or None.

    Returns None where the file does not exist (macOS, Windows): there bf16 is not assumed to be native.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively (see :data:`NATIVE_BF16_FLAGS`)."""
    if platform.system() != "Linux":
        return False
    return cpu_bf16_feature() is not None


def matmul_peak_gflops(
    dtype: Any, device: Any = "cpu", sizes: tuple[int, ...] = (1024, 2048), seconds_per_size: float = 0.25
) -> float:
    """Best dense square-matmul rate (GFLOP/s) over ``sizes``, each timed for about ``seconds_per_size``.

    Used by the bf16 probe below and as the peak of the benchmark's MFU.
    """
    import torch

    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)
        sync()
        reps, elapsed = 0, 0.0
        while elapsed < seconds_per_size or reps < 2:
            start = time.perf_counter()
            torch.matmul(a, b)
            sync()
            one = time.perf_counter() - start
            elapsed += one
            reps += 1
            best = max(best, 2.0 * n**3 / one / 1e9)
    return best


@functools.lru_cache(maxsize=1)
def bf16_matmul_speedup() -> float:
    """How much faster a 1024 x 1024 bf16 matmul is than an fp32 one on this CPU (best rates; ~0.1 s)."""
    import torch

    def rate(dtype: Any) -> float:
        return matmul_peak_gflops(dtype, "cpu", sizes=(1024,), seconds_per_size=0.03)

    return rate(torch.bfloat16) / rate(torch.float32)


def _override() -> str:
    value = os.environ.get(ENV_OVERRIDE, "auto").strip().lower() or "auto"
    if value not in OVERRIDE_CHOICES:
        raise UserError(f"{ENV_OVERRIDE}={value!r}: expected one of {', '.join(OVERRIDE_CHOICES)}")
    return value


def resolve_cpu_precision(
    requested: str, native_bf16: bool | None = None, speedup: float | None = None
) -> tuple[str, str]:
    """The mixed precision to use on the CPU for a ``requested`` one, and why (one line for the log).

    ``requested`` is accelerate's value (``no``, ``bf16``, ``fp16``, ``fp8``). bf16 is kept where the CPU has
    native bf16 (``native_bf16``, default :func:`cpu_has_native_bf16`) *and* a bf16 matmul is measurably
    faster than fp32 (``speedup``, default :func:`bf16_matmul_speedup`, kept at >= 1.1x). Raises
    :class:`UserError` for fp16/fp8, which never pay off on a CPU.
    """
    requested = (requested or "no").lower()
    if requested in ("fp16", "fp8"):
        raise UserError(
            f"mixed_precision {requested} on the CPU: T5 overflows in fp16 and CPU fp16 matmuls are ~100x slower "
            "than fp32; use mixed_precision bf16 (or no) in the accelerate config"
        )
    if requested != "bf16":
        return "no", "fp32 (the accelerate config asks for no mixed precision)"
    override = _override()
    if override == "force":
        return "bf16", f"bf16 autocast ({ENV_OVERRIDE}=force)"
    if override == "off":
        return "no", f"fp32 ({ENV_OVERRIDE}=off)"
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if native:
        feature = cpu_bf16_feature() or "native bf16"
        ratio = bf16_matmul_speedup() if speedup is None else speedup
        if ratio >= MIN_BF16_SPEEDUP:
            return "bf16", f"bf16 autocast (the CPU has {feature}; a bf16 matmul measured {ratio:.2f}x fp32)"
        return "no", (
            f"fp32: the CPU has {feature} but a bf16 matmul measured only {ratio:.2f}x fp32 here; set "
            f"{ENV_OVERRIDE}=force to use bf16 anyway"
        )
    return "no", (
        "fp32: the accelerate config asks for bf16 but this CPU has no native bf16 (no AMX/AVX-512 BF16), where "
        f"emulated bf16 is slower than fp32; set {ENV_OVERRIDE}=force to use it anyway"
    )


def cpu_mixed_precision_override() -> str | None:
    """The ``mixed_precision`` to pass to ``Accelerator`` on the CPU, or None to keep the launcher's choice.

    Reads what ``accelerate launch`` asked for (``ACCELERATE_MIXED_PRECISION``); when that is bf16, logs the
    decision and returns ``"no"`` where bf16 must fall back to fp32.
    """
    requested = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if requested != "bf16":
        # fp16 is refused later with a model-aware message (dialogsum.training.check_mixed_precision)
        return None
    chosen, reason = resolve_cpu_precision(requested)
    logger.info("CPU precision: %s", reason)
    return None if chosen == requested else chosen


def tf32_decision(capability: tuple[int, int] | None, setting: str | None = None) -> tuple[bool, str]:
    """Whether to run fp32 matmuls in TF32 on a GPU of this CUDA compute ``capability`` (None: not a CUDA
    device), and why; ``setting`` is ``DIALOGSUM_TF32`` (``on``/unset or ``off``)."""
    value = (setting or "on").strip().lower()
    if value not in ("on", "off"):
        raise UserError(f"{TF32_ENV}={setting!r}: expected on or off")
    if capability is None:
        return False, "not a CUDA device"
    if value == "off":
        return False, f"fp32 (IEEE) matmuls ({TF32_ENV}=off)"
    if tuple(capability) < TF32_CAPABILITY:
        return False, f"fp32 matmuls (compute capability {capability[0]}.{capability[1]} has no TF32)"
    return True, f"TF32 matmuls (compute capability {capability[0]}.{capability[1]}; {TF32_ENV}=off for IEEE fp32)"


def enable_tf32(device: Any) -> bool:
    """Let fp32 matmuls and convolutions on a CUDA ``device`` use TF32 tensor cores where the GPU has them
    (see :func:`tf32_decision`), or keep them IEEE fp32; returns whether TF32 is on. Does nothing on other
    devices.

    Set with the ``allow_tf32`` switches, as accelerate itself sets them: torch 2.13 refuses to mix these with
    its newer per-backend ``fp32_precision`` settings (``torch.get_float32_matmul_precision()`` then raises,
    and inductor calls it while compiling).
    """
    import torch

    device = torch.device(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    enabled, reason = tf32_decision(capability, os.environ.get(TF32_ENV))
    if device.type == "cuda":
        logger.info("GPU precision: %s", reason)
        # both ways: accelerate switches TF32 on by itself when it compiles an fp32 model
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
    return enabled
