"""A benchmark run: check the inputs, plan the cases, run each in its own process, summarise; ``main`` prints the
table and writes the JSON (rewritten after every case, so a run stopped part-way leaves the cases it finished)."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dialogsum.errors import UserError
from dialogsum.files import write_json
from tools.benchmark.args import BenchmarkArgs, parse_args
from tools.benchmark.cases import Case, plan_cases
from tools.benchmark.device import choose_precision, device_info
from tools.benchmark.launch import case_context, run_case, worker_env
from tools.benchmark.pool import Pool, build_pool
from tools.benchmark.report import format_table, summarise
from tools.flops import T5Dims

logger = logging.getLogger(__name__)


def _check_inputs(args: BenchmarkArgs) -> Path:
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--model_dir {args.model_dir} has no config.json (expected a model directory)")
    if not Path(args.data_file).is_file():
        raise UserError(f"--data_file not found: {args.data_file}")
    return model_dir


def _deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _plan(args: BenchmarkArgs, default: dict[str, Any], gpu: bool) -> list[Case]:
    """The cases of this run: the plan for the device, narrowed by ``--only``; ZeRO-2 only with DeepSpeed."""
    cases = plan_cases(
        default["chosen"], args.full_grid or not args.quick, default["compiled"], gpu, tuple(args.token_budgets)
    )
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in cases})
        if unknown:
            raise UserError(f"--only: no case {', '.join(unknown)} here; cases: {', '.join(c.name for c in cases)}")
        cases = [c for c in cases if c.name in args.only]
    if any(c.launch_config for c in cases) and not _deepspeed_available():
        cases = [c for c in cases if not c.launch_config]
    return cases


def _model_path(model_dir: Path, work: Path, seed: int) -> Path:
    """``model_dir`` when it has weights; else the architecture with random weights (untied lm_head), built once
    in ``work`` and loaded by every case."""
    from dialogsum.modeling import model_from_config

    if any(p.suffix in (".safetensors", ".bin") for p in model_dir.iterdir()):
        return model_dir
    logger.info("no weights in %s: building the architecture with random weights", model_dir)
    model = model_from_config(str(model_dir), seed=seed)
    model.save_pretrained(str(work / "model"), safe_serialization=True)
    return work / "model"


def _worker_spec(args: BenchmarkArgs, model_path: Path, model_dir: Path, tokenizer: Any, pool: Pool) -> dict[str, Any]:
    """What every case process reads: the model, the settings, the pool, the whole file and the eval dialogues."""
    from dialogsum.config import LAB_PROMPT
    from dialogsum.data import read_rows

    return {
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
        "eval_dialogues": [r[args.text_column] for r in read_rows(args.data_file)[: args.eval_samples]],
        "pool": {"input_ids": pool.input_ids, "labels": pool.labels},
        "dataset": {"input_ids": pool.dataset_input_ids, "labels": pool.dataset_labels},
    }


def _run_one(case: Case, spec: dict[str, Any], work: Path, args: BenchmarkArgs, ctx: Any, config: Path) -> dict:
    """One case's raw figures (``{"failed": ...}`` when it failed; logged with its process's last lines)."""
    raw = run_case(case, spec, work, args.worker_timeout_s, ctx, worker_env(case, config))
    raw["steps"] = args.steps
    if "failed" in raw:
        logger.warning("case %s failed: %s\n%s", case.name, raw["failed"], raw["log_tail"])
    return raw


def run_benchmark(args: BenchmarkArgs) -> dict[str, Any]:
    """Run every case, compare each with the reference, and return the results (see :mod:`tools.benchmark`).

    With ``--output_json`` the results so far are written after every case.
    """
    from transformers import AutoConfig

    from dialogsum.modeling import load_tokenizer

    model_dir = _check_inputs(args)
    default = choose_precision(args)
    device = device_info()
    logger.info("our default path: %s (from %s)", default["reason"], default["config"])
    tokenizer = load_tokenizer(str(model_dir))
    pool = build_pool(args, tokenizer)
    dims = T5Dims.from_config(AutoConfig.from_pretrained(str(model_dir)))
    cases = _plan(args, default, device["type"] == "cuda")
    started = time.perf_counter()
    raw: dict[str, dict[str, Any]] = {}

    def results() -> dict[str, Any]:
        out = summarise(args, cases, raw, dims, default, pool, device)
        out["wall_time_s"] = round(time.perf_counter() - started, 1)
        return out

    with tempfile.TemporaryDirectory(prefix="dialogsum-benchmark-") as tmp:
        work = Path(tmp)
        spec = _worker_spec(args, _model_path(model_dir, work, args.seed), model_dir, tokenizer, pool)
        ctx = case_context()
        for index, case in enumerate(cases, start=1):
            logger.info("case %d/%d: %s", index, len(cases), case.name)
            raw[case.name] = _run_one(case, spec, work, args, ctx, Path(default["config"]))
            if args.output_json:
                write_json(args.output_json, results())
    return results()


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
