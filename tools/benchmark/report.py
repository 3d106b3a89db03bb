"""The results: one row per case with ratios against the reference, the headline figures against the project's
targets, the comparisons (one change at a time), and the Markdown table that ``scripts/benchmark.py`` prints."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict
from typing import Any

import torch

from dialogsum.formatting import markdown_table, significant
from tools.benchmark.args import BenchmarkArgs
from tools.benchmark.cases import PRECISION_NAMES, Case, case_name, eager_twin
from tools.benchmark.pool import Pool
from tools.flops import FLOP_FORMULA, T5Dims, mfu, training_flops

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

# --------------------------------------------------------------------------------------------- rows


def _row(case: Case, raw: dict[str, Any], dims: T5Dims) -> dict[str, Any]:
    """A case's figures from its process's raw measurements (FLOPs and MFU from :mod:`tools.flops`)."""
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


def _rows(cases: list[Case], raw: dict[str, dict[str, Any]], dims: T5Dims) -> dict[str, dict[str, Any]]:
    """The rows of the cases that ran and did not fail, with their speed and memory against the reference."""
    rows = {c.name: _row(c, raw[c.name], dims) for c in cases if c.name in raw and "failed" not in raw[c.name]}
    ref = rows.get("reference")
    for row in rows.values():
        row["speedup_vs_reference"] = _ratio(row["tokens_per_s"], ref["tokens_per_s"]) if ref else None
        row["memory_vs_reference"] = _ratio(row["peak_memory_mb"], ref["peak_memory_mb"]) if ref else None
    return rows


# --------------------------------------------------------------------------------------------- figures


def _name(method: str, batching: str, precision: str, compiled: bool, gc: bool = False, **kw: Any) -> str:
    return case_name(method, batching, precision, gc, compiled, **kw)


def _default_name(default: dict[str, Any]) -> str:
    """Our default path's case (``default``: :func:`tools.benchmark.device.choose_precision`)."""
    return _name("full", "grouped", default["chosen"], default["compiled"])


def _field(rows: dict[str, dict[str, Any]], case: str, key: str) -> Any:
    return rows[case][key] if case in rows else None


def _headline_figures(
    rows: dict[str, dict[str, Any]], raw: dict[str, dict[str, Any]], default: dict[str, Any]
) -> dict[str, Any]:
    """The figures the targets are about (None where the cases they need did not run)."""
    precision, compiled = default["chosen"], default["compiled"]
    default_name = _default_name(default)
    ours = rows.get(default_name)
    fp32_name = _name("full", "grouped", "no", compiled)
    if fp32_name not in rows:
        fp32_name = _name("full", "grouped", "no", False)
    lora_name = _name("lora", "grouped", precision, compiled)
    budget_mfus = [r["mfu"] for r in rows.values() if r["batching"] == "budget"]
    eval_raw = raw.get(default_name, {}).get("eval")
    return {
        "train_speedup_vs_reference": _field(rows, default_name, "speedup_vs_reference"),
        "train_speedup_vs_reference_fp32": _field(rows, fp32_name, "speedup_vs_reference"),
        "lora_speedup_vs_reference": _field(rows, lora_name, "speedup_vs_reference"),
        "eval_speedup": significant(eval_raw["eval_speedup"]) if eval_raw else None,
        "mfu": ours["mfu"] if ours else None,
        "token_budget_mfu": max(budget_mfus) if budget_mfus else None,
        "compile_seconds": ours["compile_seconds"] if ours and compiled else None,
    }


def _targets(figures: dict[str, Any], device_type: str) -> dict[str, dict[str, Any]]:
    """Each measured headline figure against its target on this kind of device."""
    return {
        k: {"target": v, "measured": figures[k], "met": bool(figures[k] >= v)}
        for k, v in TARGETS[device_type].items()
        if figures.get(k) is not None
    }


def _compile_costs(rows: dict[str, dict[str, Any]], cases: list[Case]) -> list[dict[str, Any]]:
    """For every compiled case: its compile time, the step time it saves over its eager twin, and the break-even."""
    by_name = {c.name: c for c in cases}
    costs = []
    for row in rows.values():
        if not row["compiled"]:
            continue
        twin = eager_twin(by_name[row["name"]])
        saved = rows[twin]["s_per_step"] - row["s_per_step"] if twin in rows else None
        costs.append(
            {
                "case": row["name"],
                "eager_case": twin if twin in rows else None,
                "compile_seconds": row["compile_seconds"],
                "seconds_saved_per_step": round(saved, 4) if saved is not None else None,
                # compiling pays for itself after this many steps (None: not faster, or no eager twin measured)
                "break_even_steps": math.ceil(row["compile_seconds"] / saved) if saved and saved > 0 else None,
            }
        )
    return costs


