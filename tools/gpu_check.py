"""GPU check: the real flan-t5-base architecture (random weights) through every launch path on one GPU.

One command, no network, no pretrained weights:

    python scripts/gpu_check.py                      # ../shared/models/flan-t5-base + ../shared/data/dialogsum
    python scripts/gpu_check.py --model_dir DIR --data_file FILE.jsonl --steps 30

It builds flan-t5-base from its config (random init, own lm_head: 247.6M parameters), then trains a few dozen
steps on DialogSum-format data with the unchanged training scripts under ``accelerate launch`` and the shipped
launcher configs as they are (bf16, compiled): full and LoRA, plain single GPU, DeepSpeed ZeRO-2 and ZeRO-3 and
FSDP with one process, gradient checkpointing off and on; each run also generates for a few test dialogues
(ZeRO-3: synced_gpus). It prints a table of tokens/s, MFU, peak memory (torch.cuda.max_memory_allocated; process
RSS with --cpu) beside scripts/estimate_memory.py's estimate for the run, step time and whether the run
compiled, and writes it to ``<work_dir>/gpu_check.{md,json}`` after every run. The numbers say whether each
path works and how fast; ROUGE of a random model is meaningless and not shown. ``--parallel N`` runs N at a time
(to fit a short lease: the runs then share the GPU and the host, so their speeds are lower bounds, marked as
such).

MFU uses the benchmark's FLOP formula (:mod:`tools.flops`): the mean training FLOPs per real token
of the data file times the run's real tokens/s, over the GPU's dense bf16 peak (``--peak_tflops``, else known by
the GPU's name).
``--cpu`` runs the same plan on CPU (cpu.yaml, DeepSpeed on gloo) to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dialogsum.files import write_json, write_text
from dialogsum.formatting import markdown_table
from tools import REPO
from tools.flops import T5Dims, mfu, training_flops_per_token

SHARED = REPO.parent / "shared"

#: The memory estimate's strategy (dialogsum.memory) of each launcher config; FSDP is not modelled.
STRATEGIES = {
    "cpu.yaml": "ddp",
    "single_gpu.yaml": "ddp",
    "multi_gpu.yaml": "ddp",
    "deepspeed_zero2.yaml": "zero2",
    "deepspeed_zero3.yaml": "zero3",
    "deepspeed_zero3_offload.yaml": "zero3_offload",
}

#: Dense bf16 peak TFLOP/s by GPU name (tensor cores, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
    "L4": 121.0,
}


@dataclass
class Run:
    """One training run of the check."""

    name: str
    config: str
    method: str
    gradient_checkpointing: bool = False
    launch_args: list[str] = field(default_factory=list)


def plan(cpu: bool) -> list[Run]:
    """The runs, in order: plain single device first (fastest to fail), then DeepSpeed, then FSDP (GPU only:
    accelerate runs an FSDP config on the CPU as plain data parallel, which dialogsum refuses)."""
    single = "cpu.yaml" if cpu else "single_gpu.yaml"
    one = ["--num_processes", "1"]
    runs = [
        Run("full", single, "full"),
        Run("full +gc", single, "full", True),
        Run("lora", single, "lora"),
        Run("lora +gc", single, "lora", True),
        Run("zero2 full", "deepspeed_zero2.yaml", "full", launch_args=one),
        Run("zero2 lora", "deepspeed_zero2.yaml", "lora", launch_args=one),
        Run("zero3 full", "deepspeed_zero3.yaml", "full", launch_args=one),
        Run("zero3 lora", "deepspeed_zero3.yaml", "lora", launch_args=one),
        Run("zero3 lora +gc", "deepspeed_zero3.yaml", "lora", True, launch_args=one),
    ]
    if not cpu:
        runs.append(Run("fsdp full", "fsdp.yaml", "full", launch_args=one))
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=str(SHARED / "models" / "flan-t5-base"), help="config.json + tokenizer")
    p.add_argument("--data_file", default=str(SHARED / "data" / "dialogsum" / "dialogsum.dev.jsonl"))
    p.add_argument("--work_dir", default="/tmp/dialogsum_gpu_check", help="random model, run outputs, table")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--batch_size", type=int, default=8, help="per-device training batch size")
    p.add_argument("--max_source_length", type=int, default=512)
    p.add_argument("--max_target_length", type=int, default=128)
    p.add_argument("--eval_samples", type=int, default=8, help="test dialogues generated per run (0 = none)")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--only", nargs="*", default=None, help="run names to keep, e.g. 'full' 'zero3 lora'")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run before it counts as hung")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (>1: they share the GPU; speeds lower)")
    p.add_argument("--cpu", action="store_true", help="check the script on CPU (tiny --model_dir advised)")
    return p.parse_args(argv)


def prepare_model(model_dir: Path, out: Path) -> int:
    """Random-init model of ``model_dir``'s architecture, saved with its tokenizer; returns its parameter count."""
    from transformers import AutoTokenizer

    from dialogsum.modeling import model_from_config

    model = model_from_config(str(model_dir), seed=0)
    if not (out / "config.json").is_file():
        model.save_pretrained(str(out), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model_dir: Path, data_file: Path, args: argparse.Namespace) -> dict[str, float]:
    """Training FLOPs per real token of ``data_file`` (as the runs tokenize it), for full and for LoRA."""
    from transformers import AutoConfig

    from dialogsum.config import DataArguments
    from dialogsum.data import read_rows, tokenize_rows
    from dialogsum.modeling import load_tokenizer

    data = DataArguments(max_source_length=args.max_source_length, max_target_length=args.max_target_length)
    dataset, _ = tokenize_rows(read_rows(data_file), load_tokenizer(str(model_dir)), data)
    lengths = [(len(s), len(t)) for s, t in zip(dataset.input_ids, dataset.labels, strict=True)]
    dims = T5Dims.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return {method: training_flops_per_token(dims, lengths, method) for method in ("full", "lora")}


