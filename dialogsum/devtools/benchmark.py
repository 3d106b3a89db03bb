"""Training and evaluation speed, side by side with the usual Accelerate loop, on one machine in one run.

How a run is organised (``run_benchmark``):

* The data file is tokenized once with the library's tokenizer code. The measured steps all draw from one
  *pool* of examples: ``warmup_steps + steps`` batches of the library's length-grouped sampler over the whole
  file, picked at evenly spaced quantiles of their token count so that short and long batches are both
  represented. Every training case trains on exactly this pool, so the real (non-pad) tokens are the same and
  only the batching, precision, method and loop differ.
* Each case runs in a fresh process (forked from a server that has only imported the libraries): peak RSS
  (or peak GPU memory) is then that case's own, and no allocator state leaks from one case into the next.
* Our cases go through the library: ``load_model``/``apply_lora``/``enable_gradient_checkpointing``,
  ``build_accelerator`` (precision from ``ACCELERATE_MIXED_PRECISION``, as ``accelerate launch`` sets it),
  ``build_optimizer``, ``build_scheduler``, the ``LengthGroupedBatchSampler``, the ``Seq2SeqCollator`` and the
  real ``train_loop`` (called twice: the warm-up steps, then the measured steps).
* The reference case is the usual Accelerate summarization example (``run_summarization_no_trainer.py``):
  ``DataLoader(shuffle=True)`` with ``DataCollatorForSeq2Seq`` (dynamic padding), fp32, plain
  ``torch.optim.AdamW`` (PyTorch's default implementation), linear schedule, no clipping, same model, pool,
  batch size and steps, and all CPU cores (not the 1 thread ``accelerate launch`` gives it by default).
* Model FLOPs utilisation: useful training FLOPs of the measured steps (:mod:`dialogsum.devtools.flops`, real
  tokens only) per second over the best dense-matmul rate measured in the same process, right before and
  after the timed steps, at the case's precision.
* Evaluation: summaries/s of :func:`dialogsum.evaluation.generate_summaries` (batched, length-sorted) against
  one ``generate`` call per dialogue (the lab's way), same model, precision and generation settings.
* Our default path is what the launcher config (``--accelerate_config``: cpu.yaml on a CPU, single_gpu.yaml on a
  GPU) sets: its ``mixed_precision`` (through the CPU's bf16 guard) and its ``dynamo_config``. A compiled
  default pads to length buckets (``--length_buckets auto``). Each case's process gets the ``ACCELERATE_*``
  variables that ``accelerate launch`` would export for its config (DeepSpeed's too), changed only where the case
  differs (precision, eager, buckets). On a GPU the cases also cover compiled vs eager, buckets on/off, LoRA,
  token budgets (``--token_budgets``) and ZeRO-2; compile time is measured with torch's own compile counters,
  reported on its own and left out of the step times.
* A case that fails or runs out of time is recorded as failed and the run goes on; the JSON is rewritten after
  every case, so a run stopped part-way leaves the cases it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from dialogsum.devtools.flops import FLOP_FORMULA, T5Dims, mfu, training_flops
from dialogsum.errors import ConfigError, UserError
from dialogsum.files import write_json
from dialogsum.formatting import markdown_table, significant
from dialogsum.precision import matmul_peak_gflops

logger = logging.getLogger(__name__)

#: The project's speed goals for its default path, as ratios within one run, by device; the table says which are
#: met (a figure that was not measured has no target line).
TARGETS = {
    "cpu": {
        "train_speedup_vs_reference": 2.5,
        "train_speedup_vs_reference_fp32": 2.0,
        "eval_speedup": 5.0,
        "mfu": 0.6,
    },
    "cuda": {
        "train_speedup_vs_reference": 3.0,
        "lora_speedup_vs_reference": 1.0,
        "token_budget_mfu": 0.35,
        "eval_speedup": 5.0,
    },
}

PRECISION_NAMES = {"no": "fp32", "bf16": "bf16"}


# --------------------------------------------------------------------------------------------- arguments


def _flag(default: Any, text: str) -> Any:
    """A flag field: its default and its ``--help`` text."""
    return field(default=default, metadata={"help": text})


@dataclass
class BenchmarkArgs:
    """What to benchmark and how long: the flags of ``scripts/benchmark.py`` (``HfArgumentParser`` reads them)."""

    model_dir: str = field(
        metadata={"help": "Directory with a seq2seq config and tokenizer (weights if any; random weights otherwise)."}
    )
    data_file: str = field(metadata={"help": "DialogSum-format .jsonl/.json/.csv/.parquet file."})
    output_json: str | None = _flag(None, "Write the detailed results here (JSON).")
    quick: bool = _flag(
        False, "Short run: 2 steps, 16 summaries of 32 tokens; on a CPU 6 cases, on a GPU the headline cases."
    )
    full_grid: bool = _flag(False, "Every method x batching x precision (default unless --quick).")
    steps: int | None = _flag(None, "Measured training steps per case (default 4; 2 with --quick).")
    warmup_steps: int = _flag(1, "Steps run first in every case and excluded from the figures.")
    batch_size: int = _flag(8, "Training batch size, the same for every case.")
    max_source_length: int = _flag(512, "Prompt tokens kept (longer prompts are truncated).")
    max_target_length: int = _flag(128, "Summary tokens kept for training labels.")
    eval_samples: int | None = _flag(None, "Dialogues summarised in the evaluation test (default 32; 16 with --quick).")
    eval_batch_size: int = _flag(16, "Batch size of batched generation.")
    max_new_tokens: int | None = _flag(None, "Generated tokens per summary (default 64; 32 with --quick).")
    accelerate_config: str | None = _flag(
        None,
        "Launcher config whose mixed_precision defines our default path "
        "(default: accelerate_configs/cpu.yaml on CPU, single_gpu.yaml on GPU).",
    )
    token_budgets: list[int] = field(
        default_factory=lambda: [16384, 65536],
        metadata={"help": "Padded tokens per batch of the token-budget cases (on a GPU; --max_tokens_per_batch)."},
    )
    only: list[str] = field(
        default_factory=list,
        metadata={"help": "Run only these cases of the plan (names as in the table; figures that need others: n/a)."},
    )
    seed: int = _flag(42, "Seed of the sampler, the reference DataLoader and the model initialisation.")
    text_column: str = _flag("dialogue", "Column with the dialogue text.")
    summary_column: str = _flag("summary", "Column with the reference summary.")
    worker_timeout_s: int = _flag(3600, "Give up on one case after this many seconds.")


#: Defaults of the flags that ``--quick`` lowers: (without --quick, with --quick).
SIZE_DEFAULTS = {"steps": (4, 2), "eval_samples": (32, 16), "max_new_tokens": (64, 32)}


def parse_args(argv: list[str] | None = None) -> BenchmarkArgs:
    """Parse and validate the flags (a bad flag or value is a :class:`ConfigError`, exit code 2)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message: str) -> NoReturn:  # type: ignore[override]
            raise ConfigError(f"{message} (see --help)")

    parser = Parser(
        BenchmarkArgs,
        description="Training and evaluation speed of dialogsum against the usual Accelerate loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    (args,) = parser.parse_args_into_dataclasses(argv)
    for key, (full, quick) in SIZE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    for name in (
        "steps",
        "batch_size",
        "max_source_length",
        "max_target_length",
        "eval_samples",
        "eval_batch_size",
        "max_new_tokens",
        "worker_timeout_s",
    ):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    smallest = args.max_source_length + args.max_target_length
    for budget in args.token_budgets:
        if budget < smallest:
            raise ConfigError(
                f"--token_budgets {budget} does not fit one example of {args.max_source_length} + "
                f"{args.max_target_length} tokens; use at least {smallest}"
            )
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    return args


# --------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- data pool


@dataclass
class Pool:
    """The examples every training case trains on (token ids, unpadded)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dataset_input_ids: list[list[int]]
    """The whole file's examples (the token-budget cases batch all of them)."""
    dataset_labels: list[list[int]]
    epoch_padding_grouped: float
    epoch_padding_random: float
    truncated_sources: int
    rows: int


def _representative_batches(batches: list[list[int]], tokens: list[int], count: int) -> list[list[int]]:
    """``count`` batches at evenly spaced quantiles of their real-token count."""
    order = sorted(range(len(batches)), key=lambda i: sum(tokens[j] for j in batches[i]))
    picks = [order[min(len(order) - 1, int((k + 0.5) * len(order) / count))] for k in range(count)]
    return [batches[i] for i in picks]


def build_pool(args: BenchmarkArgs, tokenizer: Any) -> Pool:
    """Tokenize the data file with the library and pick the pool of examples the cases train on."""
    from dialogsum.config import DataArguments
    from dialogsum.data import LengthGroupedBatchSampler, padding_fraction, read_rows, tokenize_rows, validate_rows

    data_args = DataArguments(
        max_source_length=args.max_source_length,
        max_target_length=args.max_target_length,
        text_column=args.text_column,
        summary_column=args.summary_column,
    )
    rows = validate_rows(read_rows(args.data_file), data_args, "benchmark", args.data_file)
    dataset, stats = tokenize_rows(rows, tokenizer, data_args)
    count = args.warmup_steps + args.steps
    full_batches = len(dataset) // args.batch_size
    if full_batches < count:
        raise UserError(
            f"{args.data_file} has {len(dataset)} rows: too few for {count} batches of {args.batch_size} "
            f"(--warmup_steps + --steps); use a bigger file or fewer steps"
        )
    src = [len(x) for x in dataset.input_ids]
    tgt = [len(x) for x in dataset.labels]
    grouped = LengthGroupedBatchSampler(dataset.lengths(), args.batch_size, seed=args.seed, group_by_length=True)
    random_ = LengthGroupedBatchSampler(dataset.lengths(), args.batch_size, seed=args.seed, group_by_length=False)
    epoch = [b for b in grouped.batches(0) if len(b) == args.batch_size]
    chosen = _representative_batches(epoch, dataset.lengths(), count)
    indices = [i for batch in chosen for i in batch]
    return Pool(
        input_ids=[dataset.input_ids[i] for i in indices],
        labels=[dataset.labels[i] for i in indices],
        dataset_input_ids=dataset.input_ids,
        dataset_labels=dataset.labels,
        epoch_padding_grouped=padding_fraction(grouped.batches(0), src, tgt),
        epoch_padding_random=padding_fraction(random_.batches(0), src, tgt),
        truncated_sources=stats.truncated_sources,
        rows=len(dataset),
    )


# --------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One measured training configuration."""

    name: str
    loop: str  # "ours" | "reference"
    method: str  # "full" | "lora"
    batching: str  # "grouped" | "random" | "budget"
    precision: str  # accelerate's value: "no" | "bf16"
    gradient_checkpointing: bool = False
    with_eval: bool = False
    force_precision: bool = False
    compiled: bool = False
    buckets: bool = False
    max_tokens: int | None = None
    launch_config: str | None = None  # a launcher config other than the default one (e.g. deepspeed_zero2.yaml)


def case_name(
    method: str,
    batching: str,
    precision: str,
    gc: bool,
    compiled: bool = False,
    buckets: bool | None = None,
    max_tokens: int | None = None,
    prefix: str = "",
) -> str:
    """E.g. ``full-grouped-bf16``, ``lora-grouped-bf16-gc``, ``full-grouped-bf16-compiled`` (with the length buckets
    that go with compiling), ``full-grouped-bf16-compiled-nobuckets``, ``full-budget16k-bf16-compiled``."""
    budget = f"{max_tokens // 1024}k" if max_tokens and max_tokens % 1024 == 0 else str(max_tokens or "")
    name = f"{prefix}{method}-{batching}{budget}-{PRECISION_NAMES[precision]}"
    if compiled:
        name += "-compiled" + ("-nobuckets" if buckets is False else "")
    elif buckets:
        name += "-buckets"
    return name + ("-gc" if gc else "")


def _ours(
    method: str,
    batching: str,
    precision: str,
    compiled: bool,
    gc: bool = False,
    buckets: bool | None = None,
    max_tokens: int | None = None,
    launch_config: str | None = None,
    default_precision: str = "no",
    with_eval: bool = False,
) -> Case:
    """One of our cases; length buckets go with compiling unless ``buckets`` says otherwise (``auto``)."""
    prefix = f"{Path(launch_config).stem.removeprefix('deepspeed_')}-" if launch_config else ""
    return Case(
        case_name(method, batching, precision, gc, compiled, buckets, max_tokens, prefix),
        "ours",
        method,
        batching,
        precision,
        gc,
        with_eval=with_eval,
        force_precision=precision == "bf16" and precision != default_precision,
        compiled=compiled,
        buckets=compiled if buckets is None else buckets,
        max_tokens=max_tokens,
        launch_config=launch_config,
    )


def plan_cases(
    precision: str, full_grid: bool, compiled: bool = False, gpu: bool = False, token_budgets: tuple[int, ...] = ()
) -> list[Case]:
    """The reference, our default path (``precision``, ``compiled`` as the launcher config says; with the eval
    test), then one change at a time; ``full_grid`` adds more.

    On a CPU (``gpu`` False) the changes are precision, batching, LoRA and gradient checkpointing (``full_grid``:
    every method x batching x precision, and LoRA with checkpointing). On a GPU they are eager vs compiled in
    both precisions, length buckets on/off, LoRA, and token budgets; ``full_grid`` adds LoRA eager, random
    batches, ZeRO-2 and gradient checkpointing.
    """
    other = "no" if precision == "bf16" else "bf16"
    default = _ours("full", "grouped", precision, compiled, default_precision=precision, with_eval=True)
    cases = [Case("reference", "reference", "full", "random", "no"), default]

    def add(*args: Any, **kwargs: Any) -> None:
        case = _ours(*args, default_precision=precision, **kwargs)
        if case.name not in {c.name for c in cases}:
            cases.append(case)

    if gpu:
        add("full", "grouped", precision, not compiled)  # eager vs compiled, same precision
        add("full", "grouped", other, False)  # the other precision, eager (bf16 vs TF32 without compiling)
        add("full", "grouped", other, True)  # ... and compiled
        add("full", "grouped", precision, True, buckets=False)  # compiled without length buckets
        add("full", "grouped", precision, True, buckets=True)
        add("lora", "grouped", precision, compiled)
        for tokens in token_budgets:
            add("full", "budget", precision, compiled, max_tokens=tokens)
        if full_grid:
            add("lora", "grouped", precision, not compiled)
            add("full", "random", precision, compiled)
            add("full", "grouped", precision, compiled, launch_config="deepspeed_zero2.yaml")
            add("full", "grouped", precision, compiled, gc=True)
        return cases
    if full_grid:
        combos = [(m, b, p) for m in ("full", "lora") for b in ("grouped", "random") for p in (precision, other)]
        for method, batching, case_precision in combos:
            add(method, batching, case_precision, compiled)
        add("full", "grouped", precision, compiled, gc=True)
        add("lora", "grouped", precision, compiled, gc=True)
    else:
        add("full", "grouped", other, compiled)
        add("full", "random", precision, compiled)
        add("lora", "grouped", precision, compiled)
        add("full", "grouped", precision, compiled, gc=True)
    return cases


# --------------------------------------------------------------------------------------------- workers


def _peaks(device: torch.device, precision: str) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # A GPU reaches its matmul peak only on large products (smaller ones are bound by launch and sync).
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    return matmul_peak_gflops(dtype, device, sizes)


def _compile_seconds() -> float:
    """Seconds this process has spent compiling so far (torch.compile's own counters: forward graphs, then the
    backward graphs compiled at their first backward pass); 0 when nothing was compiled."""
    from torch._dynamo.utils import cumulative_time_spent_ns

    return sum(cumulative_time_spent_ns.get(k, 0) for k in ("entire_frame_compile", "entire_backward_compile")) / 1e9


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _load_model(spec: dict[str, Any], case: Case) -> torch.nn.Module:
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


def _run_ours(spec: dict[str, Any], case: Case, work: Path) -> dict[str, Any]:
    """Our path: the library's accelerator, optimizer, scheduler, sampler, collator and ``train_loop``."""
    from torch.utils.data import DataLoader

    from dialogsum.checkpointing import TrainState
    from dialogsum.config import build_config
    from dialogsum.data import LengthGroupedBatchSampler, PadWidths, Seq2SeqCollator, TokenBudget, TokenizedDataset
    from dialogsum.distributed import build_accelerator, compiles, set_deepspeed_micro_batch
    from dialogsum.modeling import parameter_report
    from dialogsum.tracking import peak_memory_mb
    from dialogsum.training import build_optimizer, build_scheduler, train_loop

    warmup, steps, bs = spec["warmup_steps"], spec["steps"], spec["batch_size"]
    count = warmup + steps
    cfg = build_config(
        case.method,
        {
            "output_dir": str(work),
            "per_device_train_batch_size": bs,
            "max_train_steps": count,
            "logging_steps": 1,
            "report_to": "none",
            "seed": spec["seed"],
            "gradient_checkpointing": case.gradient_checkpointing,
        },
    )
    accelerator = build_accelerator()
    if compiles(accelerator) != case.compiled:
        raise RuntimeError(
            f"case {case.name}: compiled={case.compiled} but the accelerator says {compiles(accelerator)}"
        )
    model = _load_model(spec, case)
    params = parameter_report(model)
    widths = PadWidths.bucketed(spec["max_source_length"], spec["max_target_length"]) if case.buckets else PadWidths()
    # the fixed-size cases train on the pool; a token budget batches the whole file (several epochs if need be)
    data = spec["dataset"] if case.max_tokens else spec["pool"]
    dataset = TokenizedDataset(data["input_ids"], data["labels"])
    src = [len(x) for x in dataset.input_ids]
    tgt = [len(x) for x in dataset.labels]
    budget = TokenBudget(case.max_tokens, src, tgt, widths) if case.max_tokens else None
    sampler = LengthGroupedBatchSampler(
        dataset.lengths(),
        bs,
        seed=spec["seed"],
        group_by_length=case.batching != "random",
        mega_batches=50 if budget else count,
        budget=budget,
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Seq2SeqCollator(spec["pad_token_id"], widths))
    optimizer = build_optimizer(model, cfg)
    set_deepspeed_micro_batch(accelerator, bs)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(optimizer, cfg, count)
    state = TrainState(num_processes=accelerator.num_processes)
    peak_before = _peaks(accelerator.device, accelerator.mixed_precision)
    losses: list[float] = []
    compile_before, warmup_s = _compile_seconds(), 0.0
    if warmup:
        start = time.perf_counter()
        first = train_loop(accelerator, model, optimizer, scheduler, loader, sampler, cfg, warmup, state)
        _sync(accelerator.device)
        warmup_s = time.perf_counter() - start
        losses += [e["loss"] for e in first.history if "loss" in e]
    compile_warmup = _compile_seconds() - compile_before
    graphs_before = _compiled_graphs()
    _sync(accelerator.device)
    start = time.perf_counter()
    result = train_loop(accelerator, model, optimizer, scheduler, loader, sampler, cfg, count, state)
    _sync(accelerator.device)
    seconds = time.perf_counter() - start
    compile_measured = _compile_seconds() - compile_before - compile_warmup  # a shape first seen in these steps
    losses += [e["loss"] for e in result.history if "loss" in e and e["step"] > warmup]
    peak_after = _peaks(accelerator.device, accelerator.mixed_precision)
    epochs = 0
    order: list[list[int]] = []
    while len(order) < count:  # the batches train_loop took, epoch after epoch (one process, no accumulation)
        order += sampler.batches(epochs)
        epochs += 1
    measured = order[warmup:count]
    lengths = [(src[i], tgt[i]) for batch in measured for i in batch]
    padded = sum(widths.padded_tokens(len(b), max(src[i] for i in b), max(tgt[i] for i in b)) for b in measured)
    out = {
        "seconds": seconds - compile_measured,  # compile time is reported on its own, not as step time
        "compile_seconds": compile_warmup + compile_measured,
        "compile_seconds_in_measured_steps": compile_measured,
        "graphs_compiled_in_measured_steps": _compiled_graphs() - graphs_before,
        "warmup_seconds": warmup_s,
        "real_tokens": sum(s + t for s, t in lengths),
        "samples": len(lengths),
        "padding_fraction": 1.0 - sum(s + t for s, t in lengths) / padded if padded else 0.0,
        "lengths": lengths,
        "losses": losses,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "matmul_peak_gflops": max(peak_before, peak_after),
        "mixed_precision": accelerator.mixed_precision,
        "compiled": compiles(accelerator),
        "distributed_type": accelerator.distributed_type.value,
        "tf32": bool(accelerator.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32),
        **params,
    }
    if case.with_eval:
        out["eval"] = _eval_speed(spec, accelerator, accelerator.unwrap_model(model, keep_torch_compile=False))
    return out


def _run_reference(spec: dict[str, Any], case: Case) -> dict[str, Any]:
    """The usual Accelerate summarization example's loop, written as people write it."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, get_scheduler

    from dialogsum.modeling import parameter_report
    from dialogsum.tracking import peak_memory_mb

    warmup, steps, bs = spec["warmup_steps"], spec["steps"], spec["batch_size"]
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
    model = _load_model(spec, case)
    params = parameter_report(model)
    pool = spec["pool"]
    dataset = [
        {"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in zip(pool["input_ids"], pool["labels"])
    ]
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, pad_to_multiple_of=None)
    loader = DataLoader(
        dataset, shuffle=True, collate_fn=collator, batch_size=bs, generator=torch.Generator().manual_seed(spec["seed"])
    )
    no_decay = ["bias", "layer_norm.weight"]
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
            "weight_decay": 0.01,
        },
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=5e-5)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=warmup + steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    peak_before = _peaks(accelerator.device, "no")
    model.train()
    losses, lengths, padded = [], [], 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        if step == warmup:
            _sync(accelerator.device)
            start = time.perf_counter()
        outputs = model(**batch)
        loss = outputs.loss
        accelerator.backward(loss)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        if step >= warmup:
            src = batch["attention_mask"].sum(dim=1).tolist()
            tgt = (batch["labels"] != -100).sum(dim=1).tolist()
            lengths += list(zip(src, tgt))
            padded += batch["input_ids"].numel() + batch["labels"].numel()
    _sync(accelerator.device)
    seconds = time.perf_counter() - start
    peak_after = _peaks(accelerator.device, "no")
    real = sum(s + t for s, t in lengths)
    return {
        "seconds": seconds,
        "real_tokens": real,
        "samples": len(lengths),
        "padding_fraction": 1.0 - real / padded if padded else 0.0,
        "lengths": lengths,
        "losses": [float(x) for x in losses],
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "matmul_peak_gflops": max(peak_before, peak_after),
        "mixed_precision": "no",
        **params,
    }


def _eval_speed(spec: dict[str, Any], accelerator: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Summaries/s: batched length-sorted generation vs one ``generate`` call per dialogue, same settings."""
    from dialogsum.config import GenerationArguments
    from dialogsum.data import build_prompt
    from dialogsum.evaluation import generate_summaries, generation_kwargs
    from dialogsum.modeling import load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer_path"])
    dialogues, template = spec["eval_dialogues"], spec["prompt_template"]
    gen = GenerationArguments(max_new_tokens=spec["max_new_tokens"], num_beams=1)
    kwargs = generation_kwargs(gen, tokenizer.pad_token_id)
    model.eval()
    device = accelerator.device

    def one_at_a_time(texts: list[str]) -> list[str]:
        out = []
        for dialogue in texts:  # the lab's loop: one prompt, one generate call
            enc = tokenizer(
                build_prompt(dialogue, template),
                return_tensors="pt",
                truncation=True,
                max_length=spec["max_source_length"],
            )
            # eager, as generate_summaries runs (a compiled model would recompile for every decoding step)
            with torch.no_grad(), torch.compiler.set_stance("force_eager"), accelerator.autocast():
                ids = model.generate(input_ids=enc.input_ids.to(device), **kwargs)
            out.append(tokenizer.decode(ids[0], skip_special_tokens=True))
        return out

    one_at_a_time(dialogues[:1])  # warm-up, excluded
    _sync(device)
    start = time.perf_counter()
    single = one_at_a_time(dialogues)
    _sync(device)
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = generate_summaries(
        accelerator,
        model,
        tokenizer,
        dialogues,
        template,
        gen,
        spec["eval_batch_size"],
        spec["max_source_length"],
        desc="batched generation",
    )
    _sync(device)
    batched_s = time.perf_counter() - start
    n = len(dialogues)

    def mean_tokens(texts: list[str]) -> float:
        return sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts) / max(len(texts), 1)

    return {
        "dialogues": n,
        "batch_size": spec["eval_batch_size"],
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": gen.num_beams,
        "mixed_precision": accelerator.mixed_precision,
        "one_at_a_time_s": single_s,
        "batched_s": batched_s,
        "one_at_a_time_summaries_per_s": n / single_s,
        "batched_summaries_per_s": n / batched_s,
        "eval_speedup": single_s / batched_s,
        "mean_summary_tokens_one_at_a_time": mean_tokens(single),
        "mean_summary_tokens_batched": mean_tokens(batched),
    }


