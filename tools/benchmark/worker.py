"""Inside a case's process: our case through the library (accelerator, optimizer, scheduler, sampler, collator and
the real ``train_loop``, called twice: the warm-up steps, then the measured steps), or the reference loop."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dialogsum.files import write_json
from tools.benchmark.cases import Case
from tools.benchmark.eval_speed import eval_speed
from tools.benchmark.measure import compile_seconds, compiled_graphs, load_case_model, matmul_peak, sync
from tools.benchmark.reference import run_reference


@dataclass
class _Batches:
    """How our case batches its data: the loader, its sampler, the pad widths and every example's lengths."""

    loader: Any
    sampler: Any
    widths: Any
    src: list[int]
    tgt: list[int]


def _train_config(spec: dict[str, Any], case: Case, work: Path, count: int) -> Any:
    """The library's config for ``count`` optimizer steps of the case (a log line every step, no tracking)."""
    from dialogsum.config import build_config

    settings = {
        "output_dir": str(work),
        "per_device_train_batch_size": spec["batch_size"],
        "max_train_steps": count,
        "logging_steps": 1,
        "report_to": "none",
        "seed": spec["seed"],
        "gradient_checkpointing": case.gradient_checkpointing,
    }
    return build_config(case.method, settings)


def _batches(spec: dict[str, Any], case: Case, count: int) -> _Batches:
    """The library's sampler and collator over the pool (fixed-size cases) or the whole file (a token budget,
    several epochs if need be)."""
    from torch.utils.data import DataLoader

    from dialogsum.data import LengthGroupedBatchSampler, PadWidths, Seq2SeqCollator, TokenBudget, TokenizedDataset

    widths = PadWidths.bucketed(spec["max_source_length"], spec["max_target_length"]) if case.buckets else PadWidths()
    data = spec["dataset"] if case.max_tokens else spec["pool"]
    dataset = TokenizedDataset(data["input_ids"], data["labels"])
    src = [len(x) for x in dataset.input_ids]
    tgt = [len(x) for x in dataset.labels]
    budget = TokenBudget(case.max_tokens, src, tgt, widths) if case.max_tokens else None
    sampler = LengthGroupedBatchSampler(
        dataset.lengths(),
        spec["batch_size"],
        seed=spec["seed"],
        group_by_length=case.batching != "random",
        mega_batches=50 if budget else count,
        budget=budget,
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Seq2SeqCollator(spec["pad_token_id"], widths))
    return _Batches(loader, sampler, widths, src, tgt)


def _timed_steps(run_steps: Any, device: torch.device, warmup: int, count: int) -> dict[str, Any]:
    """``run_steps(total_steps=n)`` (``train_loop``) to ``warmup``, then timed to ``count``; the time torch spends
    compiling a shape first seen in the measured steps is taken out of their seconds."""
    losses: list[float] = []
    compile_before, warmup_s = compile_seconds(), 0.0
    if warmup:
        start = time.perf_counter()
        first = run_steps(total_steps=warmup)
        sync(device)
        warmup_s = time.perf_counter() - start
        losses += [e["loss"] for e in first.history if "loss" in e]
    compile_warmup = compile_seconds() - compile_before
    graphs_before = compiled_graphs()
    sync(device)
    start = time.perf_counter()
    result = run_steps(total_steps=count)
    sync(device)
    seconds = time.perf_counter() - start
    compile_measured = compile_seconds() - compile_before - compile_warmup
    losses += [e["loss"] for e in result.history if "loss" in e and e["step"] > warmup]
    return {
        "seconds": seconds - compile_measured,  # compile time is reported on its own, not as step time
        "compile_seconds": compile_warmup + compile_measured,
        "compile_seconds_in_measured_steps": compile_measured,
        "graphs_compiled_in_measured_steps": compiled_graphs() - graphs_before,
        "warmup_seconds": warmup_s,
        "losses": losses,
    }


def _measured_examples(batches: _Batches, warmup: int, count: int) -> dict[str, Any]:
    """Real tokens, samples and padding of the batches ``train_loop`` took in the measured steps (epoch after epoch:
    one process, no accumulation)."""
    epochs = 0
    order: list[list[int]] = []
    while len(order) < count:
        order += batches.sampler.batches(epochs)
        epochs += 1
    measured = order[warmup:count]
    src, tgt, widths = batches.src, batches.tgt, batches.widths
    lengths = [(src[i], tgt[i]) for batch in measured for i in batch]
    padded = sum(widths.padded_tokens(len(b), max(src[i] for i in b), max(tgt[i] for i in b)) for b in measured)
    return {
        "real_tokens": sum(s + t for s, t in lengths),
        "samples": len(lengths),
        "padding_fraction": 1.0 - sum(s + t for s, t in lengths) / padded if padded else 0.0,
        "lengths": lengths,
    }


def run_ours(spec: dict[str, Any], case: Case, work: Path) -> dict[str, Any]:
    """Our case's figures: the library's accelerator, optimizer, scheduler, sampler, collator and ``train_loop``."""
    from dialogsum.checkpointing import TrainState
    from dialogsum.distributed import build_accelerator, compiles, peak_memory_mb, set_deepspeed_micro_batch
    from dialogsum.modeling import parameter_report
    from dialogsum.training import build_optimizer, build_scheduler, train_loop

    warmup, count = spec["warmup_steps"], spec["warmup_steps"] + spec["steps"]
    cfg = _train_config(spec, case, work, count)
    accelerator = build_accelerator()
    if compiles(accelerator) != case.compiled:
        raise RuntimeError(
            f"case {case.name}: compiled={case.compiled} but the accelerator says {compiles(accelerator)}"
        )
    model = load_case_model(spec, case)
    params = parameter_report(model)
    batches = _batches(spec, case, count)
    optimizer = build_optimizer(model, cfg)
    set_deepspeed_micro_batch(accelerator, spec["batch_size"])
    model, optimizer, loader = accelerator.prepare(model, optimizer, batches.loader)
    scheduler = build_scheduler(optimizer, cfg, count)
    state = TrainState(num_processes=accelerator.num_processes)
    peak_before = matmul_peak(accelerator.device, accelerator.mixed_precision)
    run_steps = partial(
        train_loop,
        accelerator,
        cfg,
        model=model,
        tokenizer=None,  # no --checkpointing_steps: the case saves no checkpoint
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        sampler=batches.sampler,
        state=state,
    )
    timed = _timed_steps(run_steps, accelerator.device, warmup, count)
    peak_after = matmul_peak(accelerator.device, accelerator.mixed_precision)
    out = {
        **timed,
        **_measured_examples(batches, warmup, count),
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "matmul_peak_gflops": max(peak_before, peak_after),
        "mixed_precision": accelerator.mixed_precision,
        "compiled": compiles(accelerator),
        "distributed_type": accelerator.distributed_type.value,
        "tf32": bool(accelerator.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32),
        **params,
    }
    if case.with_eval:
        out["eval"] = eval_speed(spec, accelerator, accelerator.unwrap_model(model, keep_torch_compile=False))
    return out


def run_worker(spec_path: str, result_path: str) -> None:
    """Entry point of a case's process: run it and write its figures as JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    case = Case(**spec["case"])
    with tempfile.TemporaryDirectory(prefix="dialogsum-bench-") as work:
        out = run_reference(spec, case) if case.loop == "reference" else run_ours(spec, case, Path(work))
    out["threads"] = torch.get_num_threads()
    write_json(result_path, out)
