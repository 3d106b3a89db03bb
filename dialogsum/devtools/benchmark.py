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
"""

from __future__ import annotations

import argparse
import json
import logging
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
from dialogsum.formatting import markdown_table
from dialogsum.precision import matmul_peak_gflops

logger = logging.getLogger(__name__)

#: The project's speed goals for its default path, as ratios within one run; the table says which are met.
TARGETS = {"train_speedup_vs_reference": 2.5, "eval_speedup": 5.0, "mfu": 0.6}

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
    quick: bool = _flag(False, "Short run: 2 steps, 6 cases, 16 summaries of 32 tokens.")
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
    batching: str  # "grouped" | "random"
    precision: str  # accelerate's value: "no" | "bf16"
    gradient_checkpointing: bool = False
    with_eval: bool = False
    force_precision: bool = False


def case_name(method: str, batching: str, precision: str, gc: bool) -> str:
    """E.g. ``full-grouped-bf16`` or ``lora-grouped-bf16-gc``."""
    return f"{method}-{batching}-{PRECISION_NAMES[precision]}" + ("-gc" if gc else "")


def plan_cases(precision: str, full_grid: bool) -> list[Case]:
    """The reference, our default path at ``precision`` (with the eval test), then one change at a time (with
    ``full_grid``: every method x batching x precision)."""
    other = "no" if precision == "bf16" else "bf16"
    ours = Case(
        case_name("full", "grouped", precision, False),
        "ours",
        "full",
        "grouped",
        precision,
        with_eval=True,
    )
    cases = [Case("reference", "reference", "full", "random", "no"), ours]
    if full_grid:
        combos = [(m, b, p) for m in ("full", "lora") for b in ("grouped", "random") for p in (precision, other)]
        combos = [c for c in combos if c != ("full", "grouped", precision)]
        extra = [(m, b, p, False) for m, b, p in combos] + [
            ("full", "grouped", precision, True),
            ("lora", "grouped", precision, True),
        ]
    else:
        extra = [
            ("full", "grouped", other, False),
            ("full", "random", precision, False),
            ("lora", "grouped", precision, False),
            ("full", "grouped", precision, True),
        ]
    for method, batching, case_precision, gc in extra:
        cases.append(
            Case(
                case_name(method, batching, case_precision, gc),
                "ours",
                method,
                batching,
                case_precision,
                gc,
                force_precision=case_precision == "bf16",
            )
        )
    return cases


# --------------------------------------------------------------------------------------------- workers


def _peaks(device: torch.device, precision: str) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # A GPU reaches its matmul peak only on large products (smaller ones are bound by launch and sync).
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    return matmul_peak_gflops(dtype, device, sizes)


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
    from dialogsum.data import LengthGroupedBatchSampler, Seq2SeqCollator, TokenizedDataset, padding_fraction
    from dialogsum.distributed import build_accelerator
    from dialogsum.modeling import parameter_report
    from dialogsum.tracking import peak_memory_mb
    from dialogsum.training import build_optimizer, build_scheduler, train_loop

    warmup, steps, bs = spec["warmup_steps"], spec["steps"], spec["batch_size"]
    cfg = build_config(
        case.method,
        {
            "output_dir": str(work),
            "per_device_train_batch_size": bs,
            "max_train_steps": warmup + steps,
            "logging_steps": 1,
            "report_to": "none",
            "seed": spec["seed"],
            "gradient_checkpointing": case.gradient_checkpointing,
        },
    )
    accelerator = build_accelerator()
    model = _load_model(spec, case)
    params = parameter_report(model)
    dataset = TokenizedDataset(spec["pool"]["input_ids"], spec["pool"]["labels"])
    count = warmup + steps
    sampler = LengthGroupedBatchSampler(
        dataset.lengths(), bs, seed=spec["seed"], group_by_length=case.batching == "grouped", mega_batches=count
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Seq2SeqCollator(spec["pad_token_id"]))
    optimizer = build_optimizer(model, cfg)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(optimizer, cfg, count)
    state = TrainState(num_processes=accelerator.num_processes)
    peak_before = _peaks(accelerator.device, accelerator.mixed_precision)
    losses: list[float] = []
    if warmup:
        first = train_loop(accelerator, model, optimizer, scheduler, loader, sampler, cfg, warmup, state)
        losses += [e["loss"] for e in first.history if "loss" in e]
    _sync(accelerator.device)
    start = time.perf_counter()
    result = train_loop(accelerator, model, optimizer, scheduler, loader, sampler, cfg, count, state)
    _sync(accelerator.device)
    seconds = time.perf_counter() - start
    losses += [e["loss"] for e in result.history if "loss" in e and e["step"] > warmup]
    peak_after = _peaks(accelerator.device, accelerator.mixed_precision)
    measured = sampler.batches(0)[warmup:count]
    src = [len(x) for x in dataset.input_ids]
    tgt = [len(x) for x in dataset.labels]
    lengths = [(src[i], tgt[i]) for batch in measured for i in batch]
    out = {
        "seconds": seconds,
        "real_tokens": sum(s + t for s, t in lengths),
        "samples": len(lengths),
        "padding_fraction": padding_fraction(measured, src, tgt),
        "lengths": lengths,
        "losses": losses,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "matmul_peak_gflops": max(peak_before, peak_after),
        "mixed_precision": accelerator.mixed_precision,
        **params,
    }
    if case.with_eval:
        out["eval"] = _eval_speed(spec, accelerator, accelerator.unwrap_model(model))
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
            with torch.no_grad(), accelerator.autocast():
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
    name = "single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml"
    return Path(__file__).resolve().parents[2] / "accelerate_configs" / name


def choose_precision(args: BenchmarkArgs) -> dict[str, Any]:
    """Our default path's precision: the launcher config's ``mixed_precision``, through the CPU guard."""
    import yaml

    from dialogsum.precision import cpu_bf16_feature, resolve_cpu_precision

    path = Path(args.accelerate_config) if args.accelerate_config else _default_launch_config()
    requested = "bf16"
    if path.is_file():
        requested = str((yaml.safe_load(path.read_text()) or {}).get("mixed_precision", "no"))
    elif args.accelerate_config:
        raise UserError(f"--accelerate_config not found: {args.accelerate_config}")
    if torch.cuda.is_available():
        chosen = "bf16" if requested == "bf16" and torch.cuda.is_bf16_supported() else "no"
        reason = f"{PRECISION_NAMES.get(chosen, chosen)} on GPU"
    else:
        chosen, reason = resolve_cpu_precision(requested)
    return {
        "config": str(path),
        "requested": requested,
        "chosen": chosen,
        "reason": reason,
        "cpu_bf16_feature": cpu_bf16_feature(),
    }


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


def _worker_env(case: Case) -> dict[str, str | None]:
    """Environment changes of a case process (None = unset)."""
    env: dict[str, str | None] = {
        "ACCELERATE_MIXED_PRECISION": case.precision,  # what `accelerate launch` sets from the config file
        # measure bf16 even where the guard would fall back to fp32
        "DIALOGSUM_CPU_BF16": "force" if case.force_precision else None,
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update(dict.fromkeys(("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")))
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


def _run_case(case: Case, spec: dict[str, Any], work: Path, timeout: int, ctx: Any) -> dict[str, Any]:
    spec_path, result_path = work / f"{case.name}.spec.json", work / f"{case.name}.json"
    log_path = work / f"{case.name}.log"
    write_json(spec_path, {**spec, "case": asdict(case)})
    load_before = os.getloadavg()[0]
    proc = ctx.Process(target=_worker_entry, args=(str(spec_path), str(result_path), str(log_path), _worker_env(case)))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise UserError(f"benchmark case {case.name} took longer than {timeout} s (--worker_timeout_s)")
    if proc.exitcode != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:]) if log_path.exists() else ""
        raise RuntimeError(f"benchmark case {case.name} failed (exit code {proc.exitcode}):\n{tail}")
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
        "gradient_checkpointing": case.gradient_checkpointing,
        "steps": steps,
        "seconds": round(seconds, 3),
        "s_per_step": round(seconds / steps, 3),
        "real_tokens": raw["real_tokens"],
        "tokens_per_s": round(raw["real_tokens"] / seconds, 2),
        "samples_per_s": round(raw["samples"] / seconds, 3),
        "padding_fraction": round(raw["padding_fraction"], 4),
        "peak_memory_mb": round(raw["peak_memory_mb"], 1),
        "training_gflop": round(flops / 1e9, 2),
        "achieved_gflops": round(achieved, 2),
        "matmul_peak_gflops": round(raw["matmul_peak_gflops"], 2),
        "mfu": round(mfu(achieved, raw["matmul_peak_gflops"]), 4),
        "trainable_params": raw["trainable_params"],
        "total_params": raw["total_params"],
        "losses": [round(x, 5) for x in raw["losses"]],
        "threads": raw["threads"],
        "load_average": raw["load_average"],
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def run_benchmark(args: BenchmarkArgs) -> dict[str, Any]:
    """Run every case, compare each with the reference, and return the results (see the module docstring)."""
    from transformers import AutoConfig

    from dialogsum.config import LAB_PROMPT
    from dialogsum.data import read_rows
    from dialogsum.modeling import load_tokenizer, model_from_config

    model_dir = _check_inputs(args)
    precision = choose_precision(args)
    logger.info("our default path: %s (from %s)", precision["reason"], precision["config"])
    tokenizer = load_tokenizer(str(model_dir))
    pool = build_pool(args, tokenizer)
    dims = T5Dims.from_config(AutoConfig.from_pretrained(str(model_dir)))
    rows = read_rows(args.data_file)
    eval_dialogues = [r[args.text_column] for r in rows[: args.eval_samples]]
    cases = plan_cases(precision["chosen"], args.full_grid or not args.quick)
    started = time.perf_counter()
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
            "eval_batch_size": args.eval_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "prompt_template": LAB_PROMPT,
            "eval_dialogues": eval_dialogues,
            "pool": {"input_ids": pool.input_ids, "labels": pool.labels},
        }
        raw: dict[str, dict[str, Any]] = {}
        ctx = _case_context()
        for index, case in enumerate(cases, start=1):
            logger.info("case %d/%d: %s", index, len(cases), case.name)
            raw[case.name] = _run_case(case, spec, work, args.worker_timeout_s, ctx)
            raw[case.name]["steps"] = args.steps
    results = summarise(args, cases, raw, dims, precision, pool)
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    return results


def summarise(
    args: BenchmarkArgs,
    cases: list[Case],
    raw: dict[str, dict[str, Any]],
    dims: T5Dims,
    precision: dict[str, Any],
    pool: Pool,
) -> dict[str, Any]:
    """Rows with ratios against the reference, the headline figures and the comparisons."""
    rows = {c.name: _row(c, raw[c.name], dims) for c in cases}
    ref = rows["reference"]
    for row in rows.values():
        row["speedup_vs_reference"] = _ratio(row["tokens_per_s"], ref["tokens_per_s"])
        row["memory_vs_reference"] = _ratio(row["peak_memory_mb"], ref["peak_memory_mb"])
    default_name = case_name("full", "grouped", precision["chosen"], False)
    ours = rows[default_name]
    other = "no" if precision["chosen"] == "bf16" else "bf16"
    eval_raw = raw[default_name]["eval"]

    def compare(a: str, b: str, what: str) -> dict[str, Any] | None:
        if a not in rows or b not in rows:
            return None
        return {
            "cases": [a, b],
            what: _ratio(rows[a]["tokens_per_s"], rows[b]["tokens_per_s"]),
            "memory_ratio": _ratio(rows[a]["peak_memory_mb"], rows[b]["peak_memory_mb"]),
            "step_time_ratio": _ratio(rows[a]["s_per_step"], rows[b]["s_per_step"]),
        }

    fp32_name, bf16_name = case_name("full", "grouped", "no", False), case_name("full", "grouped", "bf16", False)
    loss_check = None
    if fp32_name in rows and bf16_name in rows:
        a, b = rows[fp32_name]["losses"], rows[bf16_name]["losses"]
        diffs = [abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b)]
        loss_check = {"fp32_losses": a, "bf16_losses": b, "max_rel_diff": round(max(diffs), 5) if diffs else None}
    figures = {
        "train_speedup_vs_reference": ours["speedup_vs_reference"],
        "eval_speedup": round(eval_raw["eval_speedup"], 3),
        "mfu": ours["mfu"],
    }
    lora_name = case_name("lora", "grouped", precision["chosen"], False)
    return {
        **figures,
        "targets": {k: {"target": v, "measured": figures[k], "met": bool(figures[k] >= v)} for k, v in TARGETS.items()},
        "default_path": default_name,
        "precision": precision,
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
        "comparisons": {
            "grouped_vs_random": compare(
                default_name, case_name("full", "random", precision["chosen"], False), "speedup"
            ),
            "bf16_vs_fp32": compare(bf16_name, fp32_name, "speedup"),
            "lora_vs_full": compare(lora_name, default_name, "speedup"),
            "gradient_checkpointing_vs_off": compare(
                case_name("full", "grouped", precision["chosen"], True), default_name, "speedup"
            ),
            "lora_gradient_checkpointing_vs_off": compare(
                case_name("lora", "grouped", precision["chosen"], True), lora_name, "speedup"
            ),
        },
        "bf16_loss_check": loss_check,
        "eval": eval_raw,
        "rows": list(rows.values()),
        "settings": {**asdict(args), "other_precision": PRECISION_NAMES[other]},
        "environment": {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


# --------------------------------------------------------------------------------------------- output


TABLE_COLUMNS = (
    ("case", "name", "{}"),
    ("s/step", "s_per_step", "{:.2f}"),
    ("real tok/s", "tokens_per_s", "{:.0f}"),
    ("samples/s", "samples_per_s", "{:.2f}"),
    ("padding", "padding_fraction", "{:.0%}"),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("vs ref", "speedup_vs_reference", "{:.2f}x"),
    ("MFU", "mfu", "{:.0%}"),
    ("peak GF/s", "matmul_peak_gflops", "{:.0f}"),
)


def format_table(results: dict[str, Any]) -> str:
    """The rows as a Markdown table plus the headline figures and comparisons."""
    cells = [[fmt.format(row[key]) for _, key, fmt in TABLE_COLUMNS] for row in results["rows"]]
    lines = [markdown_table([c[0] for c in TABLE_COLUMNS], cells)]
    ev = results["eval"]
    lines.append("")
    lines.append(
        f"eval: batched length-sorted {ev['batched_summaries_per_s']:.2f} summaries/s vs one-at-a-time "
        f"{ev['one_at_a_time_summaries_per_s']:.2f} ({ev['dialogues']} dialogues, {ev['max_new_tokens']} new tokens, "
        f"batch {ev['batch_size']}, {PRECISION_NAMES.get(ev['mixed_precision'], ev['mixed_precision'])})"
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
    if results["bf16_loss_check"]:
        lines.append(
            f"bf16 vs fp32 loss, same batches: max relative difference {results['bf16_loss_check']['max_rel_diff']}"
        )
    lines.append(f"our default path: {results['default_path']} ({results['precision']['reason']})")
    for key, t in results["targets"].items():
        shown = f"{t['measured']:.0%}" if key == "mfu" else f"{t['measured']:.2f}x"
        target = f"{t['target']:.0%}" if key == "mfu" else f"{t['target']}x"
        lines.append(f"{key}: {shown} (target >= {target}: {'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, run, print the table, write the JSON."""
    args = parse_args(argv)
    if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
        raise UserError(f"--output_json folder does not exist: {Path(args.output_json).parent}")
    results = run_benchmark(args)
    sys.stdout.write(format_table(results) + "\n")
    if args.output_json:
        write_json(args.output_json, results)
    return results
