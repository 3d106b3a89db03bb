"""Evaluation of a trained (or original) model and summarization of new dialogues.

Both reuse the training code path: the same prompt template, the same batched, length-sorted,
multi-process-safe generation (:func:`dialogsum.evaluation.generate_summaries`) and the same ROUGE
(:func:`dialogsum.evaluation.evaluate_examples`). A model is a hub id or a local directory, optionally with a
LoRA adapter on top, loaded for inference only (0 trainable parameters).

* :func:`run_evaluation` (``scripts/evaluate.py``): one unique dialogue per generation, scored against all its
  references; writes ``metrics.json`` and ``predictions.jsonl``. Given the original model it is the zero-shot
  baseline.
* :func:`run_summarize` (``scripts/summarize.py``): one dialogue from a text file or stdin, or many from a
  jsonl/json/csv/parquet file; writes JSON lines ``{"id", "summary"}``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dialogsum.config import (
    Config,
    DataArguments,
    GenerationArguments,
    ModelArguments,
    TrackingArguments,
    TrainingArguments,
    build_config,
    build_parser,
    command_line,
    given_flags,
)
from dialogsum.errors import ConfigError, UserError
from dialogsum.files import (
    check_regular_target,
    decode_utf8,
    describe_value,
    input_kind,
    json_object_or_none,
    jsonl_text,
    read_input,
    read_json_object,
    read_rows,
    read_text,
    table_format,
    write_json,
    write_jsonl,
    write_text,
)
from dialogsum.run_folder import check_can_create, check_not_an_input, input_paths, take_output_file

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Architecture fields that must agree between an adapter's base model and the model it is put on.
_ARCHITECTURE_KEYS = (
    "model_type",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "vocab_size",
)
#: The flags each script accepts, by config section (all of a section when None).
EVALUATE_FLAGS: dict[type, tuple[str, ...] | None] = {
    ModelArguments: ("model_name_or_path", "tokenizer_name", "adapter_path"),
    DataArguments: (
        "dataset_name",
        "dataset_config_name",
        "validation_file",
        "test_file",
        "text_column",
        "summary_column",
        "id_column",
        "prompt_template",
        "max_source_length",
        "max_eval_samples",
        "max_test_samples",
        "strict",
    ),
    TrainingArguments: ("output_dir", "overwrite_output_dir", "per_device_eval_batch_size", "eval_split"),
    GenerationArguments: None,
    TrackingArguments: ("report_to", "run_name", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags"),
}
#: evaluate.py logs to trackers only when asked (training scripts default to all).
EVALUATE_REPORT_TO = "none"
SUMMARIZE_FLAGS: dict[type, tuple[str, ...] | None] = {
    ModelArguments: ("model_name_or_path", "tokenizer_name", "adapter_path"),
    DataArguments: ("text_column", "id_column", "prompt_template", "max_source_length"),
    TrainingArguments: ("per_device_eval_batch_size",),
    GenerationArguments: None,
}


# --------------------------------------------------------------------------------------------- flags


def _adapter_base(adapter_path: str) -> str | None:
    return (json_object_or_none(Path(adapter_path) / "adapter_config.json") or {}).get("base_model_name_or_path")


def _adapter_method(adapter_path: str) -> str:
    """``lora`` or ``ia3``: the method of an adapter folder (its ``peft_type``)."""
    config = json_object_or_none(Path(adapter_path) / "adapter_config.json") or {}
    return str(config.get("peft_type") or "LORA").lower()


#: Settings that must match training for the model to see the inputs it learned from.
TRAINING_INPUT_KEYS = ("prompt_template", "max_source_length")


def _training_config(folder: str | None) -> dict[str, Any]:
    """The ``config.yaml`` a training run saved next to its model or adapter, if any."""
    if not folder or not (Path(folder) / "config.yaml").is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(read_text(Path(folder) / "config.yaml"))
    except (yaml.YAMLError, UserError, RecursionError):  # a hint only: unreadable means none
        return {}
    return data if isinstance(data, dict) else {}


def config_from_flags(values: dict[str, Any]) -> Config:
    """Validate the flags given on the command line into a :class:`Config` (the training validation rules apply).

    With ``--adapter_path`` and no ``--model_name_or_path``, the adapter's own base model is used. When the
    model or adapter folder holds the ``config.yaml`` of its training run, its prompt template and source
    length are used unless given explicitly, so evaluation sees the inputs the model was trained on.
    """
    values = dict(values)
    if values.get("adapter_path") and "model_name_or_path" not in values:
        base = _adapter_base(values["adapter_path"])
        if base:
            logger.info("using the adapter's base model %s", base)
            values["model_name_or_path"] = base
    trained = _training_config(values.get("adapter_path") or values.get("model_name_or_path"))
    for key in TRAINING_INPUT_KEYS:
        if key not in values and trained.get(key) is not None:
            values[key] = trained[key]
            logger.info("using the training run's --%s %r", key, trained[key])
    return build_config("full", values)


def parse_evaluate_args(argv: Sequence[str] | None, description: str = "") -> Config:
    """Flags of ``scripts/evaluate.py`` as a validated :class:`Config`."""
    parser = build_parser(description, EVALUATE_FLAGS, config_file=False)
    parser.set_defaults(report_to=EVALUATE_REPORT_TO)  # shown by --help
    values = given_flags(parser, argv)
    values.setdefault("report_to", EVALUATE_REPORT_TO)
    cfg = config_from_flags(values)
    if not cfg.train.output_dir or not str(cfg.train.output_dir).strip():
        raise ConfigError("--output_dir is required (where metrics.json and predictions.jsonl are written)")
    cfg.command = command_line(argv, "scripts/evaluate.py")
    return cfg


@dataclass
class SummarizeRequest:
    """What ``scripts/summarize.py`` was asked to do."""

    cfg: Config
    input_file: str | None
    """A .txt dialogue, or a .jsonl/.json/.csv/.parquet file of them; None or '-' reads one from stdin."""
    output_file: str | None
    """JSON lines output; None writes to stdout."""
    overwrite_output_file: bool = False
    """Whether an existing ``output_file`` may be replaced."""


def parse_summarize_args(argv: Sequence[str] | None, description: str = "") -> SummarizeRequest:
    """Flags of ``scripts/summarize.py``."""
    parser = build_parser(description, SUMMARIZE_FLAGS, config_file=False)
    io_group = parser.add_argument_group("input/output")
    io_group.add_argument(
        "--input_file",
        default=None,
        help="A dialogue as plain text (.txt or any other suffix), or a .jsonl/.json/.csv/.parquet"
        " file with one dialogue per row (--text_column). Omit or '-' to read stdin.",
    )
    io_group.add_argument(
        "--output_file",
        default=None,
        help="Where to write JSON lines {id, summary} (a regular file); '-' or omitted: standard output.",
    )
    io_group.add_argument(
        "--overwrite_output_file",
        action="store_true",
        help="Replace --output_file if it exists (never allowed when it is an input).",
    )
    values = given_flags(parser, argv)
    input_file, output_file = values.pop("input_file", None), values.pop("output_file", None)
    output_file = None if output_file == "-" else output_file  # '-': standard output
    overwrite = values.pop("overwrite_output_file", False)
    return SummarizeRequest(config_from_flags(values), input_file, output_file, overwrite)


# --------------------------------------------------------------------------------------------- checks


def _architecture(model_dir: Path) -> dict[str, Any] | None:
    config = json_object_or_none(model_dir / "config.json")
    if config is None:
        return None
    return {k: config.get(k) for k in _ARCHITECTURE_KEYS if k in config}


def check_model_and_adapter(model_name_or_path: str, adapter_path: str | None) -> None:
    """Cheap checks before loading weights: the model folder, the adapter folder and that they fit together.

    An adapter records the base model it was trained on; when that base is a local folder its architecture is
    compared with the model's, so a mismatch is one clear line instead of a state-dict error.
    """
    from dialogsum.modeling import check_model_source

    model_dir = Path(model_name_or_path)
    if (
        model_dir.is_dir()
        and (model_dir / "adapter_config.json").is_file()
        and not (model_dir / "config.json").exists()
    ):
        base = _adapter_base(model_name_or_path) or "its base model"
        raise UserError(
            f"{model_name_or_path} is a LoRA adapter, not a model: pass it as --adapter_path "
            f"(with --model_name_or_path {base})"
        )
    check_model_source(model_name_or_path)
    if not adapter_path:
        return
    from dialogsum.modeling import check_weight_files

    folder = Path(adapter_path)
    if not folder.is_dir():
        raise UserError(f"--adapter_path not found: {adapter_path}")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        hint = " (it holds a full model: pass it as --model_name_or_path)" if (folder / "config.json").exists() else ""
        raise UserError(f"{adapter_path} is not a LoRA adapter folder (no adapter_config.json){hint}")
    adapter = read_json_object(config_file, "adapter config")
    if adapter.get("peft_type", "LORA") not in ("LORA", "IA3"):
        raise UserError(f"{adapter_path} holds a {adapter.get('peft_type')} adapter; only LoRA and IA3 are supported")
    check_weight_files(folder)
    base = adapter.get("base_model_name_or_path")
    if not base or base == model_name_or_path:
        return
    expected, actual = _architecture(Path(base)), _architecture(model_dir)
    if expected is None or actual is None:
        logger.warning("adapter %s was trained on %s, applying it to %s", adapter_path, base, model_name_or_path)
        return
    different = [k for k in _ARCHITECTURE_KEYS if expected.get(k) != actual.get(k)]
    if different:
        detail = ", ".join(f"{k} {expected.get(k)} vs {actual.get(k)}" for k in different)
        raise UserError(
            f"adapter {adapter_path} was trained on {base}, which does not match --model_name_or_path "
            f"{model_name_or_path} ({detail})"
        )
    logger.info("adapter %s was trained on %s (same architecture as %s)", adapter_path, base, model_name_or_path)


# --------------------------------------------------------------------------------------------- model


def load_tokenizer_checked(cfg: Config) -> Any:
    """The tokenizer, and the check that ``--max_source_length`` leaves room for a dialogue (before weights)."""
    from dialogsum.data import check_prompt_fits
    from dialogsum.modeling import check_tokenizer_fits, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer_name or cfg.model.model_name_or_path)
    check_tokenizer_fits(tokenizer, cfg.model.model_name_or_path)
    check_prompt_fits(tokenizer, cfg.data)
    return tokenizer


def load_generation_model(cfg: Config, accelerator: Any) -> torch.nn.Module:
    """Model (+ adapter, frozen) for generation.

    Under DeepSpeed ZeRO-3 transformers would build the model sharded (``zero.Init``) but without its pretrained
    values; it is loaded whole (:func:`dialogsum.modeling.whole_model_loading`, as training does) and
    :func:`place_model` shards it.
    """
    from dialogsum.modeling import load_for_inference, whole_model_loading

    with whole_model_loading(getattr(accelerator.state, "deepspeed_plugin", None) is not None):
        return load_for_inference(cfg.model.model_name_or_path, cfg.model.adapter_path)


def place_model(accelerator: Any, model: torch.nn.Module, batch_size: int) -> torch.nn.Module:
    """Put an inference model where the launch wants it.

    DeepSpeed and FSDP shard the weights, so they go through ``prepare`` (DeepSpeed is told the per-process
    batch size, which it otherwise reads from a training dataloader). Otherwise every process keeps a full
    copy on its device: DDP refuses a module without trainable parameters, and generation needs no gradient
    synchronisation anyway (each process generates its own share of the batches).
    """
    from accelerate import DistributedType

    from dialogsum.distributed import set_deepspeed_micro_batch

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        set_deepspeed_micro_batch(accelerator, batch_size)
        return accelerator.prepare(model)
    return model.to(accelerator.device)


def _weights_size_mb(cfg: Config) -> float | None:
    """Size on disk of what was evaluated: the adapter if any, else a local model's weights."""
    from dialogsum.modeling import checkpoint_size_mb

    folder = Path(cfg.model.adapter_path or cfg.model.model_name_or_path)
    return checkpoint_size_mb(folder) if folder.is_dir() else None


