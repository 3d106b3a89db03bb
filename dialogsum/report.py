"""The run report: ``report.md`` with its PNG plots, from the files a run leaves in its output folder.

:func:`write_run_report` reads ``metrics.json``, ``log_history.jsonl``, ``config.yaml``, ``parameters.json`` and
``predictions.jsonl`` (every one optional) and writes ``report.md`` with its plots in ``plots/``, all in one
atomic step (:func:`dialogsum.files.write_files`). The tables that describe a run (ROUGE per protocol,
resources, hyperparameters) are also the model card's (:mod:`dialogsum.model_card`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dialogsum.config import DEFAULT_LEARNING_RATE, describe_method
from dialogsum.errors import UserError
from dialogsum.files import parse_jsonl, read_text, write_files
from dialogsum.formatting import (
    MISSING,
    cell,
    count,
    duration,
    is_number,
    markdown_table,
    megabytes,
    plain,
    points,
    rate,
)
from dialogsum.metrics import PROTOCOLS, ROUGE_KEYS, ROUGE_LABELS
from dialogsum.plots import plot_eval_curves, plot_resources, plot_rouge, plot_throughput, plot_training_curves
from dialogsum.results import describe as describe_weights

logger = logging.getLogger(__name__)

#: What each ROUGE protocol of ``metrics.json`` means (see :mod:`dialogsum.metrics`).
PROTOCOL_TEXT = {
    "multi_reference": "each summary scored against all human references of its dialogue, best match per "
    "metric (rouge_score's score_multi convention)",
    "mean_over_references": "per dialogue, the mean score over its references, then the mean over dialogues",
    "flat": "one score per (summary, reference) pair, averaged over pairs (the hub's flattened test split "
    "scored row by row, as most public notebooks do)",
}
#: Sample predictions shown in the run report.
REPORT_SAMPLE_ROWS = 3

# ------------------------------------------------------------------------------------------ reading


def _read_mapping(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    """A JSON/YAML object file parsed by ``parse``, or {} when it is missing or unreadable (a report never fails
    on one file)."""
    if not path.is_file():
        return {}
    try:
        data = parse(read_text(path))
    except (UserError, ValueError, RecursionError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, or [] when it is missing or unreadable."""
    if not path.is_file():
        return []
    try:
        return parse_jsonl(read_text(path), str(path))
    except UserError as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return []


# ------------------------------------------------------------------------------ tables describing a run


def data_description(config: Mapping[str, Any]) -> str:
    """The training data in words: the quick-start set, local file names or the hub dataset id."""
    if config.get("quickstart"):
        return "the synthetic quick-start dataset (template dialogues, no DialogSum text)"
    files = [f"`{Path(str(config[k])).name}`" for k in ("train_file", "validation_file", "test_file") if config.get(k)]
    if files:
        return "local files " + ", ".join(files)
    if config.get("dataset_name"):
        return f"`{config['dataset_name']}`"
    return "unknown data"


def method_name(method: Any) -> str:
    """``full fine-tuning``, ``LoRA`` or ``(IA)^3``."""
    return {"full": "full fine-tuning", "lora": "LoRA", "ia3": "(IA)^3"}.get(
        str(method), str(method or "unknown method")
    )


def generation_text(metrics: Mapping[str, Any]) -> str:
    """The generation settings of the evaluation, e.g. ``max_new_tokens=128, num_beams=1`` ('' when unknown)."""
    generation = metrics.get("generation")
    if not isinstance(generation, Mapping) or not generation:
        return ""
    return ", ".join(f"{k}={v}" for k, v in generation.items())


def rouge_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ROUGE table: one row per protocol present (headline first), else the top-level
    scores; no rows when the run has no ROUGE score."""
    headline = metrics.get("headline_protocol")
    protocols = [p for p in PROTOCOLS if isinstance(metrics.get(p), Mapping)]
    protocols.sort(key=lambda p: p != headline)
    header = ["protocol", *(ROUGE_LABELS[k] for k in ROUGE_KEYS)]
    if not protocols:
        if not any(is_number(metrics.get(k)) for k in ROUGE_KEYS):
            return header, []
        return header, [[MISSING, *(points(metrics.get(k)) for k in ROUGE_KEYS)]]
    rows = []
    for protocol in protocols:
        label = f"**{protocol}** (headline)" if protocol == headline else protocol
        rows.append([label, *(points(metrics[protocol].get(k)) for k in ROUGE_KEYS)])
    return header, rows


def resource_rows(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the resources table: parameters, checkpoint size, peak memory, time, throughput, processes."""
    merged = {**params, **{k: v for k, v in metrics.items() if v is not None}}
    percent = merged.get("trainable_percent")
    trainable = count(merged.get("trainable_params"))
    if is_number(percent):
        trainable += f" ({percent:.2f}% of {count(merged.get('total_params'))})"
    tokens = merged.get("train_tokens_per_s")
    samples = merged.get("train_samples_per_s")
    rows = [
        ["trainable parameters", trainable],
        ["checkpoint size", megabytes(merged.get("checkpoint_size_mb"))],
        ["peak memory", megabytes(merged.get("peak_memory_mb"))],
        ["training time", duration(merged.get("train_runtime_s"))],
        ["throughput", f"{rate(tokens)} real tokens/s" if is_number(tokens) else MISSING],
        ["samples / s", f"{samples:,.2f}" if is_number(samples) else MISSING],
    ]
    if merged.get("num_processes") is not None:
        rows.append(
            [
                "processes",
                f"{plain(merged.get('num_processes'))} ({plain(merged.get('distributed_type'))}, "
                f"precision {plain(merged.get('mixed_precision'))})",
            ]
        )
    return [row for row in rows if row[1] != MISSING]


