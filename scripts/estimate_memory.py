"""Memory of a FLAN-T5 training run before launching it: per GPU and per host, for DDP, ZeRO-2, ZeRO-3 and ZeRO-3
with CPU offload, and the accelerate config that fits a GPU size.

  python scripts/estimate_memory.py --model flan-t5-xl --method full --num_gpus 8 --gpu_memory_gb 40
  python scripts/estimate_memory.py --model ../shared/models/flan-t5-base --method lora --batch 2 \
      --source_len 256 --target_len 64 --precision fp32 --device cpu --measure   # + measured on this CPU

The arithmetic is dialogsum/memory.py's (docs/benchmarks.md compares it with measured peaks).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from dialogsum import memory
from dialogsum.cli import run_cli
from dialogsum.errors import UserError


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flan-t5-base", help=f"{', '.join(memory.PRESETS)} or a T5 model folder")
    p.add_argument("--method", choices=("full", "lora"), default="full")
    p.add_argument("--optim", choices=("adamw", "adafactor"), default="adamw")
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs (processes) in all")
    p.add_argument("--num_nodes", type=int, default=1, help="hosts the GPUs are spread over")
    p.add_argument("--gpu_memory_gb", type=float, default=None, help="memory of one GPU: name the config that fits")
    p.add_argument("--batch", type=int, default=8, help="per-device batch (--per_device_train_batch_size)")
    p.add_argument("--source_len", type=int, default=512, help="padded prompt tokens (--max_source_length)")
    p.add_argument("--target_len", type=int, default=128, help="padded summary tokens (--max_target_length)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="the accelerate config's")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--lora_r", type=int, default=32)
    p.add_argument("--lora_target_modules", nargs="+", default=["q", "v"], help="names, or all-linear")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    p.add_argument("--measure", action="store_true", help="also train a few steps on this CPU and measure (fp32)")
    p.add_argument("--measure_steps", type=int, default=3)
    args = p.parse_args(argv)
    for name in ("num_gpus", "num_nodes", "batch", "source_len", "target_len", "lora_r", "measure_steps"):
        if not 0 < getattr(args, name) < 2**31:
            raise UserError(f"--{name} must be from 1 to 2**31 - 1, got {getattr(args, name)}")
    if args.measure and not Path(args.model).is_dir():
        raise UserError(f"--measure builds the model from a folder's config.json; --model {args.model} is not a folder")
    if args.gpu_memory_gb is not None and not 0 < args.gpu_memory_gb < float("inf"):
        raise UserError(f"--gpu_memory_gb must be a positive number of GB, got {args.gpu_memory_gb}")
    memory.check_lora_targets(args.lora_target_modules)
    if args.num_gpus % args.num_nodes:
        raise UserError(f"--num_gpus {args.num_gpus} is not a multiple of --num_nodes {args.num_nodes}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Print the estimate (and, with --measure, the measured peak); return it as a dict."""
    args = parse(argv)
    setup = memory.Setup(
        dims=memory.resolve_dims(args.model),
        method=args.method,
        optim=args.optim,
        num_gpus=args.num_gpus,
        num_nodes=args.num_nodes,
        batch=args.batch,
        source_len=args.source_len,
        target_len=args.target_len,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        lora_targets=tuple(args.lora_target_modules),
        device=args.device,
    )
    estimates = memory.estimate(setup)
    result = memory.as_json(setup, estimates)
    if args.measure:
        memory.check_fits_this_machine(estimates[0])
        result["measured"] = memory.measure(args.model, setup, args.measure_steps)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(memory.report(setup, estimates, args.gpu_memory_gb))
        if args.measure:
            print(memory.measured_report(result["measured"], estimates[0]))
    return result


if __name__ == "__main__":
    run_cli(main)
