"""Files a person reads after a run: a Markdown report with PNG plots, and a Hugging Face model card.

:func:`write_run_report` reads what a training run leaves in its output folder (``metrics.json``,
``log_history.jsonl``, ``config.yaml``, ``parameters.json``, ``predictions.jsonl``; every one optional) and
writes ``report.md`` with its plots in ``plots/``. :func:`write_model_card` writes the folder's ``README.md``
in the model-card format of the Hugging Face hub. Plots are drawn with matplotlib's object API on the Agg
canvas (no display, no global pyplot state); every file is written to a temporary name and renamed, so a
crash never leaves half a report.

The plot functions take a mapping ``{system name: metrics}`` so that comparisons can reuse them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dialogsum.config import DEFAULT_LEARNING_RATE, LAB_PROMPT

logger = logging.getLogger(__name__)

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
PROTOCOL_TEXT = {
    "multi_reference": "each summary scored against all human references of its dialogue, best match per "
    "metric (rouge_score's score_multi convention)",
    "mean_over_references": "per dialogue, the mean score over its references, then the mean over dialogues",
    "flat": "one score per (summary, reference) pair, averaged over pairs (the hub's flattened test split "
    "scored row by row, as most public notebooks do)",
}
DIALOGSUM_LICENCE = (
    "DialogSum (Chen et al., 2021) is released under the Creative Commons "
    "Attribution-NonCommercial-ShareAlike 4.0 licence (CC BY-NC-SA 4.0): non-commercial use, with "
    "attribution, and derivatives shared under the same terms. Weights trained on it derive from it; check "
    "that your use complies. FLAN-T5 itself is Apache-2.0."
)
#: Sample predictions shown in the run report.
REPORT_SAMPLE_ROWS = 3
_PLOT_DPI = 110

# ------------------------------------------------------------------------------------------ file helpers


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:  # plain open: the file gets the usual permissions (umask)
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _save_figure(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_PLOT_DPI, bbox_inches="tight")
    _atomic_write_bytes(path, buffer.getvalue())
    return path


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("ignoring unreadable line %d of %s", number, path)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------- formatting


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    """A 0..1 score as points with two decimals (``0.4731`` -> ``47.31``)."""
    return f"{100 * value:.2f}" if _is_number(value) else "–"


def _count(value: Any) -> str:
    return f"{int(value):,}" if _is_number(value) else "–"


def _megabytes(value: Any) -> str:
    if not _is_number(value):
        return "–"
    return f"{value / 1024:,.2f} GiB" if value >= 1024 else f"{value:,.1f} MiB"


def _duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _plain(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "–"
    return str(value)


def _cell(text: Any, limit: int = 400) -> str:
    flat = re.sub(r"\s+", " ", str(text)).replace("|", "\\|").strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[key]) for row in history if _is_number(row.get("step")) and _is_number(row.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Training loss and learning rate (and gradient norm when logged) over optimizer steps.

    Returns the PNG path, or None when the history has no training loss.
    """
    steps, loss = _series(history, "loss")
    if not steps:
        return None
    panels = [("loss", "training loss", loss, steps)]
    for key, title in (("learning_rate", "learning rate"), ("grad_norm", "gradient norm (before clipping)")):
        x, y = _series(history, key)
        if x:
            panels.append((key, title, y, x))
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    for index, (key, title, values, x) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        ax.plot(x, values, marker="o" if len(x) < 30 else None, markersize=3, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if key == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def plot_eval_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Validation loss and, when generated during training, validation ROUGE (points) over steps.

    Returns the PNG path, or None when the history has no evaluation entry.
    """
    steps, eval_loss = _series(history, "eval_loss")
    rouge = {key: _series(history, f"eval_{key}") for key in ROUGE_KEYS}
    rouge = {key: value for key, value in rouge.items() if value[0]}
    if not steps and not rouge:
        return None
    panels = int(bool(steps)) + int(bool(rouge))
    fig = Figure(figsize=(4.6 * panels, 3.4))
    index = 1
    if steps:
        ax = fig.add_subplot(1, panels, index)
        ax.plot(steps, eval_loss, marker="o", markersize=4, color="tab:orange")
        ax.set_title("validation loss")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        index += 1
    if rouge:
        ax = fig.add_subplot(1, panels, index)
        for key, (x, y) in rouge.items():
            ax.plot(x, [100 * v for v in y], marker="o", markersize=4, label=ROUGE_LABELS[key])
        ax.set_title("validation ROUGE")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("F1 × 100")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def plot_throughput(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """Real tokens/s and peak memory over steps. Returns None when neither was logged."""
    series = [
        (title, *_series(history, key), color)
        for key, title, color in (
            ("tokens_per_s", "real tokens / s", "tab:green"),
            ("peak_memory_mb", "peak memory (MiB)", "tab:purple"),
        )
    ]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig = Figure(figsize=(4.4 * len(series), 3.2))
    for index, (title, x, y, color) in enumerate(series):
        ax = fig.add_subplot(1, len(series), index + 1)
        ax.plot(x, y, color=color, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, max(y) * 1.15 if max(y) > 0 else 1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def _annotate_bars(ax: Any, bars: Any, fmt: str) -> None:
    for bar in bars:
        height = bar.get_height()
        ax.annotate(
            fmt.format(height),
            (bar.get_x() + bar.get_width() / 2, height),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 2),
            textcoords="offset points",
        )


def plot_rouge_comparison(systems: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path | None:
    """Grouped bars: ROUGE-1/2/L/Lsum (F1 × 100) of each system. None when no system has a ROUGE score."""
    names = [name for name, m in systems.items() if any(_is_number(m.get(k)) for k in ROUGE_KEYS)]
    if not names:
        return None
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(5.0, 1.6 * len(ROUGE_KEYS) * max(1, len(names)) / 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for index, name in enumerate(names):
        values = [100 * systems[name].get(k, 0.0) if _is_number(systems[name].get(k)) else 0.0 for k in ROUGE_KEYS]
        offsets = [i - 0.4 + width * (index + 0.5) for i in range(len(ROUGE_KEYS))]
        bars = ax.bar(offsets, values, width=width * 0.95, label=name)
        _annotate_bars(ax, bars, "{:.1f}")
    ax.set_xticks(range(len(ROUGE_KEYS)), [ROUGE_LABELS[k] for k in ROUGE_KEYS])
    ax.set_ylabel("F1 × 100")
    ax.set_title("ROUGE")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    if len(names) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


#: (metrics key, panel title, scale, value format) of the resources chart.
RESOURCE_PANELS = (
    ("trainable_params", "trainable parameters (M)", 1e-6, "{:,.2f}"),
    ("checkpoint_size_mb", "checkpoint size (MiB)", 1.0, "{:,.1f}"),
    ("peak_memory_mb", "peak memory (MiB)", 1.0, "{:,.0f}"),
    ("train_runtime_s", "training time", 1.0, "{:,.1f}"),
)


def _time_unit(seconds: Sequence[float]) -> tuple[str, float]:
    longest = max(seconds, default=0.0)
    if longest >= 2 * 3600:
        return "h", 1 / 3600
    if longest >= 120:
        return "min", 1 / 60
    return "s", 1.0


def plot_resources(systems: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path | None:
    """One bar panel per resource (trainable params, checkpoint size, peak memory, training time) and system.

    With a single system the parameter panel shows its trainable against its total parameters (log scale).
    Panels with no value for any system are left out; returns None when nothing is left.
    """
    panels = [p for p in RESOURCE_PANELS if any(_is_number(m.get(p[0])) for m in systems.values())]
    if not panels:
        return None
    names = list(systems)
    fig = Figure(figsize=(3.2 * len(panels), 3.3))
    for index, (key, title, scale, fmt) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        labels = names
        values = [systems[n][key] if _is_number(systems[n].get(key)) else 0.0 for n in names]
        if key == "train_runtime_s":
            unit, scale = _time_unit(values)
            title = f"{title} ({unit})"
        only = systems[names[0]]
        if key == "trainable_params" and len(names) == 1 and _is_number(only.get("total_params")):
            labels, values = ["trainable", "total"], [only[key], only["total_params"]]
            title = "parameters (M)"
            if values[1] > 50 * max(values[0], 1):
                ax.set_yscale("log")
        values = [scale * v for v in values]
        bars = ax.bar(range(len(labels)), values, width=0.6, color=[f"C{i}" for i in range(len(labels))])
        _annotate_bars(ax, bars, fmt)
        ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 2 else 0)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.18)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


# ------------------------------------------------------------------------------------------ run report


def _learning_rate(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> Any:
    for value in (metrics.get("learning_rate"), config.get("learning_rate")):
        if _is_number(value):
            return value
    return DEFAULT_LEARNING_RATE.get(str(config.get("method") or metrics.get("method")))


def _data_description(config: Mapping[str, Any]) -> str:
    if config.get("quickstart"):
        return "the synthetic quick-start dataset (template dialogues, no DialogSum text)"
    files = [f"`{Path(str(config[k])).name}`" for k in ("train_file", "validation_file", "test_file") if config.get(k)]
    if files:
        return "local files " + ", ".join(files)
    if config.get("dataset_name"):
        return f"`{config['dataset_name']}`"
    return "unknown data"


def _method_name(method: Any) -> str:
    return {"full": "full fine-tuning", "lora": "LoRA"}.get(str(method), str(method or "unknown method"))


def _method_sentence_start(method: Any) -> str:
    return {"full": "Full fine-tuning", "lora": "LoRA fine-tuning"}.get(str(method), f"Training ({method})")


def _rouge_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Rows of the ROUGE table: one per protocol present (headline first), else the top-level scores."""
    headline = metrics.get("headline_protocol")
    protocols = [p for p in PROTOCOL_TEXT if isinstance(metrics.get(p), Mapping)]
    protocols.sort(key=lambda p: p != headline)
    header = ["protocol", *(ROUGE_LABELS[k] for k in ROUGE_KEYS)]
    if not protocols:
        if not any(_is_number(metrics.get(k)) for k in ROUGE_KEYS):
            return header, []
        return header, [["–", *(_pct(metrics.get(k)) for k in ROUGE_KEYS)]]
    rows = []
    for protocol in protocols:
        label = f"**{protocol}** (headline)" if protocol == headline else protocol
        rows.append([label, *(_pct(metrics[protocol].get(k)) for k in ROUGE_KEYS)])
    return header, rows


def _rouge_systems(name: str, metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Bars of the run's ROUGE chart: one group per protocol when they differ, else the headline only."""
    protocols = {p: metrics[p] for p in PROTOCOL_TEXT if isinstance(metrics.get(p), Mapping)}
    distinct = {tuple(round(float(v.get(k, 0.0)), 6) for k in ROUGE_KEYS) for v in protocols.values()}
    return protocols if len(distinct) > 1 else {name: metrics}


def _resources_rows(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> list[list[str]]:
    merged = {**params, **{k: v for k, v in metrics.items() if v is not None}}
    percent = merged.get("trainable_percent")
    rows = [
        [
            "trainable parameters",
            f"{_count(merged.get('trainable_params'))}"
            + (f" ({percent:.2f}% of {_count(merged.get('total_params'))})" if _is_number(percent) else ""),
        ],
        ["checkpoint size", _megabytes(merged.get("checkpoint_size_mb"))],
        ["peak memory", _megabytes(merged.get("peak_memory_mb"))],
        ["training time", _duration(merged.get("train_runtime_s"))],
        [
            "throughput",
            f"{merged['train_tokens_per_s']:,.0f} real tokens/s"
            if _is_number(merged.get("train_tokens_per_s"))
            else "–",
        ],
        [
            "samples / s",
            f"{merged['train_samples_per_s']:,.2f}" if _is_number(merged.get("train_samples_per_s")) else "–",
        ],
        [
            "processes",
            f"{_plain(merged.get('num_processes'))} ({_plain(merged.get('distributed_type'))}, "
            f"precision {_plain(merged.get('mixed_precision'))})",
        ],
    ]
    return [row for row in rows if row[1] not in ("–", "– (–, precision –)")]


def _hyperparameter_rows(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[list[str]]:
    method = config.get("method") or metrics.get("method")
    processes = metrics.get("num_processes") if _is_number(metrics.get("num_processes")) else 1
    warmup = config.get("num_warmup_steps")
    warmup = f"{warmup} steps" if warmup is not None else f"ratio {_plain(config.get('warmup_ratio'))}"
    rows = [
        ["method", _method_name(method)],
        ["base model", f"`{config.get('model_name_or_path') or metrics.get('model_name_or_path', '?')}`"],
        ["data", _data_description(config)],
        ["learning rate", _plain(_learning_rate(config, metrics))],
        [
            "schedule",
            f"{_plain(config.get('lr_scheduler_type'))}, warm-up {_plain(warmup)}",
        ],
    ]
    if config.get("max_train_steps"):
        rows.append(["optimizer steps", _plain(config["max_train_steps"])])
    else:
        rows.append(["epochs", _plain(config.get("num_train_epochs"))])
    if _is_number(metrics.get("train_steps")):
        rows.append(["steps run", _plain(metrics["train_steps"])])
    batch, accumulation = config.get("per_device_train_batch_size"), config.get("gradient_accumulation_steps")
    if _is_number(batch) and _is_number(accumulation):
        rows.append(
            [
                "batch",
                f"{batch} per device × {accumulation} accumulation × {processes} process(es) = "
                f"{batch * accumulation * processes} per optimizer step",
            ]
        )
    rows.append(
        [
            "weight decay / grad clip",
            f"{_plain(config.get('weight_decay'))} / {_plain(config.get('max_grad_norm'))}",
        ]
    )
    rows.append(
        [
            "max source / target tokens",
            f"{_plain(config.get('max_source_length'))} / {_plain(config.get('max_target_length'))}",
        ]
    )
    if str(method) == "lora":
        rows.append(
            [
                "LoRA",
                f"r={_plain(config.get('lora_r'))}, alpha={_plain(config.get('lora_alpha'))}, "
                f"dropout={_plain(config.get('lora_dropout'))}, "
                f"targets={_plain(config.get('lora_target_modules'))}",
            ]
        )
    rows.append(["seed", _plain(config.get("seed"))])
    return [row for row in rows if row[1] not in ("–", "–, warm-up ratio –")]


def _generation_text(metrics: Mapping[str, Any]) -> str:
    generation = metrics.get("generation")
    if not isinstance(generation, Mapping) or not generation:
        return ""
    return ", ".join(f"{k}={v}" for k, v in generation.items())


def write_run_report(output_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots (``plots/*.png``) for the run in ``output_dir``; returns its path.

    Reads ``metrics.json``, ``log_history.jsonl``, ``config.yaml``, ``parameters.json`` and
    ``predictions.jsonl`` when present (each one optional). Sections: results (ROUGE per evaluation protocol +
    bar chart), training curves (loss, learning rate, gradient norm), evaluation during training (loss / ROUGE
    over steps), throughput and memory over steps, resources (parameters, checkpoint size, peak memory, time,
    tokens/s + chart), hyperparameters, sample predictions and the files of the run. Images are linked by
    relative path.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"no run folder at {out}")
    metrics = _read_json(out / "metrics.json")
    params = _read_json(out / "parameters.json")
    config = _read_yaml(out / "config.yaml")
    history = _read_jsonl(out / "log_history.jsonl")
    predictions = _read_jsonl(out / "predictions.jsonl")
    plots = out / "plots"
    name = config.get("run_name") or out.resolve().name
    method = config.get("method") or metrics.get("method")
    model = config.get("model_name_or_path") or metrics.get("model_name_or_path") or "?"

    parts = [f"# Run report: {name}", ""]
    parts.append(f"{_method_sentence_start(method)} of `{model}` on {_data_description(config)}.")
    if metrics.get("headline_protocol"):
        split = metrics.get("eval_split", config.get("eval_split", "test"))
        count = metrics.get("num_examples", metrics.get("num_eval_examples"))
        parts.append(
            f"Scores are ROUGE F1 × 100 on the {split} split ({_plain(count)} dialogues, "
            f"{_plain(metrics.get('num_references'))} references); headline protocol: "
            f"**{metrics['headline_protocol']}**."
        )
    parts.append("")

    parts += ["## Results", ""]
    header, rows = _rouge_rows(metrics)
    if rows:
        parts += [_table(header, rows), ""]
        for protocol in PROTOCOL_TEXT:
            if isinstance(metrics.get(protocol), Mapping):
                parts.append(f"- *{protocol}*: {PROTOCOL_TEXT[protocol]}.")
        generation = _generation_text(metrics)
        if generation:
            parts.append(f"- generation: {generation}.")
        if plot_rouge_comparison(_rouge_systems(name, metrics), plots / "rouge.png"):
            parts += ["", "![ROUGE scores](plots/rouge.png)"]
    else:
        parts.append("No evaluation results in this run (no `metrics.json` ROUGE scores).")
    parts.append("")

    train_rows = [row for row in history if "loss" in row]
    parts += ["## Training", ""]
    if plot_training_curves(history, plots / "training.png"):
        first, last = train_rows[0], train_rows[-1]
        parts.append(
            f"Training loss went from {first['loss']:.4f} (step {first.get('step')}) to {last['loss']:.4f} "
            f"(step {last.get('step')}) over {len(train_rows)} logged points"
            + (f"; mean training loss {metrics['train_loss']:.4f}." if _is_number(metrics.get("train_loss")) else ".")
        )
        parts += ["", "![Training loss, learning rate and gradient norm](plots/training.png)"]
    else:
        parts.append("No training steps were logged (`log_history.jsonl` has no training loss).")
    parts.append("")

    eval_rows = [row for row in history if any(k.startswith("eval_") for k in row)]
    if plot_eval_curves(history, plots / "eval.png"):
        parts += ["## Evaluation during training", ""]
        keys = [k for k in ("eval_loss", *(f"eval_{r}" for r in ROUGE_KEYS)) if any(k in row for row in eval_rows)]
        table_rows = [
            [_plain(row.get("step"))]
            + [(f"{row[k]:.4f}" if k == "eval_loss" else _pct(row[k])) if _is_number(row.get(k)) else "–" for k in keys]
            for row in eval_rows
        ]
        labels = ["validation loss" if k == "eval_loss" else ROUGE_LABELS[k[5:]] for k in keys]
        parts += [_table(["step", *labels], table_rows), "", "![Validation curves](plots/eval.png)", ""]

    if plot_throughput(history, plots / "throughput.png"):
        parts += [
            "## Throughput and memory",
            "",
            "![Tokens per second and peak memory](plots/throughput.png)",
            "",
        ]

    parts += ["## Resources", ""]
    resource_rows = _resources_rows(metrics, params)
    if resource_rows:
        parts += [_table(["", "value"], resource_rows), ""]
    if plot_resources({name: {**params, **metrics}}, plots / "resources.png"):
        parts += ["![Resources](plots/resources.png)", ""]
    if not resource_rows:
        parts += ["No resource figures recorded.", ""]

    if config or metrics:
        parts += ["## Hyperparameters", "", _table(["", "value"], _hyperparameter_rows(config, metrics)), ""]
        if config:
            parts += ["The full resolved configuration is in [`config.yaml`](config.yaml).", ""]

    if predictions:
        parts += ["## Sample predictions", ""]
        for row in predictions[:REPORT_SAMPLE_ROWS]:
            parts += [
                f"**{row.get('id', '?')}**",
                "",
                "```text",
                str(row.get("dialogue", "")).strip(),
                "```",
                "",
                f"- reference: {_cell(row.get('reference', ''))}",
                f"- prediction: {_cell(row.get('prediction', ''))}",
                "",
            ]

    files = [
        f"[`{p.name}`]({p.name})"
        for p in sorted(out.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != "report.md"
    ]
    if files:
        parts += ["## Files", "", ", ".join(files), ""]

    report = out / "report.md"
    _atomic_write_text(report, "\n".join(parts))
    return report


# ------------------------------------------------------------------------------------------- model card


def _is_hub_id(name: str) -> bool:
    """A ``owner/name`` hub id that is not a local folder."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _model_card_metadata(
    metrics: Mapping[str, Any], config: Mapping[str, Any], name: str, base: str, method: str
) -> dict[str, Any]:
    tags = ["summarization", "dialogue-summarization", "dialogsum"]
    if "t5" in base.lower():
        tags.append("flan-t5" if "flan" in base.lower() else "t5")
    tags += ["lora", "peft"] if method == "lora" else ["full-fine-tuning"]
    meta: dict[str, Any] = {}
    if _is_hub_id(base):
        meta["base_model"] = base
    meta["library_name"] = "peft" if method == "lora" else "transformers"
    meta["pipeline_tag"] = "summarization"
    meta["tags"] = tags
    dataset = config.get("dataset_name")
    hub_dataset = (
        isinstance(dataset, str)
        and _is_hub_id(dataset)
        and not config.get("quickstart")
        and not any(config.get(k) for k in ("train_file", "validation_file", "test_file"))
    )
    if hub_dataset:
        meta["datasets"] = [dataset]
    meta["metrics"] = ["rouge"]
    scores = [
        {"type": "rouge", "name": ROUGE_LABELS[k], "value": round(100 * metrics[k], 2)}
        for k in ROUGE_KEYS
        if _is_number(metrics.get(k))
    ]
    if scores:
        split = str(metrics.get("eval_split", config.get("eval_split", "test")))
        if config.get("quickstart"):
            data_name = "synthetic quick-start dialogues"
        elif hub_dataset:
            data_name = "DialogSum" if "dialogsum" in str(dataset).lower() else str(dataset)
        else:
            data_name = _data_description(config).replace("`", "")
        # "type" is required by huggingface_hub's model-index parser (peft parses an existing card on save)
        dataset_entry = {"name": data_name, "type": dataset if hub_dataset else "local", "split": split}
        meta["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "summarization", "name": "Dialogue summarization"},
                        "dataset": dataset_entry,
                        "metrics": scores,
                    }
                ],
            }
        ]
    return meta


def write_model_card(output_dir: str | Path, metrics: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write ``README.md`` in ``output_dir``: a Hugging Face model card for the trained model or adapter.

    ``metrics`` is the content of ``metrics.json``, ``config`` the flat resolved config (``cfg.to_dict()``).
    YAML front matter: ``base_model`` (when a hub id), ``library_name`` (``peft`` for LoRA, else
    ``transformers``), ``pipeline_tag``, ``tags``, ``datasets`` (hub data only), ``metrics`` and a
    ``model-index`` with the headline ROUGE scores (F1 × 100). Then: model description (base model, method),
    training data, hyperparameters, evaluation (every protocol present, split, generation settings),
    resources, intended use and limitations, the DialogSum licence note, and how to load it.
    """
    out = Path(output_dir)
    method = str(config.get("method") or metrics.get("method") or "full")
    base = str(metrics.get("model_name_or_path") or config.get("model_name_or_path") or "?")
    name = str(config.get("run_name") or out.resolve().name)
    meta = _model_card_metadata(metrics, config, name, base, method)
    prompt = str(config.get("prompt_template") or LAB_PROMPT)
    folder = out.resolve().name

    parts = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    parts += [f"# {name}", ""]
    kind = "a LoRA adapter for" if method == "lora" else "a fully fine-tuned version of"
    parts.append(
        f"This model is {kind} [`{base}`]({'https://huggingface.co/' + base if _is_hub_id(base) else base}), "
        f"trained to summarize dialogues with {_method_name(method)} on {_data_description(config)}. "
        "It was produced with the `dialogsum` toolkit (plain Accelerate training loop)."
    )
    parts.append("")

    parts += ["## Training", "", _table(["", "value"], _hyperparameter_rows(config, metrics)), ""]
    parts += ["Prompt used for training and evaluation (`{dialogue}` is replaced by the dialogue):", ""]
    parts += ["```text", prompt.rstrip("\n"), "```", ""]

    parts += ["## Evaluation", ""]
    header, rows = _rouge_rows(metrics)
    if rows:
        split = metrics.get("eval_split", config.get("eval_split", "test"))
        count = metrics.get("num_examples", metrics.get("num_eval_examples"))
        parts.append(
            f"ROUGE F1 × 100 (rouge_score, Porter stemmer, sentences split on newlines for ROUGE-Lsum) on "
            f"the {split} split: {_plain(count)} dialogues, "
            f"{_plain(metrics.get('num_references'))} references."
        )
        parts += ["", _table(header, rows), ""]
        headline = metrics.get("headline_protocol")
        for protocol in PROTOCOL_TEXT:
            if isinstance(metrics.get(protocol), Mapping):
                mark = " (headline, used in the metadata above)" if protocol == headline else ""
                parts.append(f"- **{protocol}**{mark}: {PROTOCOL_TEXT[protocol]}.")
        generation = _generation_text(metrics)
        if generation:
            parts.append(f"- Generation: {generation}.")
        parts.append("")
    else:
        parts += ["This run was not evaluated.", ""]

    resource_rows = _resources_rows(metrics, {})
    if resource_rows:
        parts += ["## Resources", "", _table(["", "value"], resource_rows), ""]

    parts += ["## Intended use and limitations", ""]
    if config.get("quickstart"):
        parts.append(
            "- **Demo model**: a tiny random T5 trained on synthetic template dialogues by `--quickstart` to "
            "check the pipeline end to end. It is not useful for summarizing real conversations."
        )
    parts += [
        "- Intended for research on abstractive summarization of short, English, everyday two-person "
        "dialogues like DialogSum's (meetings, shopping, travel, small talk).",
        "- Summaries can omit or invent facts, confuse who said what, and copy speaker tags; check them "
        "before relying on them. ROUGE measures word overlap with human summaries, not factual correctness.",
        "- Not evaluated on other domains, languages, long multi-party meetings or transcripts with ASR errors.",
        "- Inputs longer than the maximum source length above are truncated.",
        "",
        "## Licence",
        "",
        DIALOGSUM_LICENCE
        if not config.get("quickstart")
        else "The quick-start data is synthetic (no DialogSum text). " + DIALOGSUM_LICENCE.split(": ")[0] + ".",
        "",
        "## How to use",
        "",
    ]
    template = json.dumps(prompt)
    if method == "lora":
        parts += [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            "",
            f'adapter_dir = "path/to/{folder}"  # this folder, or its hub repo id',
            f'base = AutoModelForSeq2SeqLM.from_pretrained("{base}")',
            "model = PeftModel.from_pretrained(base, adapter_dir)  # .merge_and_unload() for a plain model",
            "tokenizer = AutoTokenizer.from_pretrained(adapter_dir)",
        ]
    else:
        parts += [
            "```python",
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            "",
            f'model_dir = "path/to/{folder}"  # this folder, or its hub repo id',
            "model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)",
            "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
        ]
    max_new = (
        metrics.get("generation", {}).get("max_new_tokens", 128)
        if isinstance(metrics.get("generation"), Mapping)
        else 128
    )
    parts += [
        "",
        f"prompt = {template}.format(dialogue=dialogue)",
        'inputs = tokenizer(prompt, return_tensors="pt", truncation=True, '
        f"max_length={_plain(config.get('max_source_length') or 512)})",
        f"summary_ids = model.generate(**inputs, max_new_tokens={max_new}, num_beams=1)",
        "print(tokenizer.decode(summary_ids[0], skip_special_tokens=True))",
        "```",
        "",
    ]
    card = out / "README.md"
    _atomic_write_text(card, "\n".join(parts))
    return card
