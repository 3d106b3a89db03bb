"""Compare evaluated systems: ROUGE with intervals, improvements, paired tests, resources, side-by-side.

Input: result folders written by training or ``scripts/evaluate.py``, each holding ``metrics.json`` and
``predictions.jsonl`` (one line per unique dialogue: ``id, dialogue, references, prediction``). The first
system is the baseline (usually the zero-shot original model). ROUGE is recomputed from the predictions with
:mod:`dialogsum.metrics`, so point estimates and bootstrap intervals come from the same per-dialogue scores;
the headline protocol is the multi-reference best match, and the flat per-row figure is reported too.

Output, written all or nothing by :func:`dialogsum.files.write_files`: ``comparison.json``, ``comparison.md`` and
the plots it shows (``rouge.png``, ``resources.png``, drawn by :mod:`dialogsum.plots` like the run report's).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dialogsum.config import MAX_SEED
from dialogsum.errors import ConfigError, UserError
from dialogsum.files import json_text, read_json_object, read_jsonl, write_files
from dialogsum.formatting import RESOURCE_FIGURES, markdown_table, one_line, plain, points, signed
from dialogsum.metrics import (
    HEADLINE_PROTOCOL,
    PROTOCOLS,
    ROUGE_KEYS,
    ROUGE_LABELS,
    eval_set_fingerprint,
    paired_bootstrap,
    rouge_with_intervals,
    score_examples,
)
from dialogsum.plots import plot_resources, plot_rouge
from dialogsum.results import check_results_belong

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# metrics.json disagreeing with the recomputed headline by more than this (0..1 scale) is worth a warning.
_METRICS_TOLERANCE = 5e-4
#: The most bootstrap resamples --n_resamples takes: time grows with it, the intervals barely move past 10,000.
MAX_RESAMPLES = 100_000


@dataclass
class RunResult:
    """One evaluated system: its metrics.json and its per-dialogue predictions."""

    name: str
    directory: Path
    metrics: dict[str, Any]
    ids: list[str]
    dialogues: list[str]
    references: list[list[str]]
    predictions: list[str]


# --------------------------------------------------------------------------------------------- loading


def parse_run_spec(spec: str) -> tuple[str, Path]:
    """Split a ``NAME=DIR`` flag value; raise :class:`ConfigError` when it is malformed."""
    name, sep, directory = spec.partition("=")
    name, directory = name.strip(), directory.strip()
    if not sep or not name or not directory:
        raise ConfigError(f"--run expects NAME=DIR (e.g. --run full=outputs/full), got {spec!r}")
    if not _NAME.match(name):
        raise ConfigError(f"--run name {name!r} may only hold letters, digits and _ . + - (got {spec!r})")
    return name, Path(directory)


def parse_run_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """Parse every ``--run`` value, in order; names must be unique."""
    if not specs:
        raise ConfigError("give at least one --run NAME=DIR (the first one is the baseline)")
    runs = [parse_run_spec(spec) for spec in specs]
    seen: set[str] = set()
    for name, _ in runs:
        if name in seen:
            raise ConfigError(f"--run name {name!r} is given twice; names must be unique")
        seen.add(name)
    return runs


def _load_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"no metrics.json in {path.parent} (expected the output folder of a training or evaluate.py run)"
        )
    return read_json_object(path)


def _row_references(row: dict[str, Any], where: str) -> list[str]:
    refs = row.get("references")
    if refs is None and isinstance(row.get("reference"), str):
        refs = [row["reference"]]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise UserError(f"{where}: 'references' must be a non-empty list of non-empty strings")
    return refs


def _load_predictions(path: Path) -> tuple[list[str], list[str], list[list[str]], list[str]]:
    if not path.is_file():
        raise UserError(f"no predictions.jsonl in {path.parent} (needed for intervals and the side-by-side)")
    ids: list[str] = []
    dialogues: list[str] = []
    references: list[list[str]] = []
    predictions: list[str] = []
    seen: set[str] = set()
    for number, row in enumerate(read_jsonl(path), start=1):
        where = f"{path}: line {number}"
        if not isinstance(row.get("prediction"), str) or not isinstance(row.get("dialogue"), str):
            raise UserError(f"{where} needs string fields 'dialogue' and 'prediction'")
        example_id = str(row.get("id", row["dialogue"]))
        if example_id in seen:
            raise UserError(f"{where}: id {example_id!r} appears twice (one line per unique dialogue expected)")
        seen.add(example_id)
        ids.append(example_id)
        dialogues.append(row["dialogue"])
        references.append(_row_references(row, where))
        predictions.append(row["prediction"])
    if not ids:
        raise UserError(f"{path} holds no predictions")
    return ids, dialogues, references, predictions


def load_run(name: str, directory: str | Path) -> RunResult:
    """Read and validate one result folder."""
    folder = Path(directory)
    if not folder.is_dir():
        raise UserError(f"--run {name}: result folder not found: {folder}")
    metrics = _load_metrics(folder / "metrics.json")
    ids, dialogues, references, predictions = _load_predictions(folder / "predictions.jsonl")
    # results of other weights than those in the folder (stale) are refused, with one line
    check_results_belong(folder, metrics, read_jsonl(folder / "predictions.jsonl"))
    return RunResult(name, folder, metrics, ids, dialogues, references, predictions)


def align_to_baseline(runs: list[RunResult]) -> list[RunResult]:
    """Put every run's examples in the baseline's order; all runs must cover the same dialogues.

    A paired comparison is only meaningful on identical dialogues, so any difference is an error.
    """
    base = runs[0]
    base_ids = set(base.ids)
    aligned = [base]
    for run in runs[1:]:
        run_ids = set(run.ids)
        if run_ids != base_ids:
            only_run = sorted(run_ids - base_ids)
            only_base = sorted(base_ids - run_ids)
            example = (only_run or only_base)[0]
            raise UserError(
                f"runs {base.name!r} and {run.name!r} were evaluated on different dialogues "
                f"({len(only_base)} only in {base.name}, {len(only_run)} only in {run.name}, "
                f"e.g. id {example!r}); evaluate them on the same test set"
            )
        position = {example_id: i for i, example_id in enumerate(run.ids)}
        order = [position[example_id] for example_id in base.ids]
        for base_index, run_index in enumerate(order):
            if run.dialogues[run_index].strip() != base.dialogues[base_index].strip():
                raise UserError(
                    f"runs {base.name!r} and {run.name!r} have different dialogue texts for id "
                    f"{base.ids[base_index]!r}; evaluate them on the same test set"
                )
        check_same_references(base, run, order)
        aligned.append(
            RunResult(
                run.name,
                run.directory,
                run.metrics,
                list(base.ids),
                list(base.dialogues),
                [run.references[i] for i in order],
                [run.predictions[i] for i in order],
            )
        )
    return aligned


def check_same_references(base: RunResult, run: RunResult, order: list[int]) -> None:
    """Refuse two runs scored against different references for the same dialogues (``order``: the run's index
    of each baseline example): ROUGE against 3 references and against 1 differ by tens of points whatever the
    predictions, so such a gap says nothing about the systems."""
    for base_index, run_index in enumerate(order):
        ours, theirs = base.references[base_index], run.references[run_index]
        if sorted(r.strip() for r in ours) == sorted(r.strip() for r in theirs):
            continue
        how = f"{len(ours)} in {base.name}, {len(theirs)} in {run.name}"
        how = "worded differently" if len(ours) == len(theirs) else how
        raise UserError(
            f"runs {base.name!r} and {run.name!r} were scored on different evaluation sets (eval set "
            f"{eval_set_fingerprint(base.dialogues, base.references)} vs "
            f"{eval_set_fingerprint(run.dialogues, run.references)}: the references of id {base.ids[base_index]!r} "
            f"differ, {how}); their ROUGE is not comparable: evaluate both on the same test file"
        )


# --------------------------------------------------------------------------------------------- analysis


def _pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """(system, reference system) pairs: every system vs the first, plus the last vs the one before it."""
    pairs = [(name, names[0]) for name in names[1:]]
    if len(names) >= 3:
        pairs.append((names[-1], names[-2]))
    return pairs


def _resources(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's resource figures (:data:`~dialogsum.formatting.RESOURCE_FIGURES`), None where not recorded."""
    out: dict[str, Any] = {}
    for key, _, _ in RESOURCE_FIGURES:
        value = metrics.get(key)
        out[key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return out


def build_comparison(
    runs: list[RunResult], num_samples: int = 3, seed: int = 0, n_resamples: int = 1000
) -> dict[str, Any]:
    """Everything the report shows, as one JSON-serialisable dict (scores in 0..1, improvements in points)."""
    if num_samples < 0:
        raise ConfigError(f"--num_samples must be >= 0, got {num_samples}")
    runs = align_to_baseline(runs)
    names = [run.name for run in runs]
    per_example: dict[str, dict[str, dict[str, list[float]]]] = {}
    systems: list[dict[str, Any]] = []
    for run in runs:
        logger.info("scoring %s (%d dialogues)", run.name, len(run.predictions))
        scores = score_examples(run.predictions, run.references)
        per_example[run.name] = scores
        intervals = rouge_with_intervals(scores[HEADLINE_PROTOCOL], n_resamples=n_resamples, seed=seed)
        protocols = {p: {k: math.fsum(scores[p][k]) / len(scores[p][k]) for k in ROUGE_KEYS} for p in PROTOCOLS}
        reported = {k: run.metrics[k] for k in ROUGE_KEYS if isinstance(run.metrics.get(k), (int, float))}
        mismatch = {k: v for k, v in reported.items() if abs(v - protocols[HEADLINE_PROTOCOL][k]) > _METRICS_TOLERANCE}
        if mismatch:
            logger.warning(
                "%s: metrics.json ROUGE %s differs from the predictions' %s ROUGE; using the latter",
                run.name,
                mismatch,
                HEADLINE_PROTOCOL,
            )
        systems.append(
            {
                "name": run.name,
                "directory": str(run.directory),
                "method": run.metrics.get("method"),
                "method_detail": run.metrics.get("method_detail"),
                "model_name_or_path": run.metrics.get("model_name_or_path"),
                "adapter_path": run.metrics.get("adapter_path"),
                "generation": run.metrics.get("generation"),
                "num_examples": len(run.predictions),
                "num_references": sum(len(r) for r in run.references),
                "eval_set_fingerprint": eval_set_fingerprint(run.dialogues, run.references),
                "rouge": intervals,
                "protocols": protocols,
                "metrics_json_rouge": reported,
                "resources": _resources(run.metrics),
            }
        )
    base = systems[0]["rouge"]
    for system in systems:
        improvement: dict[str, dict[str, float | None]] = {}
        for key in ROUGE_KEYS:
            delta = system["rouge"][key]["mean"] - base[key]["mean"]
            relative = 100.0 * delta / base[key]["mean"] if base[key]["mean"] > 0 else None
            improvement[key] = {"points": 100.0 * delta, "relative_percent": relative}
        system["improvement_over_baseline"] = improvement
    paired = []
    for name_a, name_b in _pairs(names):
        tests = {
            key: paired_bootstrap(
                per_example[name_a][HEADLINE_PROTOCOL][key],
                per_example[name_b][HEADLINE_PROTOCOL][key],
                n_resamples=n_resamples,
                seed=seed,
            )
            for key in ROUGE_KEYS
        }
        paired.append({"system": name_a, "versus": name_b, "tests": tests})
    sample_indices = _sample_indices(runs[0].ids, num_samples, seed)
    samples = [
        {
            "id": runs[0].ids[i],
            "dialogue": runs[0].dialogues[i],
            "references": runs[0].references[i],
            "predictions": {run.name: run.predictions[i] for run in runs},
        }
        for i in sample_indices
    ]
    return {
        "baseline": names[0],
        "headline_protocol": HEADLINE_PROTOCOL,
        "num_examples": len(runs[0].ids),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": 0.95},
        "systems": systems,
        "paired_bootstrap": paired,
        "samples": samples,
    }


def _sample_indices(ids: list[str], num_samples: int, seed: int) -> list[int]:
    """Seeded choice of examples, independent of the order of lines in predictions.jsonl."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return random.Random(seed).sample(order, min(num_samples, len(ids)))


# --------------------------------------------------------------------------------------------- rendering


def _p_value(p: float, n_resamples: int) -> str:
    """A bootstrap p-value; 0 resamples beyond the observed gap reads ``< 1/n``."""
    return f"< {1.0 / n_resamples:.3g}" if p == 0.0 else f"{p:.3f}"


def has_resources(comparison: dict[str, Any]) -> bool:
    """Whether any system reports at least one resource figure (otherwise no resources table/plot)."""
    return any(v is not None for s in comparison["systems"] for v in s["resources"].values())


def render_markdown(comparison: dict[str, Any], plots: dict[str, str]) -> str:
    """The comparison report; ``plots`` maps ``"rouge"``/``"resources"`` to image file names beside it."""
    systems = comparison["systems"]
    names = [s["name"] for s in systems]
    boot = comparison["bootstrap"]
    headers = ["System", *(ROUGE_LABELS[k] for k in ROUGE_KEYS)]
    out = [f"# Comparison: {' vs '.join(names)}", ""]
    out.append(
        f"ROUGE F1 x 100 on {comparison['num_examples']} dialogues, {HEADLINE_PROTOCOL.replace('_', '-')} "
        "(each dialogue scored against its best-matching reference, per metric), with "
        f"{int(boot['confidence'] * 100)}% bootstrap intervals ({boot['n_resamples']} resamples of the "
        f"dialogues, seed {boot['seed']}). Baseline: **{comparison['baseline']}**."
    )
    out += ["", "## ROUGE", ""]
    rows = []
    for s in systems:
        cells = [
            f"{points(r['mean'])} [{points(r['ci_low'])}, {points(r['ci_high'])}]"
            for r in (s["rouge"][k] for k in ROUGE_KEYS)
        ]
        rows.append([s["name"], *cells])
    out.append(markdown_table(headers, rows))
    if "rouge" in plots:
        out += ["", f"![ROUGE per system]({plots['rouge']})"]
    if len(systems) > 1:
        out += [
            "",
            f"## Improvement over {comparison['baseline']}",
            "",
            "Absolute difference in ROUGE points, relative difference in parentheses.",
            "",
        ]
        rows = []
        for s in systems[1:]:
            cells = []
            for key in ROUGE_KEYS:
                imp = s["improvement_over_baseline"][key]
                rel = "n/a" if imp["relative_percent"] is None else f"{signed(imp['relative_percent'], 1)}%"
                cells.append(f"{signed(imp['points'])} ({rel})")
            rows.append([s["name"], *cells])
        out.append(markdown_table(headers, rows))
        out += [
            "",
            "## Paired bootstrap",
            "",
            "Difference in ROUGE points on the same dialogues (first system minus second), its 95% interval "
            "and a two-sided bootstrap p-value. An interval that excludes 0 is a real gap.",
            "",
        ]
        rows = []
        for pair in comparison["paired_bootstrap"]:
            cells = []
            for key in ROUGE_KEYS:
                t = pair["tests"][key]
                cells.append(
                    f"{signed(100 * t['mean_difference'])} [{signed(100 * t['ci_low'])}, "
                    f"{signed(100 * t['ci_high'])}], p {_p_value(t['p_value_two_sided'], t['n_resamples'])}"
                )
            rows.append([f"{pair['system']} − {pair['versus']}", *cells])
        out.append(markdown_table(["Comparison", *headers[1:]], rows))
    out += [
        "",
        "## Other ROUGE protocols",
        "",
        "`mean_over_references`: mean F1 over each dialogue's references. `flat`: one score per "
        "(dialogue, reference) row, i.e. the figure obtained on the hub's flattened test split "
        "(comparable with numbers reported that way).",
        "",
    ]
    rows = []
    for s in systems:
        for protocol in PROTOCOLS:
            rows.append([s["name"], protocol, *(points(s["protocols"][protocol][k]) for k in ROUGE_KEYS)])
    out.append(markdown_table(["System", "Protocol", *headers[1:]], rows))
    if has_resources(comparison):
        out += ["", "## Resources", ""]
        rows = [
            [
                s["name"],
                plain(s.get("method_detail") or s["method"]),
                *(show(s["resources"][key]) for key, _, show in RESOURCE_FIGURES),
            ]
            for s in systems
        ]
        labels = [label[0].upper() + label[1:] for _, label, _ in RESOURCE_FIGURES]
        out.append(markdown_table(["System", "Method", *labels], rows))
        if "resources" in plots:
            out += ["", f"![Resources per system]({plots['resources']})"]
    out += ["", "## Runs", ""]
    rows = [
        [
            s["name"],
            f"`{s['directory']}`",
            plain(s["model_name_or_path"]),
            f"`{json.dumps(s['generation'], sort_keys=True)}`" if s["generation"] else plain(None),
            str(s["num_references"]),
        ]
        for s in systems
    ]
    out.append(markdown_table(["System", "Folder", "Model", "Generation", "References"], rows))
    if comparison["samples"]:
        out += ["", f"## Sample dialogues (seed {boot['seed']})", ""]
        for number, sample in enumerate(comparison["samples"], start=1):
            out += [f"### {number}. {sample['id']}", "", "```text", sample["dialogue"].strip(), "```", ""]
            for ref_number, reference in enumerate(sample["references"], start=1):
                label = "Human summary" if len(sample["references"]) == 1 else f"Human summary {ref_number}"
                out.append(f"- **{label}:** {one_line(reference)}")
            for name, prediction in sample["predictions"].items():
                out.append(f"- **{name}:** {one_line(prediction) or '(empty)'}")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_terminal(comparison: dict[str, Any]) -> str:
    """A plain-text summary for the terminal: the ROUGE table and the side-by-side samples."""
    width = max(len(s["name"]) for s in comparison["systems"]) + 2
    lines = [f"{'system':<{width}}" + "".join(f"{ROUGE_LABELS[k]:>12}" for k in ROUGE_KEYS)]
    for s in comparison["systems"]:
        lines.append(f"{s['name']:<{width}}" + "".join(f"{points(s['rouge'][k]['mean']):>12}" for k in ROUGE_KEYS))
    for number, sample in enumerate(comparison["samples"], start=1):
        lines += [
            "",
            "=" * 100,
            f"Sample {number}: {sample['id']}",
            "-" * 100,
            sample["dialogue"].strip(),
            "-" * 100,
            f"{'HUMAN':<{width}}{one_line(sample['references'][0])}",
        ]
        for name, prediction in sample["predictions"].items():
            lines.append(f"{name.upper():<{width}}{one_line(prediction) or '(empty)'}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- writing


def write_comparison(comparison: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Render the plots and the report and write them with ``comparison.json`` into ``output_dir``."""
    directory = Path(output_dir)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--output_dir {directory} exists and is not a folder")
    systems = comparison["systems"]
    rouge = plot_rouge(
        {s["name"]: {k: s["rouge"][k]["mean"] for k in ROUGE_KEYS} for s in systems},
        intervals={
            s["name"]: {k: (s["rouge"][k]["ci_low"], s["rouge"][k]["ci_high"]) for k in ROUGE_KEYS} for s in systems
        },
        title=f"ROUGE ({HEADLINE_PROTOCOL.replace('_', '-')}, 95% bootstrap intervals)",
    )
    resources = plot_resources({s["name"]: s["resources"] for s in systems})
    files = {name: image for name, image in (("rouge.png", rouge), ("resources.png", resources)) if image}
    plots = {name.removesuffix(".png"): name for name in files}
    files["comparison.json"] = json_text(comparison).encode("utf-8")
    files["comparison.md"] = render_markdown(comparison, plots).encode("utf-8")
    directory.mkdir(parents=True, exist_ok=True)
    write_files(files, directory)
    return {name: directory / name for name in files}


def compare_runs(
    run_specs: Sequence[str],
    output_dir: str | Path,
    num_samples: int = 3,
    seed: int = 0,
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Load ``NAME=DIR`` result folders, compare them and write the report; returns the comparison dict."""
    specs = parse_run_specs(run_specs)
    if num_samples < 0:
        raise ConfigError(f"--num_samples must be >= 0, got {num_samples}")
    if not 1 <= n_resamples <= MAX_RESAMPLES:
        raise ConfigError(f"--n_resamples must be in [1, {MAX_RESAMPLES}] (1000 to 10000 is usual), got {n_resamples}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {seed}")
    runs = [load_run(name, directory) for name, directory in specs]
    comparison = build_comparison(runs, num_samples=num_samples, seed=seed, n_resamples=n_resamples)
    write_comparison(comparison, output_dir)
    return comparison