# --------------------------------------------------------------------------------------------- evaluate


def run_evaluation(cfg: Config) -> dict[str, Any]:
    """:func:`evaluate_model`, holding the output folder's lock from its first check to its last file."""
    from dialogsum.run_folder import release_output_dirs

    try:
        return evaluate_model(cfg)
    finally:
        release_output_dirs()


def evaluate_model(cfg: Config) -> dict[str, Any]:
    """Evaluate ``cfg.model`` (+ adapter) on ``cfg.train.eval_split``; write metrics.json and predictions.jsonl.

    Every check that needs no weights (output folder, data files, model and adapter, trackers) runs first.
    Under ``accelerate launch`` with several processes the dialogues are split between them and each is
    generated and scored exactly once. With ``--report_to`` the evaluation is a tracked run of job type ``eval``
    (the zero-shot baseline next to the training runs: same project and group resolution). Returns the metrics.
    """
    from dialogsum.data import check_data_sources, eval_examples, load_splits
    from dialogsum.distributed import build_accelerator, finish, peak_memory_mb
    from dialogsum.evaluation import evaluate_with_config
    from dialogsum.modeling import describe_parameters, parameter_report
    from dialogsum.provenance import provenance, topology
    from dialogsum.results import stamp_predictions, weights_record
    from dialogsum.run_folder import check_output_dir, record_outputs, start_output_dir
    from dialogsum.tracking import finish_tracking, resolve_trackers, start_tracking

    split = cfg.train.eval_split
    out = check_output_dir(cfg, can_resume=False)  # locked from here on
    check_data_sources(cfg.data, [split])
    check_model_and_adapter(cfg.model.model_name_or_path, cfg.model.adapter_path)
    rows = load_splits(cfg.data, [split])[split]  # every row checked before the model loads
    limit = cfg.data.max_test_samples if split == "test" else cfg.data.max_eval_samples
    examples = eval_examples(rows, cfg.data, limit=limit)
    logger.info(
        "%s: %d rows, %d unique dialogues, %d references",
        split,
        len(rows),
        len(examples),
        sum(len(e.references) for e in examples),
    )
    tokenizer = load_tokenizer_checked(cfg)
    trackers = resolve_trackers(cfg.track.report_to) or None
    if trackers:
        start_output_dir(cfg)  # tracker files go into it: with --overwrite_output_dir, the previous run goes now
    accelerator = build_accelerator(log_with=trackers, project_dir=str(out / "tensorboard"))
    try:
        model = load_generation_model(cfg, accelerator)
        params = parameter_report(model)
        logger.info(describe_parameters(params))
        start_tracking(accelerator, cfg, {"parameters": params, "num_eval_examples": len(examples)}, job_type="eval")
        model = place_model(accelerator, model, cfg.train.per_device_eval_batch_size)
        start = time.perf_counter()
        metrics, predictions = evaluate_with_config(
            accelerator, model, tokenizer, examples, cfg, f"evaluating on {split}"
        )
        runtime = time.perf_counter() - start
        metrics.update(
            {
                "model_name_or_path": cfg.model.model_name_or_path,
                "adapter_path": cfg.model.adapter_path,
                "eval_split": split,
                "eval_runtime_s": round(runtime, 3),
                "eval_samples_per_s": round(len(examples) / max(runtime, 1e-9), 3),
                "checkpoint_size_mb": _weights_size_mb(cfg),
                "weights": weights_record(cfg.model.adapter_path or cfg.model.model_name_or_path, None),
                "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
                **params,
            }
        )
        if cfg.model.adapter_path:
            metrics["method"] = _adapter_method(cfg.model.adapter_path)
        topo = topology(accelerator)
        metrics.update({k: topo[k] for k in ("num_processes", "distributed_type", "mixed_precision")})
        metrics.update(provenance(cfg))  # command line, git commit, package versions
        if accelerator.is_main_process:
            start_output_dir(cfg)  # with --overwrite_output_dir, the previous results go only now
            # predictions first: metrics.json is the marker of a complete result folder.
            write_jsonl(out / "predictions.jsonl", stamp_predictions(predictions, metrics["weights"]))
            cfg.save(out / "config.yaml")
            write_json(out / "metrics.json", metrics)
            record_outputs()
            logger.info(
                "ROUGE (%s) on %d dialogues: %s; written to %s",
                metrics["headline_protocol"],
                len(examples),
                ", ".join(f"{k}={100 * metrics[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")),
                out,
            )
        finish_tracking(accelerator, metrics, predictions, params, out, log_model=False, step=0)
        return metrics
    finally:
        finish(accelerator)