def _loss_check(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """bf16 against fp32 losses of the same batches (both eager), where both ran."""
    bf16_name, eager_fp32 = _name("full", "grouped", "bf16", False), _name("full", "grouped", "no", False)
    if eager_fp32 not in rows or bf16_name not in rows:
        return None
    a, b = rows[eager_fp32]["losses"], rows[bf16_name]["losses"]
    diffs = [abs(x - y) / max(abs(x), 1e-8) for x, y in zip(a, b)]
    return {"fp32_losses": a, "bf16_losses": b, "max_rel_diff": round(max(diffs), 5) if diffs else None}


def _compare(rows: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Case ``a`` over case ``b``: speed, peak memory and step time ratios (None unless both ran)."""
    if a not in rows or b not in rows:
        return None
    return {
        "cases": [a, b],
        "speedup": _ratio(rows[a]["tokens_per_s"], rows[b]["tokens_per_s"]),
        "memory_ratio": _ratio(rows[a]["peak_memory_mb"], rows[b]["peak_memory_mb"]),
        "step_time_ratio": _ratio(rows[a]["s_per_step"], rows[b]["s_per_step"]),
    }


def _comparisons(rows: dict[str, dict[str, Any]], default: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """One change at a time against our default path (or its LoRA case); against eager twins only when the default
    path compiles."""
    p, c = default["chosen"], default["compiled"]
    ours, lora = _default_name(default), _name("lora", "grouped", p, c)
    bf16_eager, fp32_eager = _name("full", "grouped", "bf16", False), _name("full", "grouped", "no", False)
    return {
        "grouped_vs_random": _compare(rows, ours, _name("full", "random", p, c)),
        "bf16_vs_fp32": _compare(rows, _name("full", "grouped", "bf16", c), _name("full", "grouped", "no", c)),
        "bf16_vs_fp32_eager": _compare(rows, bf16_eager, fp32_eager) if c else None,
        "compiled_vs_eager": _compare(rows, ours, _name("full", "grouped", p, False)) if c else None,
        "buckets_vs_none": _compare(
            rows, _name("full", "grouped", p, True), _name("full", "grouped", p, True, buckets=False)
        ),
        "lora_vs_full": _compare(rows, lora, ours),
        "lora_compiled_vs_eager": _compare(rows, lora, _name("lora", "grouped", p, False)) if c else None,
        "zero2_vs_single": _compare(rows, _name("full", "grouped", p, c, prefix="zero2-"), ours),
        "gradient_checkpointing_vs_off": _compare(rows, _name("full", "grouped", p, c, True), ours),
        "lora_gradient_checkpointing_vs_off": _compare(rows, _name("lora", "grouped", p, c, True), lora),
    }


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
    rows = _rows(cases, raw, dims)
    figures = _headline_figures(rows, raw, default)
    other = "no" if default["chosen"] == "bf16" else "bf16"
    return {
        **figures,
        "device": device,
        "targets": _targets(figures, device["type"]),
        "default_path": _default_name(default),
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
        "compile": _compile_costs(rows, cases),
        "comparisons": _comparisons(rows, default),
        "bf16_loss_check": _loss_check(rows),
        "eval": raw.get(_default_name(default), {}).get("eval"),
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


# --------------------------------------------------------------------------------------------- table


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
#: Headline figures printed under the table, in this order.
HEADLINE_FIGURES = (
    "train_speedup_vs_reference",
    "train_speedup_vs_reference_fp32",
    "lora_speedup_vs_reference",
    "eval_speedup",
    "mfu",
    "token_budget_mfu",
)


def _cell(fmt: str, value: Any) -> str:
    return "n/a" if value is None else fmt.format(value)


def _detail_lines(results: dict[str, Any]) -> list[str]:
    """Eval speed, epoch padding, comparisons, compile costs, the bf16 loss check and failed cases."""
    lines = []
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
    lines += [f"FAILED {name}: {failure['failed']}" for name, failure in results["failed"].items()]
    return lines


def _headline_lines(results: dict[str, Any]) -> list[str]:
    """The device, our default path, and each headline figure against its target."""
    lines = [
        f"device: {results['device']['name']}",
        f"our default path: {results['default_path']} ({results['precision']['reason']})",
    ]
    for key in HEADLINE_FIGURES:
        value = results[key]
        shown = "not measured" if value is None else f"{value:.0%}" if key in PERCENT_FIGURES else f"{value:.2f}x"
        target = results["targets"].get(key)
        if target:
            goal = f"{target['target']:.0%}" if key in PERCENT_FIGURES else f"{target['target']}x"
            shown += f" (target >= {goal}: {'met' if target['met'] else 'NOT met'})"
        lines.append(f"{key}: {shown}")
    if results["compile_seconds"] is not None:
        lines.append(f"compile_seconds: {results['compile_seconds']:.0f} (default path, not in its step time)")
    return lines


def format_table(results: dict[str, Any]) -> str:
    """The rows as a Markdown table plus the headline figures and comparisons."""
    cells = [[_cell(fmt, row[key]) for _, key, fmt in TABLE_COLUMNS] for row in results["rows"]]
    table = markdown_table([c[0] for c in TABLE_COLUMNS], cells)
    return "\n".join([table, "", *_detail_lines(results), *_headline_lines(results)])