def run_worker(spec_path: str, result_path: str) -> None:
    """Entry point of a case's process: run it and write its figures as JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    case = Case(**spec["case"])
    with tempfile.TemporaryDirectory(prefix="dialogsum-bench-") as work:
        out = _run_reference(spec, case) if case.loop == "reference" else _run_ours(spec, case, Path(work))
    out["threads"] = torch.get_num_threads()
    write_json(result_path, out)


# --------------------------------------------------------------------------------------------- orchestration


CONFIG_DIR = Path(__file__).resolve().parents[2] / "accelerate_configs"
#: The launcher config whose dynamo_config compiled cases use when their own config does not compile.
GPU_CONFIG = CONFIG_DIR / "single_gpu.yaml"


def _has_weights(model_dir: Path) -> bool:
    return any(p.suffix in (".safetensors", ".bin") for p in model_dir.iterdir())


def _check_inputs(args: BenchmarkArgs) -> Path:
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model_dir {args.model_dir} has no config.json (expected a model directory)")
    if not Path(args.data_file).is_file():
        raise UserError(f"--data_file not found: {args.data_file}")
    return model_dir


def _default_launch_config() -> Path:
    return CONFIG_DIR / ("single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml")


def _dynamo_settings(config: Path) -> dict[str, Any]:
    """A launcher config's ``dynamo_config``, keys prefixed with ``dynamo_`` as accelerate reads them."""
    import yaml

    found = (yaml.safe_load(config.read_text()) or {}).get("dynamo_config") or {}
    return {k if k.startswith("dynamo_") else f"dynamo_{k}": v for k, v in found.items()}


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
    plugin = dynamo_plugin_from(_dynamo_settings(path))
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


