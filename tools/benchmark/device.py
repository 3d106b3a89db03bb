"""What the run measures on (the GPU, or the CPU and its native bf16) and our default path there: what the
launcher config (``--accelerate_config``: cpu.yaml on a CPU, single_gpu.yaml on a GPU) sets, its
``mixed_precision`` through the CPU's bf16 guard and its ``dynamo_config``."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from dialogsum.errors import UserError
from tools.benchmark.args import BenchmarkArgs
from tools.benchmark.cases import PRECISION_NAMES
from tools.benchmark.launch import CONFIG_DIR, dynamo_settings


def _default_launch_config() -> Path:
    return CONFIG_DIR / ("single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")


def choose_precision(args: BenchmarkArgs) -> dict[str, Any]:
    """Our default path: the launcher config's ``mixed_precision`` (through the CPU guard) and whether its
    ``dynamo_config`` compiles the model."""
    import yaml

    from dialogsum.distributed import dynamo_plugin_from
    from dialogsum.precision import cpu_bf16_feature, resolve_cpu_precision

    path = Path(args.accelerate_config) if args.accelerate_config else _default_launch_config()
    if not path.is_file():
        raise UserError(f"--accelerate_config not found: {args.accelerate_config}")
    requested = str((yaml.safe_load(path.read_text()) or {}).get("mixed_precision", "no"))
    if torch.cuda.is_available():
        chosen = "bf16" if requested == "bf16" and torch.cuda.is_bf16_supported() else "no"
        reason = f"{PRECISION_NAMES.get(chosen, chosen)} on GPU"
    else:
        chosen, reason = resolve_cpu_precision(requested)
    plugin = dynamo_plugin_from(dynamo_settings(path))
    compiled = plugin is not None
    if compiled:
        reason += (
            f", compiled ({plugin.backend.value.lower()}{', regional' if plugin.use_regional_compilation else ''})"
        )
    return {
        "config": str(path),
        "requested": requested,
        "chosen": chosen,
        "reason": reason,
        "cpu_bf16_feature": cpu_bf16_feature(),
        "compiled": compiled,
    }


def device_info() -> dict[str, Any]:
    """What the run measured on: the GPU (name, compute capability) or the CPU (model name, native bf16)."""
    from dialogsum.precision import cpu_bf16_feature

    cpu = platform.processor() or platform.machine()
    try:
        names = [
            x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in x
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info: dict[str, Any] = {"type": "cuda" if torch.cuda.is_available() else "cpu", "cpu": cpu}
    info["cpu_bf16_feature"] = cpu_bf16_feature()
    if torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    else:
        info["name"] = cpu
    return info