def _learning_rate(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> Any:
    """The learning rate in force: recorded by the run, else given, else the method's default."""
    for value in (metrics.get("learning_rate"), config.get("learning_rate")):
        if is_number(value):
            return value
    return DEFAULT_LEARNING_RATE.get(str(config.get("method") or metrics.get("method")))


def hyperparameter_rows(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the hyperparameter table: method, model, data, schedule, steps, batch arithmetic, LoRA, seed."""
    method = config.get("method") or metrics.get("method")
    processes = metrics.get("num_processes") if is_number(metrics.get("num_processes")) else 1
    warmup = config.get("num_warmup_steps")
    warmup = f"{warmup} steps" if warmup is not None else f"ratio {plain(config.get('warmup_ratio'))}"
    rows = [
        ["method", method_name(method)],
        ["base model", f"`{config.get('model_name_or_path') or metrics.get('model_name_or_path', '?')}`"],
        ["data", data_description(config)],
        ["learning rate", plain(_learning_rate(config, metrics))],
        ["schedule", f"{plain(config.get('lr_scheduler_type'))}, warm-up {warmup}"],
    ]
    if config.get("max_train_steps"):
        rows.append(["optimizer steps", plain(config["max_train_steps"])])
    else:
        rows.append(["epochs", plain(config.get("num_train_epochs"))])
    if is_number(metrics.get("train_steps")):
        rows.append(["steps run", plain(metrics["train_steps"])])
    batch, accumulation = config.get("per_device_train_batch_size"), config.get("gradient_accumulation_steps")
    if is_number(batch) and is_number(accumulation):
        rows.append(
            [
                "batch",
                f"{batch} per device × {accumulation} accumulation × {processes} process(es) = "
                f"{batch * accumulation * processes} per optimizer step",
            ]
        )
    rows.append(
        ["weight decay / grad clip", f"{plain(config.get('weight_decay'))} / {plain(config.get('max_grad_norm'))}"]
    )
    rows.append(
        [
            "max source / target tokens",
            f"{plain(config.get('max_source_length'))} / {plain(config.get('max_target_length'))}",
        ]
    )
    if str(method) == "lora":
        rows.append(
            [
                "LoRA",
                f"r={plain(config.get('lora_r'))}, alpha={plain(config.get('lora_alpha'))}, "
                f"dropout={plain(config.get('lora_dropout'))}, targets={plain(config.get('lora_target_modules'))}",
            ]
        )
        rows.append(["adapter", describe_method(dict(config))])  # DoRA, rsLoRA, initialisation, LoRA+
    if str(method) == "ia3":
        rows.append(["adapter", describe_method(dict(config))])
    rows.append(["seed", plain(config.get("seed"))])
    return [row for row in rows if row[1] not in (MISSING, f"{MISSING}, warm-up ratio {MISSING}")]


def _rouge_systems(name: str, metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Bars of the run's ROUGE chart: one group per protocol when they differ, else the headline only."""
    protocols = {p: metrics[p] for p in PROTOCOLS if isinstance(metrics.get(p), Mapping)}
    distinct = {tuple(round(float(v.get(k, 0.0)), 6) for k in ROUGE_KEYS) for v in protocols.values()}
    return protocols if len(distinct) > 1 else {name: metrics}


# ------------------------------------------------------------------------------------------ the report


def write_run_report(output_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots (``plots/*.png``) for the run in ``output_dir``; returns its path.

    Sections: results (ROUGE per evaluation protocol + bar chart), training curves (loss, learning rate,
    gradient norm), evaluation during training (loss / ROUGE over steps), throughput and memory over steps,
    resources (parameters, checkpoint size, peak memory, time, tokens/s + chart), hyperparameters, sample
    predictions and the files of the run. Images are linked by relative path.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"no run folder at {out}")
    metrics = _read_mapping(out / "metrics.json", json.loads)
    params = _read_mapping(out / "parameters.json", json.loads)
    config = _read_mapping(out / "config.yaml", yaml.safe_load)
    history = _read_jsonl(out / "log_history.jsonl")
    predictions = _read_jsonl(out / "predictions.jsonl")
    name = config.get("run_name") or out.resolve().name
    method = config.get("method") or metrics.get("method")
    model = config.get("model_name_or_path") or metrics.get("model_name_or_path") or "?"
    files: dict[str, bytes] = {}

    def plot(file_name: str, image: bytes | None, alt: str) -> list[str]:
        """Keep ``image`` as ``plots/<file_name>`` and return its Markdown line (nothing when None)."""
        if image is None:
            return []
        files[f"plots/{file_name}"] = image
        return [f"![{alt}](plots/{file_name})"]

    opening = {"full": "Full fine-tuning", "lora": "LoRA fine-tuning", "ia3": "(IA)^3 fine-tuning"}.get(
        str(method), f"Training ({method})"
    )
    parts = [f"# Run report: {name}", "", f"{opening} of `{model}` on {data_description(config)}."]
    if metrics.get("headline_protocol"):
        split = metrics.get("eval_split", config.get("eval_split", "test"))
        examples = metrics.get("num_examples", metrics.get("num_eval_examples"))
        parts.append(
            f"Scores are ROUGE F1 × 100 on the {split} split ({plain(examples)} dialogues, "
            f"{plain(metrics.get('num_references'))} references); headline protocol: "
            f"**{metrics['headline_protocol']}**."
        )
    if isinstance(metrics.get("weights"), dict):
        parts.append(f"Results of the weights at {describe_weights(metrics['weights'])}.")
    parts += ["", "## Results", ""]
    header, rows = rouge_rows(metrics)
    if rows:
        parts += [markdown_table(header, rows), ""]
        parts += [f"- *{p}*: {PROTOCOL_TEXT[p]}." for p in PROTOCOLS if isinstance(metrics.get(p), Mapping)]
        if generation_text(metrics):
            parts.append(f"- generation: {generation_text(metrics)}.")
        image = plot_rouge(_rouge_systems(name, metrics))
        parts += ["", *plot("rouge.png", image, "ROUGE scores")]
    else:
        parts.append("No evaluation results in this run (no `metrics.json` ROUGE scores).")
    parts += ["", "## Training", ""]
    train_rows = [row for row in history if "loss" in row]
    training_plot = plot(
        "training.png", plot_training_curves(history), "Training loss, learning rate and gradient norm"
    )
    if training_plot:
        first, last = train_rows[0], train_rows[-1]
        mean = metrics.get("train_loss")
        parts.append(
            f"Training loss went from {first['loss']:.4f} (step {first.get('step')}) to {last['loss']:.4f} "
            f"(step {last.get('step')}) over {len(train_rows)} logged points"
            + (f"; mean training loss {mean:.4f}." if is_number(mean) else ".")
        )
        parts += ["", *training_plot]
    else:
        parts.append("No training steps were logged (`log_history.jsonl` has no training loss).")
    parts.append("")
    eval_plot = plot("eval.png", plot_eval_curves(history), "Validation curves")
    if eval_plot:
        eval_rows = [row for row in history if any(k.startswith("eval_") for k in row)]
        keys = [k for k in ("eval_loss", *(f"eval_{r}" for r in ROUGE_KEYS)) if any(k in row for row in eval_rows)]
        table_rows = [
            [plain(row.get("step"))]
            + [f"{row[k]:.4f}" if k == "eval_loss" and is_number(row.get(k)) else points(row.get(k)) for k in keys]
            for row in eval_rows
        ]
        labels = ["validation loss" if k == "eval_loss" else ROUGE_LABELS[k[5:]] for k in keys]
        parts += ["## Evaluation during training", "", markdown_table(["step", *labels], table_rows), ""]
        parts += [*eval_plot, ""]
    throughput_plot = plot("throughput.png", plot_throughput(history), "Tokens per second and peak memory")
    if throughput_plot:
        parts += ["## Throughput and memory", "", *throughput_plot, ""]
    parts += ["## Resources", ""]
    resources = resource_rows(metrics, params)
    if resources:
        parts += [markdown_table(["", "value"], resources), ""]
    resources_plot = plot("resources.png", plot_resources({name: {**params, **metrics}}), "Resources")
    if resources_plot:
        parts += [*resources_plot, ""]
    if not resources:
        parts += ["No resource figures recorded.", ""]
    if config or metrics:
        parts += ["## Hyperparameters", "", markdown_table(["", "value"], hyperparameter_rows(config, metrics)), ""]
        if config:
            parts += ["The full resolved configuration is in [`config.yaml`](config.yaml).", ""]
    if predictions:
        parts += ["## Sample predictions", ""]
        for row in predictions[:REPORT_SAMPLE_ROWS]:
            parts += [f"**{row.get('id', '?')}**", "", "```text", str(row.get("dialogue", "")).strip(), "```", ""]
            parts += [
                f"- reference: {cell(row.get('reference', ''))}",
                f"- prediction: {cell(row.get('prediction', ''))}",
            ]
            parts.append("")
    links = [
        f"[`{p.name}`]({p.name})"
        for p in sorted(out.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != "report.md"
    ]
    if links:
        parts += ["## Files", "", ", ".join(links), ""]
    files["report.md"] = "\n".join(parts).encode("utf-8")
    write_files(files, out)
    return out / "report.md"