#: Modules imported once by the fork server; every case process is forked from it with them loaded.
PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.t5.modeling_t5",
    "accelerate",
    "peft",
    "dialogsum.devtools.benchmark",
    "dialogsum.distributed",
    "dialogsum.evaluation",
    "dialogsum.modeling",
    "dialogsum.training",
]


def _launcher_env(config: Path) -> dict[str, str]:
    """The ``ACCELERATE_*`` variables ``accelerate launch --config_file <config> --num_processes 1`` gives its
    process (accelerate's own parser, checks and environment builders)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_simple_launcher_cmd_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config), "--num_processes", "1", "benchmark"])
    launch_logger = logging.getLogger("accelerate.commands.launch")
    level = launch_logger.level
    launch_logger.setLevel(logging.ERROR)  # its notes on defaults it filled in concern a command line, not us
    try:
        args, defaults, precision_from_config = _validate_launch_command(args)
    finally:
        launch_logger.setLevel(level)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def _dynamo_env(settings: dict[str, Any]) -> dict[str, str]:
    """``ACCELERATE_DYNAMO_*`` for compile settings, as the launcher exports them."""
    from dialogsum.distributed import dynamo_plugin_from

    plugin = dynamo_plugin_from(settings)
    if plugin is None:
        return {"ACCELERATE_DYNAMO_BACKEND": "NO"}
    env = {
        "ACCELERATE_DYNAMO_BACKEND": plugin.backend.value,
        "ACCELERATE_DYNAMO_MODE": plugin.mode,
        "ACCELERATE_DYNAMO_USE_FULLGRAPH": str(bool(plugin.fullgraph)),
        "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": str(bool(plugin.use_regional_compilation)),
    }
    if plugin.dynamic is not None:
        env["ACCELERATE_DYNAMO_USE_DYNAMIC"] = str(plugin.dynamic)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker_env(case: Case, default_config: Path) -> dict[str, str | None]:
    """Environment changes of a case process (None = unset): what ``accelerate launch`` would export for the
    case's launcher config, changed where the case differs from it (precision, compiled or eager)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("ACCELERATE_")}
    config = CONFIG_DIR / case.launch_config if case.launch_config else default_config
    if case.loop == "ours":
        env.update(_launcher_env(config))
        if case.compiled:  # the config's own dynamo_config (also under DeepSpeed, whose launcher drops it)
            env.update(_dynamo_env(_dynamo_settings(config) or _dynamo_settings(GPU_CONFIG)))
        else:
            env.update(_dynamo_env({}))
    env.update(
        {
            "ACCELERATE_MIXED_PRECISION": case.precision,
            # measure bf16 even where the guard would fall back to fp32
            "DIALOGSUM_CPU_BF16": "force" if case.force_precision else None,
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    distributed = dict.fromkeys(("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        # DeepSpeed wants a process group even for one process: what torchrun gives a single process
        distributed.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        distributed["MASTER_PORT"] = str(_free_port())
    env.update(distributed)
    return env


def _worker_entry(spec_path: str, result_path: str, log_path: str, env: dict[str, str | None]) -> None:
    """Body of a case process: output to its log file, environment as ``accelerate launch`` would set it."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    run_worker(spec_path, result_path)


def _case_context() -> Any:
    """A fork server that has imported torch/transformers/peft once (each case saves those seconds).

    Nothing runs in it but imports, so each forked case starts with fresh threads, allocator and accelerate
    state, and its peak memory is its own.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _run_case(
    case: Case, spec: dict[str, Any], work: Path, timeout: int, ctx: Any, env: dict[str, str | None]
) -> dict[str, Any]:
    """One case in its own process; a case that fails or times out comes back as ``{"failed": why, ...}``."""
    spec_path, result_path = work / f"{case.name}.spec.json", work / f"{case.name}.json"
    log_path = work / f"{case.name}.log"
    write_json(spec_path, {**spec, "case": asdict(case)})
    load_before = os.getloadavg()[0]
    proc = ctx.Process(target=_worker_entry, args=(str(spec_path), str(result_path), str(log_path), env))
    proc.start()
    proc.join(timeout)
    tail = lambda: "\n".join(log_path.read_text(errors="replace").splitlines()[-15:]) if log_path.exists() else ""  # noqa: E731
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"failed": f"took longer than {timeout} s (--worker_timeout_s)", "log_tail": tail()}
    if proc.exitcode != 0 or not result_path.is_file():
        return {"failed": f"exit code {proc.exitcode}", "log_tail": tail()}
    result = json.loads(result_path.read_text())
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def _row(case: Case, raw: dict[str, Any], dims: T5Dims) -> dict[str, Any]:
    steps = raw["steps"]
    seconds = raw["seconds"]
    flops = training_flops(dims, [tuple(x) for x in raw["lengths"]], case.method)
    achieved = flops / seconds / 1e9  # GFLOP/s
    return {
        "name": case.name,
        "loop": case.loop,
        "method": case.method,
        "batching": case.batching,
        "precision": PRECISION_NAMES.get(raw["mixed_precision"], raw["mixed_precision"]),
        "compiled": bool(raw.get("compiled", False)),
        "length_buckets": case.buckets,
        "max_tokens_per_batch": case.max_tokens,
        "launch_config": case.launch_config,
        "gradient_checkpointing": case.gradient_checkpointing,
        "steps": steps,
        "samples": raw["samples"],
        "seconds": significant(seconds),
        "s_per_step": significant(seconds / steps),
        "compile_seconds": round(raw.get("compile_seconds", 0.0), 2),
        "graphs_compiled_in_measured_steps": raw.get("graphs_compiled_in_measured_steps", 0),
        "real_tokens": raw["real_tokens"],
        "tokens_per_s": significant(raw["real_tokens"] / seconds),
        "samples_per_s": significant(raw["samples"] / seconds),
        "samples_per_step": round(raw["samples"] / steps, 1),
        "padding_fraction": round(raw["padding_fraction"], 4),
        "peak_memory_mb": significant(raw["peak_memory_mb"]),
        "training_gflop": round(flops / 1e9, 2),
        "achieved_gflops": significant(achieved),
        "matmul_peak_gflops": significant(raw["matmul_peak_gflops"]),
        "mfu": significant(mfu(achieved, raw["matmul_peak_gflops"])),
        "tf32": raw.get("tf32", False),
        "trainable_params": raw["trainable_params"],
        "total_params": raw["total_params"],
        "losses": [round(x, 5) for x in raw["losses"]],
        "threads": raw["threads"],
        "load_average": raw["load_average"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return significant(a / b) if a is not None and b else None


def run_benchmark(args: BenchmarkArgs) -> dict[str, Any]:
    """Run every case, compare each with the reference, and return the results (see the module docstring).

    With ``--output_json`` the results so far are written after every case.
    """
    from transformers import AutoConfig

    from dialogsum.config import LAB_PROMPT
    from dialogsum.data import read_rows
    from dialogsum.modeling import load_tokenizer, model_from_config

    model_dir = _check_inputs(args)
    default = choose_precision(args)
    device = device_info()
    logger.info("our default path: %s (from %s)", default["reason"], default["config"])
    tokenizer = load_tokenizer(str(model_dir))
    pool = build_pool(args, tokenizer)
    dims = T5Dims.from_config(AutoConfig.from_pretrained(str(model_dir)))
    rows = read_rows(args.data_file)
    eval_dialogues = [r[args.text_column] for r in rows[: args.eval_samples]]
    gpu = device["type"] == "cuda"
    cases = plan_cases(
        default["chosen"], args.full_grid or not args.quick, default["compiled"], gpu, tuple(args.token_budgets)
    )
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in cases})
        if unknown:
            raise UserError(f"--only: no case {', '.join(unknown)} here; cases: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in args.only]
    if any(c.launch_config for c in cases) and not _deepspeed_available():
        cases = [c for c in cases if not c.launch_config]  # ZeRO-2 needs DeepSpeed
    started = time.perf_counter()
    raw: dict[str, dict[str, Any]] = {}

    def results() -> dict[str, Any]:
        out = summarise(args, cases, raw, dims, default, pool, device)
        out["wall_time_s"] = round(time.perf_counter() - started, 1)
        return out

    with tempfile.TemporaryDirectory(prefix="dialogsum-benchmark-") as tmp:
        work = Path(tmp)
        model_path = model_dir
        if not _has_weights(model_dir):
            # random weights, built once (real architecture, untied lm_head) and loaded by every case
            logger.info("no weights in %s: building the architecture with random weights", model_dir)
            model = model_from_config(str(model_dir), seed=args.seed)
            model_path = work / "model"
            model.save_pretrained(str(model_path), safe_serialization=True)
            del model
        spec = {
            "model_path": str(model_path),
            "tokenizer_path": str(model_dir),
            "pad_token_id": tokenizer.pad_token_id,
            "seed": args.seed,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size,
            "max_source_length": args.max_source_length,
            "max_target_length": args.max_target_length,
            "eval_batch_size": args.eval_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "prompt_template": LAB_PROMPT,
            "eval_dialogues": eval_dialogues,
            "pool": {"input_ids": pool.input_ids, "labels": pool.labels},
            "dataset": {"input_ids": pool.dataset_input_ids, "labels": pool.dataset_labels},
        }
        ctx = _case_context()
        default_config = Path(default["config"])
        for index, case in enumerate(cases, start=1):
            logger.info("case %d/%d: %s", index, len(cases), case.name)
            env = _worker_env(case, default_config)
            raw[case.name] = _run_case(case, spec, work, args.worker_timeout_s, ctx, env)
            raw[case.name]["steps"] = args.steps
            if "failed" in raw[case.name]:
                logger.warning(
                    "case %s failed: %s\n%s", case.name, raw[case.name]["failed"], raw[case.name]["log_tail"]
                )
            if args.output_json:
                write_json(args.output_json, results())
    return results()


def _deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def summarise(
    args: BenchmarkArgs,
    cases: list[Case],
    raw: dict[str, dict[str, Any]],
    dims: T5Dims,
    default: dict[str, Any],
    pool: Pool,
    device: dict[str, Any],
) -> dict[str, Any]:
    """Rows with ratios against the reference, the headline figures and the comparisons (cases not run yet or
    failed are left out; figures that need them are None)."""
    by_name = {c.name: c for c in cases}
    rows = {c.name: _row(c, raw[c.name], dims) for c in cases if c.name in raw and "failed" not in raw[c.name]}
    ref = rows.get("reference")
    for row in rows.values():
        row["speedup_vs_reference"] = _ratio(row["tokens_per_s"], ref["tokens_per_s"]) if ref else None
        row["memory_vs_reference"] = _ratio(row["peak_memory_mb"], ref["peak_memory_mb"]) if ref else None
    precision, compiled = default["chosen"], default["compiled"]
    other = "no" if precision == "bf16" else "bf16"
    default_name = case_name("full", "grouped", precision, False, compiled)
    ours = rows.get(default_name)

    def name(method: str, batching: str, p: str, c: bool, gc: bool = False, **kw: Any) -> str:
        return case_name(method, batching, p, gc, c, **kw)

    def field_of(case: str, key: str) -> Any:
        return rows[case][key] if case in rows else None

    def compare(a: str, b: str) -> dict[str, Any] | None:
        if a not in rows or b not in rows:
            return None
        return {
            "cases": [a, b],
            "speedup": _ratio(rows[a]["tokens_per_s"], rows[b]["tokens_per_s"]),
            "memory_ratio": _ratio(rows[a]["peak_memory_mb"], rows[b]["peak_memory_mb"]),
            "step_time_ratio": _ratio(rows[a]["s_per_step"], rows[b]["s_per_step"]),
        }

    fp32_name = name("full", "grouped", "no", compiled)
    if fp32_name not in rows:
        fp32_name = name("full", "grouped", "no", False)
    lora_name = name("lora", "grouped", precision, compiled)
    budget_mfus = [r["mfu"] for r in rows.values() if r["batching"] == "budget"]
    eval_raw = raw.get(default_name, {}).get("eval")
    figures = {
        "train_speedup_vs_reference": field_of(default_name, "speedup_vs_reference"),
        "train_speedup_vs_reference_fp32": field_of(fp32_name, "speedup_vs_reference"),
        "lora_speedup_vs_reference": field_of(lora_name, "speedup_vs_reference"),
        "eval_speedup": significant(eval_raw["eval_speedup"]) if eval_raw else None,
        "mfu": ours["mfu"] if ours else None,
        "token_budget_mfu": max(budget_mfus) if budget_mfus else None,
        "compile_seconds": ours["compile_seconds"] if ours and compiled else None,
    }
    compile_costs = []
    for row in rows.values():
        if not row["compiled"]:
            continue
        case = by_name[row["name"]]
        prefix = f"{Path(case.launch_config).stem.removeprefix('deepspeed_')}-" if case.launch_config else ""
        twin = case_name(case.method, case.batching, case.precision, case.gradient_checkpointing, False,
                         False, case.max_tokens, prefix)  # fmt: skip
        saved = rows[twin]["s_per_step"] - row["s_per_step"] if twin in rows else None
        compile_costs.append(
            {
                "case": row["name"],
                "eager_case": twin if twin in rows else None,
                "compile_seconds": row["compile_seconds"],
                "seconds_saved_per_step": round(saved, 4) if saved is not None else None,
                # compiling pays for itself after this many steps (None: not faster, or no eager twin measured)
                "break_even_steps": math.ceil(row["compile_seconds"] / saved) if saved and saved > 0 else None,
            }
        )
    bf16_name, eager_fp32 = name("full", "grouped", "bf16", False), name("full", "grouped", "no", False)
    loss_check = None
    if eager_fp32 in rows and bf16_name in rows:
        a, b = rows[eager_fp32]["losses"], rows[bf16_name]["losses"]
        diffs = [abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b)]
        loss_check = {"fp32_losses": a, "bf16_losses": b, "max_rel_diff": round(max(diffs), 5) if diffs else None}
    targets = {
        k: {"target": v, "measured": figures[k], "met": bool(figures[k] >= v)}
        for k, v in TARGETS[device["type"]].items()
        if figures.get(k) is not None
    }
    return {
        **figures,
        "device": device,
        "targets": targets,
        "default_path": default_name,
        "precision": default,
        "mfu_definition": FLOP_FORMULA,
        "matmul_peak_gflops": {
            r["precision"]: max(x["matmul_peak_gflops"] for x in rows.values() if x["precision"] == r["precision"])
            for r in rows.values()
        },
        "padding": {
            "epoch_grouped": round(pool.epoch_padding_grouped, 4),
            "epoch_random": round(pool.epoch_padding_random, 4),
            "rows": pool.rows,
            "truncated_prompts": pool.truncated_sources,
        },
        "compile": compile_costs,
        "comparisons": {
            "grouped_vs_random": compare(default_name, name("full", "random", precision, compiled)),
            "bf16_vs_fp32": compare(name("full", "grouped", "bf16", compiled), name("full", "grouped", "no", compiled)),
            "bf16_vs_fp32_eager": compare(bf16_name, eager_fp32) if compiled else None,
            "compiled_vs_eager": compare(default_name, name("full", "grouped", precision, False)) if compiled else None,
            "buckets_vs_none": compare(
                name("full", "grouped", precision, True), name("full", "grouped", precision, True, buckets=False)
            ),
            "lora_vs_full": compare(lora_name, default_name),
            "lora_compiled_vs_eager": compare(lora_name, name("lora", "grouped", precision, False))
            if compiled
            else None,
            "zero2_vs_single": compare(name("full", "grouped", precision, compiled, prefix="zero2-"), default_name),
            "gradient_checkpointing_vs_off": compare(name("full", "grouped", precision, compiled, True), default_name),
            "lora_gradient_checkpointing_vs_off": compare(
                name("lora", "grouped", precision, compiled, True), lora_name
            ),
        },
        "bf16_loss_check": loss_check,
        "eval": eval_raw,
        "rows": list(rows.values()),
        "failed": {k: v for k, v in raw.items() if "failed" in v},
        "not_run": [c.name for c in cases if c.name not in raw],
        "settings": {**asdict(args), "other_precision": PRECISION_NAMES[other]},
        "environment": {
            "device": device["type"],
            "cpu": device["cpu"],
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


# --------------------------------------------------------------------------------------------- output


TABLE_COLUMNS = (
    ("case", "name", "{}"),
    ("s/step", "s_per_step", "{:.3f}"),
    ("real tok/s", "tokens_per_s", "{:.0f}"),
    ("samples/s", "samples_per_s", "{:.2f}"),
    ("padding", "padding_fraction", "{:.0%}"),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("vs ref", "speedup_vs_reference", "{:.2f}x"),
    ("MFU", "mfu", "{:.0%}"),
    ("peak GF/s", "matmul_peak_gflops", "{:.0f}"),
    ("compile s", "compile_seconds", "{:.0f}"),
)

#: Headline figures shown as a percentage rather than a ratio.
PERCENT_FIGURES = ("mfu", "token_budget_mfu")


def _cell(fmt: str, value: Any) -> str:
    return "n/a" if value is None else fmt.format(value)


def format_table(results: dict[str, Any]) -> str:
    """The rows as a Markdown table plus the headline figures and comparisons."""
    cells = [[_cell(fmt, row[key]) for _, key, fmt in TABLE_COLUMNS] for row in results["rows"]]
    lines = [markdown_table([c[0] for c in TABLE_COLUMNS], cells)]
    lines.append("")
    ev = results["eval"]
    if ev:
        lines.append(
            f"eval: batched length-sorted {ev['batched_summaries_per_s']:.2f} summaries/s vs one-at-a-time "
            f"{ev['one_at_a_time_summaries_per_s']:.2f} ({ev['dialogues']} dialogues, {ev['max_new_tokens']} new "
            f"tokens, batch {ev['batch_size']}, {PRECISION_NAMES.get(ev['mixed_precision'], ev['mixed_precision'])})"
        )
    pad = results["padding"]
    lines.append(
        f"padding over one epoch of {pad['rows']} rows: grouped {pad['epoch_grouped']:.1%}, "
        f"random {pad['epoch_random']:.1%}"
    )
    for name, comp in results["comparisons"].items():
        if comp:
            lines.append(
                f"{name}: speed {comp['speedup']:.2f}x, step time {comp['step_time_ratio']:.2f}x, "
                f"peak memory {comp['memory_ratio']:.2f}x ({comp['cases'][0]} / {comp['cases'][1]})"
            )
    for cost in results["compile"]:
        pays = f"pays off after {cost['break_even_steps']} steps" if cost["break_even_steps"] else "no step time saved"
        versus = f" vs {cost['eager_case']}" if cost["eager_case"] else ""
        lines.append(f"compile: {cost['case']} {cost['compile_seconds']:.0f} s, {pays}{versus}")
    if results["bf16_loss_check"]:
        lines.append(
            f"bf16 vs fp32 loss, same batches: max relative difference {results['bf16_loss_check']['max_rel_diff']}"
        )
    for name, failure in results["failed"].items():
        lines.append(f"FAILED {name}: {failure['failed']}")
    lines.append(f"device: {results['device']['name']}")
    lines.append(f"our default path: {results['default_path']} ({results['precision']['reason']})")
    for key in (
        "train_speedup_vs_reference",
        "train_speedup_vs_reference_fp32",
        "lora_speedup_vs_reference",
        "eval_speedup",
        "mfu",
        "token_budget_mfu",
    ):
        value = results[key]
        shown = "not measured" if value is None else f"{value:.0%}" if key in PERCENT_FIGURES else f"{value:.2f}x"
        target = results["targets"].get(key)
        if target:
            goal = f"{target['target']:.0%}" if key in PERCENT_FIGURES else f"{target['target']}x"
            shown += f" (target >= {goal}: {'met' if target['met'] else 'NOT met'})"
        lines.append(f"{key}: {shown}")
    if results["compile_seconds"] is not None:
        lines.append(f"compile_seconds: {results['compile_seconds']:.0f} (default path, not in its step time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run, print the table, write the JSON; exits 1 when a case failed (its row is missing)."""
    args = parse_args(argv)
    if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
        raise UserError(f"--output_json folder does not exist: {Path(args.output_json).parent}")
    results = run_benchmark(args)
    sys.stdout.write(format_table(results) + "\n")
    if args.output_json:
        write_json(args.output_json, results)
    if results["failed"]:
        raise UserError(f"benchmark case(s) failed: {', '.join(results['failed'])} (see the JSON's 'failed')")
    return results