# --------------------------------------------------------------------------------------------- summarize


def read_dialogues(input_file: str | None, data: DataArguments) -> list[tuple[str, str]]:
    """``(id, dialogue)`` pairs to summarize, from stdin, a text file, or a table of dialogues.

    A .jsonl/.json/.csv/.parquet file (the text ones also .gz) gives one dialogue per row (``data.text_column``;
    ids from ``data.id_column`` or the row number); any other file or pipe, or stdin, is one dialogue.
    """
    if input_file in (None, "-"):
        text = decode_utf8(sys.stdin.buffer.read(), "standard input")
        if not text.strip():
            raise UserError("no dialogue on standard input (pipe one in, or pass --input_file)")
        return [("stdin", text.strip())]
    path = Path(input_file)
    if input_kind(path, "--input_file") == "file" and not os.access(path, os.R_OK):
        raise UserError(f"--input_file is not readable (permission denied): {input_file}")
    if table_format(path) is None:
        text = decode_utf8(read_input(path, "--input_file"), str(path))
        if not text.strip():
            raise UserError(f"--input_file {input_file} is empty: no dialogue to summarize")
        return [(path.stem, text.strip())]
    rows = read_rows(path)
    if not rows:
        raise UserError(f"--input_file {input_file} has no rows")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if data.text_column not in columns:
        raise UserError(
            f"{input_file} has no column {data.text_column!r} (columns: {', '.join(columns)}); set --text_column"
        )
    dialogues: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, start=1):
        if data.text_column not in row:
            raise UserError(f"{input_file}: row {number} has no {data.text_column!r} key (other rows have it)")
        dialogue = row[data.text_column]
        if dialogue is not None and not isinstance(dialogue, str):
            raise UserError(
                f"{input_file}: row {number} has {describe_value(dialogue)} in {data.text_column!r}, expected text"
            )
        if not dialogue or not dialogue.strip():
            raise UserError(f"{input_file}: row {number} has an empty {data.text_column!r}")
        example_id = str(row[data.id_column]) if row.get(data.id_column) not in (None, "") else str(number - 1)
        if example_id in seen:
            raise UserError(f"{input_file}: row {number} repeats id {example_id!r} (column {data.id_column!r})")
        seen.add(example_id)
        dialogues.append((example_id, dialogue.strip()))
    return dialogues