def train_command(run: Run, model: Path, data_file: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """``accelerate launch`` of the unchanged training script for one run."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(REPO / "accelerate_configs" / run.config), *run.launch_args]
    if args.cpu and run.config.startswith("deepspeed"):
        cmd += ["--mixed_precision", "bf16"]
    cmd += [str(REPO / "scripts" / f"train_{run.method}.py"), "--model_name_or_path", str(model)]
    cmd += ["--train_file", str(data_file), "--test_file", str(data_file), "--output_dir", str(out)]
    cmd += ["--overwrite_output_dir", "--report_to", "none", "--max_train_steps", str(args.steps)]
    cmd += ["--per_device_train_batch_size", str(args.batch_size), "--logging_steps", "5"]
    cmd += ["--max_source_length", str(args.max_source_length), "--max_target_length", str(args.max_target_length)]
    cmd += ["--gradient_checkpointing", str(run.gradient_checkpointing).lower()]
    if args.eval_samples:
        cmd += ["--max_test_samples", str(args.eval_samples), "--max_new_tokens", "32"]
        cmd += ["--per_device_eval_batch_size", str(args.eval_samples)]
    else:
        cmd += ["--do_eval", "false"]
    return cmd


def measure(out: Path, run: Run, per_token: dict[str, float], peak: float | None) -> dict:
    """Throughput, step time, MFU and memory of a finished run (first logging window = warm-up, dropped)."""
    metrics = json.loads((out / "metrics.json").read_text())
    logs = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    windows = [h for h in logs if "tokens_per_s" in h and "loss" in h]
    steady = windows[1:] or windows
    tokens_per_s = statistics.median(h["tokens_per_s"] for h in steady)
    samples_per_s = statistics.median(h["samples_per_s"] for h in steady)
    global_batch = int(metrics.get("num_processes", 1)) * run_batch(out)
    flops = per_token[run.method] * tokens_per_s
    utilisation = mfu(flops, peak * 1e12 if peak else None)
    return {
        "run": run.name,
        "config": run.config,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_time_s": round(global_batch / samples_per_s, 4) if samples_per_s else None,
        "tflops": float(f"{flops / 1e12:.3g}"),
        "mfu": float(f"{utilisation:.3g}") if utilisation is not None else None,
        "peak_memory_gb": round(metrics["peak_memory_mb"] / 1000, 2),
        "train_loss": metrics.get("train_loss"),
        "predictions": metrics.get("num_eval_examples"),
        "distributed_type": metrics.get("distributed_type"),
        "mixed_precision": metrics.get("mixed_precision"),
        "status": "ok",
    }


def estimated_gb(run: Run, model: Path, out: Path, args: argparse.Namespace) -> float | None:
    """dialogsum.memory's per-device estimate of the finished run in GB, beside its measured peak: at the full
    ``--max_source_length``/``--max_target_length`` (an upper bound: length-grouped batches are shorter), without
    the assumed CUDA runtime (``max_memory_allocated`` does not see it). None for FSDP (not modelled)."""
    from dialogsum import memory

    strategy = STRATEGIES.get(run.config)
    if strategy is None:
        return None
    metrics = json.loads((out / "metrics.json").read_text())
    setup = memory.Setup(
        dims=memory.resolve_dims(str(model)),
        method=run.method,
        num_gpus=int(metrics.get("num_processes", 1)),
        batch=args.batch_size,
        source_len=args.max_source_length,
        target_len=args.max_target_length,
        precision="bf16" if metrics.get("mixed_precision") == "bf16" else "fp32",
        gradient_checkpointing=run.gradient_checkpointing,
        device="cpu" if args.cpu else "cuda",
    )
    (estimate,) = [e for e in memory.estimate(setup) if e.strategy == strategy]
    return round((estimate.gpu_bytes - estimate.gpu.get("CUDA runtime (assumed)", 0)) / 1e9, 2)


def run_batch(out: Path) -> int:
    """Per-device batch size recorded in the run's resolved config."""
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    return int(config["per_device_train_batch_size"]) * int(config["gradient_accumulation_steps"])


def execute(cmd: list[str], timeout: int) -> tuple[str, str]:
    """Run one launch; return ("ok" or "FAILED: <last error line>", its output)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr or "")
        return f"FAILED: timed out after {timeout} s (hang?)", output
    if proc.returncode == 0:
        return "ok", proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or line.startswith("error:")]
    last = (errors or proc.stderr.strip().splitlines() or ["no output"])[-1].strip()
    return f"FAILED: {last[:160]}", proc.stdout + proc.stderr


def table(rows: list[dict]) -> str:
    """Markdown table of the results."""
    header = ["run", "launcher config", "compiled", "tokens/s", "step time (s)", "TFLOP/s", "MFU", "peak memory (GB)"]
    header += ["estimate (GB)", "status"]
    keys = ["run", "config", "compiled", "tokens_per_s", "step_time_s", "tflops", "mfu", "peak_memory_gb"]
    keys += ["estimate_gb", "status"]
    cells = [[r.get(k, "") for k in keys] for r in rows]
    for r, row in zip(rows, cells, strict=True):
        row[2] = {True: "yes", False: "no"}.get(r.get("compiled"), "")
        row[6] = f"{100 * r['mfu']:.3g}%" if r.get("mfu") is not None else "n/a"
    return markdown_table(header, cells)


def device_peak(args: argparse.Namespace) -> tuple[str, float | None]:
    """Device name and its bf16 peak TFLOP/s (None when unknown)."""
    import torch

    if args.cpu:
        return "cpu", args.peak_tflops
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible; use --cpu to check the script on CPU")
    name = torch.cuda.get_device_name(0)
    known = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return name, args.peak_tflops or known


def main(argv: list[str] | None = None) -> None:
    """Prepare the random model, run every configuration, print and save the table."""
    args = parse_args(argv)
    model_dir, data_file, work = Path(args.model_dir), Path(args.data_file), Path(args.work_dir)
    for path, what in ((model_dir / "config.json", "--model_dir config.json"), (data_file, "--data_file")):
        if not path.is_file():
            sys.exit(f"error: {what} not found: {path}")
    runs = [r for r in plan(args.cpu) if args.only is None or r.name in args.only]
    if not runs:
        sys.exit(f"error: --only matched no run; names: {', '.join(r.name for r in plan(args.cpu))}")
    if args.parallel < 1:
        sys.exit(f"error: --parallel must be at least 1, got {args.parallel}")
    os.environ.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    device, peak = device_peak(args)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parameters = prepare_model(model_dir, work / "model")
    per_token = flops_per_token(model_dir, data_file, args)
    print(
        f"device {device}; peak {peak} TFLOP/s; {parameters / 1e6:.1f}M parameters; "
        f"{per_token['full'] / 1e9:.2f} GFLOP per real token (full fine-tuning)",
        flush=True,
    )
    rows: list[dict] = []
    lock = threading.Lock()

    def one(run: Run) -> None:
        out = work / run.name.replace(" ", "_").replace("+", "")
        t0 = time.perf_counter()
        status, log = execute(train_command(run, work / "model", data_file, out, args), args.timeout)
        if status == "ok":
            row = measure(out, run, per_token, peak)
            row["estimate_gb"] = estimated_gb(run, work / "model", out, args)
            row["compiled"] = "compiling the model" in log
        else:
            row = {"run": run.name, "config": run.config, "status": status}
            write_text(work / f"{out.name}.log", log)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row["parallel"] = args.parallel
        with lock:
            rows.append(row)
            rows.sort(key=lambda r: [x.name for x in runs].index(r["run"]))
            print(f"{run.name}: {row['status']} ({row['wall_s']} s)", flush=True)
            # Written after every run, so a check stopped part-way still leaves the rows it finished.
            write_text(work / "gpu_check.md", report(device, rows, started, args.parallel))
            write_json(work / "gpu_check.json", {"device": device, "peak_tflops": peak, "runs": rows})

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        list(pool.map(one, runs))
    print(report(device, rows, started, args.parallel))
    sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)


def report(device: str, rows: list[dict], started: float, parallel: int) -> str:
    """The Markdown report: a title line, then the table."""
    shared = f"; {parallel} runs at a time, so speeds are lower bounds" if parallel > 1 else ""
    return f"GPU check on {device} ({time.perf_counter() - started:.0f} s{shared})\n\n{table(rows)}\n"
