"""What both training loops of a case process share: the case's model, device sync, the matmul peak rate and
torch.compile's own counters."""

from __future__ import annotations

from typing import Any

import torch

from dialogsum.precision import matmul_peak_gflops
from tools.benchmark.cases import Case


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a timer read after this includes it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, precision: str) -> float:
    """The best dense-matmul GFLOP/s measured now at the case's precision (accelerate's value)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # A GPU reaches its matmul peak only on large products (smaller ones are bound by launch and sync).
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    return matmul_peak_gflops(dtype, device, sizes)


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (torch.compile's own counters: forward graphs, then the
    backward graphs compiled at their first backward pass); 0 when nothing was compiled."""
    from torch._dynamo.utils import cumulative_time_spent_ns

    return sum(cumulative_time_spent_ns.get(k, 0) for k in ("entire_frame_compile", "entire_backward_compile")) / 1e9


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def load_case_model(spec: dict[str, Any], case: Case) -> torch.nn.Module:
    """The case's model as the library loads it (LoRA and gradient checkpointing as the case says)."""
    from dialogsum.config import LoraArguments
    from dialogsum.modeling import apply_lora, enable_gradient_checkpointing, load_model

    torch.manual_seed(spec["seed"])
    # the reference loads the model as the usual example does (from_pretrained, nothing swapped)
    model = load_model(spec["model_path"], fused_activations=case.loop != "reference")
    if case.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if case.method == "lora":
        model = apply_lora(model, LoraArguments(), gradient_checkpointing=case.gradient_checkpointing)
    return model