def check_output_file(request: SummarizeRequest) -> None:
    """Refuse an ``--output_file`` that is an input, exists (without ``--overwrite_output_file``) or cannot be
    written; called before the model loads."""
    if not request.output_file:
        return
    target = Path(request.output_file)
    inputs = input_paths(request.cfg)
    if request.input_file not in (None, "-") and Path(request.input_file).exists():
        inputs.append(("--input_file", Path(request.input_file).resolve()))
    check_not_an_input(target, "--output_file", inputs)
    if target.is_dir():
        raise UserError(f"--output_file is a directory: {request.output_file}")
    check_regular_target(target, "--output_file")  # never a device, a FIFO or a link to one ('-': stdout)
    if target.exists() and not request.overwrite_output_file:
        raise UserError(f"--output_file {target} exists; pass --overwrite_output_file to replace it")
    check_can_create(target, "--output_file", kind="file")
    if not target.parent.is_dir():
        raise UserError(f"--output_file folder does not exist: {target.parent}")
    take_output_file(target)  # one run at a time writes this file
    if target.exists() and not request.overwrite_output_file:  # arrived while we were checking
        raise UserError(f"--output_file {target} exists; pass --overwrite_output_file to replace it")


def run_summarize(request: SummarizeRequest) -> list[dict[str, str]]:
    """:func:`summarize`, holding the lock of ``--output_file`` from its check to its writing."""
    from dialogsum.run_folder import release_output_dirs

    try:
        return summarize(request)
    finally:
        release_output_dirs()


def summarize(request: SummarizeRequest) -> list[dict[str, str]]:
    """Summarize the requested dialogues; write JSON lines ``{"id", "summary"}``; return the records."""
    cfg = request.cfg
    dialogues = read_dialogues(request.input_file, cfg.data)
    check_output_file(request)
    check_model_and_adapter(cfg.model.model_name_or_path, cfg.model.adapter_path)
    from dialogsum.distributed import build_accelerator, finish  # heavy imports after the input checks
    from dialogsum.evaluation import generate_summaries

    output = sys.stdout
    # Standard output carries only the JSON lines: libraries that print there while loading (DeepSpeed's
    # logger, imported by accelerate's unwrap_model, binds to stdout) are sent to stderr instead.
    with contextlib.redirect_stdout(sys.stderr):
        tokenizer = load_tokenizer_checked(cfg)
        accelerator = build_accelerator()
        try:
            model = place_model(
                accelerator, load_generation_model(cfg, accelerator), cfg.train.per_device_eval_batch_size
            )
            summaries = generate_summaries(
                accelerator,
                model,
                tokenizer,
                [d for _, d in dialogues],
                cfg.data.prompt_template,
                cfg.gen,
                cfg.train.per_device_eval_batch_size,
                cfg.data.max_source_length,
                desc="summarizing",
            )
            records = [{"id": i, "summary": s} for (i, _), s in zip(dialogues, summaries, strict=True)]
            if accelerator.is_main_process:
                if request.output_file:
                    write_text(Path(request.output_file), jsonl_text(records))
                    logger.info("wrote %d summaries to %s", len(records), request.output_file)
                else:
                    output.write(jsonl_text(records))
                    output.flush()
            return records
        finally:
            finish(accelerator)
