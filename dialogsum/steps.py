"""The steps of a training run that the recipes (``scripts/train_{full,lora,ia3}.py``) call in order.

Each step is one named function; the recipes show the order. Order matters for the user: every cheap check
(flags, output folder, data files, model path, trackers: :func:`check_run`) happens before anything expensive
(loading weights, tokenizing, training), and nothing already written in ``--output_dir`` is overwritten unless
asked for. The loop itself is :func:`dialogsum.training.train_loop`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dialogsum.adapters import check_adapter, check_topology
from dialogsum.checkpointing import check_compatible, checkpoint_root, read_state, resolve_resume
from dialogsum.config import Config, describe_method
from dialogsum.data import (
    LengthGroupedBatchSampler,
    PadWidths,
    Seq2SeqCollator,
    TokenBudget,
    TokenizedDataset,
    check_data_sources,
    check_prompt_fits,
    eval_examples,
    tokenize_rows,
)
from dialogsum.distributed import (
    agree_on_resume,
    check_shared_folder,
    compiles,
    is_zero3,
    optimizer_offload,
    peak_memory_mb,
    set_deepspeed_micro_batch,
)
from dialogsum.errors import UserError
from dialogsum.evaluation import evaluate_with_config, evaluation_loss
from dialogsum.files import write_json, write_jsonl
from dialogsum.memory import offload_warning
from dialogsum.modeling import (
    check_adapter_targets,
    check_model_source,
    describe_parameters,
    load_tokenizer,
    parameter_report,
)
from dialogsum.provenance import provenance, topology
from dialogsum.publish import HubTarget, check_push, push_folder
from dialogsum.quickstart import build_quickstart_assets
from dialogsum.results import stamp_predictions, weights_record
from dialogsum.run_folder import (
    check_checkpoint_dir,
    check_output_dir,
    copy_results_for_sagemaker,
    record_outputs,
    release_output_dirs,
    start_output_dir,
)
from dialogsum.tracking import resolve_trackers
from dialogsum.training import TrainResult, check_mixed_precision, check_optimizer

logger = logging.getLogger(__name__)

QUICKSTART_DIR = "quickstart_assets"
#: Where --merge_lora writes the merged model, inside the output folder.
MERGED_DIR = "merged"

# --------------------------------------------------------------------------------------------- before loading


@dataclass
class RunPlan:
    """What the cheap checks found: where the run writes, where it resumes from, what it reads and logs to."""

    out: Path
    """The output folder (created)."""
    resume: Path | None
    """The checkpoint to resume from, if any."""
    splits: list[str]
    """Data splits the run reads."""
    trackers: list[str] | None
    """Trackers for ``Accelerator(log_with=...)`` (None: none)."""
    hub: HubTarget | None = None
    """Where ``--push_to_hub`` uploads (checked), or None."""
    cpu_threads: int | None = None
    """Torch threads per CPU process, when the run fixes them (``build_accelerator(cpu_threads=...)``)."""

    @property
    def tensorboard_dir(self) -> str:
        """Where TensorBoard events go."""
        return str(self.out / "tensorboard")


def needed_splits(cfg: Config) -> list[str]:
    """Which data splits this run reads."""
    splits = []
    if cfg.train.do_train:
        splits.append("train")
    if cfg.train.do_train and cfg.train.eval_steps:
        splits.append("validation")
    if cfg.train.do_eval and cfg.train.eval_split not in splits:
        splits.append(cfg.train.eval_split)
    if not splits:
        raise UserError("nothing to do: both --do_train and --do_eval are false")
    return splits


def check_run(cfg: Config) -> RunPlan:
    """Every check that needs no model, data or process group: output folder (locked from here on: only the main
    process holds it), resume point, data, model, trackers."""
    t = cfg.train
    check_checkpoint_dir(cfg)  # --checkpoint_dir apart from --output_dir: not an input, writable, not another run's
    resume = resolve_resume(t.resume_from_checkpoint, checkpoint_root(cfg))
    out = check_output_dir(cfg)  # takes the folder's lock; a checkpoint elsewhere never allows a used folder
    try:
        splits = needed_splits(cfg)
        if not t.quickstart:
            check_data_sources(cfg.data, splits)
            check_model_source(cfg.model.model_name_or_path)
            check_adapter_targets(cfg.model.model_name_or_path, cfg)  # LoRA/IA3 targets, from the model config
            check_prompt_fits(load_tokenizer(cfg.model.tokenizer_name or cfg.model.model_name_or_path), cfg.data)
        check_adapter(cfg)  # what the installed peft offers
        trackers = resolve_trackers(cfg.track.report_to) or None
        hub = check_push(cfg.hub, out.resolve().name)  # --push_to_hub: token, hub reachable, write access
        start_output_dir(cfg)  # creates it; --overwrite_output_dir: what the previous run wrote goes now
    except BaseException:
        release_output_dirs()
        raise
    # --quickstart: a 64-wide model gains nothing from intra-op threads, and OpenMP threads spinning against other
    # work on a busy machine made it up to 20x slower: one thread per process
    threads = 1 if cfg.train.quickstart else None
    return RunPlan(out=out, resume=resume, splits=splits, trackers=trackers, hub=hub, cpu_threads=threads)


def with_quickstart_assets(cfg: Config, accelerator: Any) -> Config:
    """With ``--quickstart``, point the config at the generated tiny model and synthetic data (built once, by
    the main process); otherwise return ``cfg`` as it is."""
    if not cfg.train.quickstart:
        return cfg
    root = Path(cfg.train.output_dir or ".") / QUICKSTART_DIR
    with accelerator.main_process_first():
        model_dir, data_dir = build_quickstart_assets(root, seed=0)
    data = replace(
        cfg.data,
        dataset_name=None,
        train_file=str(data_dir / "train.jsonl"),
        validation_file=str(data_dir / "validation.jsonl"),
        test_file=str(data_dir / "test.jsonl"),
    )
    return replace(cfg, model=replace(cfg.model, model_name_or_path=str(model_dir)), data=data)


def check_and_seed(cfg: Config, run: RunPlan, accelerator: Any) -> None:
    """Refuse fp16 with T5, an adapter initialisation the DeepSpeed loading cannot give, a checkpoint folder not
    shared by every process and a checkpoint made with other settings (in seconds, before loading anything); every
    process takes the main process's resume point; then
    seed every RNG."""
    from accelerate.utils import set_seed

    check_mixed_precision(accelerator.mixed_precision, cfg.model.model_name_or_path)
    check_optimizer(accelerator, cfg.train.optim)  # Adafactor under optimizer offload would silently be Adam
    check_topology(cfg, accelerator)  # DoRA/PiSSA/OLoRA need whole weights when the adapter is created
    warn_offload_memory(cfg, accelerator)  # ZeRO-3 offload: model states larger than this host's memory
    if cfg.train.do_train:  # several machines: one checkpoint folder that all of them see, one resume step
        flag = "--checkpoint_dir" if cfg.train.checkpoint_dir else "--output_dir"
        check_shared_folder(accelerator, checkpoint_root(cfg), flag)
        run.resume = agree_on_resume(accelerator, run.resume)
    if run.resume is not None:
        check_compatible(read_state(run.resume), cfg, accelerator.num_processes, run.resume)
    set_seed(cfg.train.seed)


def warn_offload_memory(cfg: Config, accelerator: Any) -> None:
    """Under ZeRO-3 with offloaded optimizer states, warn (once per host, before the model loads) when those states
    alone exceed the host's available memory (:func:`dialogsum.memory.offload_warning`): the run would otherwise be
    killed in its first step with no word of why."""
    if not accelerator.is_local_main_process or not is_zero3(accelerator) or optimizer_offload(accelerator) is None:
        return
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    values = {
        "method": cfg.method,
        "precision": "bf16" if accelerator.mixed_precision == "bf16" else "fp32",
        "num_gpus": accelerator.num_processes,
        "num_nodes": max(1, accelerator.num_processes // max(1, per_host)),
        "lora_r": cfg.lora.lora_r,
        "lora_targets": tuple(cfg.lora.lora_target_modules),
    }
    message = offload_warning(cfg.model.model_name_or_path, values)
    if message:
        logger.warning(message)


# --------------------------------------------------------------------------------------------- building


def write_run_settings(accelerator: Any, cfg: Config, model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Log the parameter counts and write ``config.yaml`` and ``parameters.json``; return the counts."""
    params = parameter_report(model)
    logger.info(describe_parameters(params))
    if accelerator.is_main_process:
        cfg.save(out / "config.yaml")
        write_json(out / "parameters.json", params)
        record_outputs()  # from now on a kill leaves them listed as the run's
    return params


def pad_widths(cfg: Config, accelerator: Any) -> PadWidths:
    """Length buckets (``--length_buckets on``, or ``auto`` when the launcher config compiles the model) or
    dynamic padding to the longest example of each batch."""
    d = cfg.data
    bucketed = d.length_buckets == "on" or (d.length_buckets == "auto" and compiles(accelerator))
    if not bucketed:
        return PadWidths()
    widths = PadWidths.bucketed(d.max_source_length, d.max_target_length)
    logger.info(
        "length buckets: prompts padded to one of %s tokens, summaries to one of %s",
        ", ".join(map(str, widths.source_buckets)),
        ", ".join(map(str, widths.target_buckets)),
    )
    return widths


def build_dataloaders(
    cfg: Config, splits: dict[str, list[dict]], tokenizer: Any, accelerator: Any
) -> tuple[DataLoader, LengthGroupedBatchSampler, DataLoader | None]:
    """Training loader (length-grouped, seeded; ``--max_tokens_per_batch``: token-budget batches) and, with
    ``--eval_steps``, a validation-loss loader (sorted)."""
    widths = pad_widths(cfg, accelerator)
    collator = Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id, widths=widths)
    train_ds, stats = tokenize_rows(splits["train"], tokenizer, cfg.data)
    logger.info(stats.describe("train"))
    budget = None
    if cfg.data.max_tokens_per_batch is not None:
        sources, targets = [len(x) for x in train_ds.input_ids], [len(x) for x in train_ds.labels]
        budget = TokenBudget(cfg.data.max_tokens_per_batch, sources, targets, widths)
    sampler = LengthGroupedBatchSampler(
        train_ds.lengths(),
        cfg.train.per_device_train_batch_size,
        seed=cfg.train.seed,
        group_by_length=cfg.data.group_by_length,
        budget=budget,
    )
    train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collator)
    val_loader = None
    if "validation" in splits and cfg.train.eval_steps:
        val_ds, stats = tokenize_rows(splits["validation"], tokenizer, cfg.data)
        logger.info(stats.describe("validation"))
        order = sorted(range(len(val_ds)), key=lambda i: val_ds.lengths()[i], reverse=True)
        sorted_ds = TokenizedDataset([val_ds.input_ids[i] for i in order], [val_ds.labels[i] for i in order])
        val_loader = DataLoader(sorted_ds, batch_size=cfg.train.per_device_eval_batch_size, collate_fn=collator)
    return train_loader, sampler, val_loader


def build_validation(
    accelerator: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    val_loader: Any,
    splits: dict[str, list[dict]],
    cfg: Config,
) -> Callable[[int], dict[str, float]] | None:
    """The periodic evaluation for the loop (``evaluate(step) -> metrics``), or None without ``--eval_steps``."""
    if val_loader is None:
        return None
    examples = None
    if cfg.train.eval_with_generation:
        examples = eval_examples(splits["validation"], cfg.data, limit=cfg.data.max_eval_samples)
    return functools.partial(_validation_metrics, accelerator, model, tokenizer, val_loader, examples, cfg)


def _validation_metrics(
    accelerator: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    val_loader: Any,
    examples: list | None,
    cfg: Config,
    step: int,
) -> dict[str, float]:
    metrics = {"eval_loss": evaluation_loss(accelerator, model, val_loader)}
    if examples is not None:
        rouge, _ = evaluate_with_config(accelerator, model, tokenizer, examples, cfg, f"eval @ step {step}")
        metrics.update({f"eval_{k}": rouge[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")})
    return metrics


def prepare_for_evaluation(accelerator: Any, model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """``--do_train false``: prepare the starting model alone (DeepSpeed gets the eval batch size)."""
    set_deepspeed_micro_batch(accelerator, cfg.train.per_device_eval_batch_size)
    return accelerator.prepare(model)


# --------------------------------------------------------------------------------------------- after training


def evaluate_run(
    accelerator: Any, model: torch.nn.Module, tokenizer: Any, splits: dict[str, list[dict]], cfg: Config
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """With ``--do_eval``: generate on ``--eval_split`` and score; returns (scores, one prediction per dialogue)."""
    t = cfg.train
    if not t.do_eval:
        return {}, []
    limit = cfg.data.max_test_samples if t.eval_split == "test" else cfg.data.max_eval_samples
    examples = eval_examples(splits[t.eval_split], cfg.data, limit=limit)
    scores, predictions = evaluate_with_config(
        accelerator, model, tokenizer, examples, cfg, f"evaluating on {t.eval_split}"
    )
    return {**scores, "eval_split": t.eval_split}, predictions


def run_metrics(
    accelerator: Any,
    cfg: Config,
    params: dict[str, Any],
    scores: dict[str, Any],
    result: TrainResult | None,
    checkpoint_size_mb: float | None,
) -> dict[str, Any]:
    """What ``metrics.json`` holds: scores, training figures, parameters, resources and where it ran."""
    metrics: dict[str, Any] = {"method": cfg.method, "model_name_or_path": cfg.model.model_name_or_path}
    metrics["method_detail"] = describe_method(cfg.to_dict())  # e.g. LoRA r=32 alpha=32 q,v DoRA: the comparison's
    metrics.update(scores)
    if result is not None:
        metrics.update(result.metrics())
        if cfg.train.load_best_model_at_end and result.state.best_step is not None:
            metrics["final_model_step"] = result.state.best_step  # the saved and evaluated weights
        step = metrics.get("final_model_step", result.state.step)
        metrics["weights"] = weights_record(Path(cfg.train.output_dir or "."), step)  # what the results belong to
    else:
        source = cfg.model.adapter_path or cfg.model.model_name_or_path  # the starting weights, evaluated as they are
        metrics["weights"] = weights_record(source, None, source)
    metrics.update(params)
    topo = topology(accelerator)
    metrics.update(
        {
            "checkpoint_size_mb": checkpoint_size_mb,
            "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
            "learning_rate": cfg.learning_rate if cfg.train.do_train else None,
            "num_processes": topo["num_processes"],
            "distributed_type": topo["distributed_type"],
            "mixed_precision": topo["mixed_precision"],
        }
    )
    metrics.update(provenance(cfg))  # command line, git commit, package versions
    return metrics


def write_results(
    accelerator: Any, out: Path, cfg: Config, metrics: dict[str, Any], predictions: list[dict[str, Any]]
) -> None:
    """Main process: ``metrics.json``, ``predictions.jsonl``, the run report and the model card (and, on
    SageMaker, a copy of the result files in ``SM_OUTPUT_DATA_DIR``)."""
    if not accelerator.is_main_process:
        return
    from dialogsum.model_card import write_model_card
    from dialogsum.report import write_run_report

    write_json(out / "metrics.json", metrics)
    if predictions:
        write_jsonl(out / "predictions.jsonl", stamp_predictions(predictions, metrics.get("weights", {})))
    else:  # not evaluated (--do_eval false): an earlier run's predictions would pass for these weights'
        (out / "predictions.jsonl").unlink(missing_ok=True)
    write_model_card(out, metrics, cfg.to_dict())
    write_run_report(out)
    copy_results_for_sagemaker(out)
    record_outputs()  # the manifest lists the results and weights
    logger.info("results in %s: %s", out, _headline(metrics))


def merge_lora(accelerator: Any, cfg: Config, out: Path) -> Path | None:
    """``--merge_lora``: the main process writes ``<output_dir>/merged``, the saved adapter (LoRA, IA3) merged into
    its base model (a standalone transformers model, :func:`dialogsum.export.export_merged`)."""
    if not cfg.lora.merge_lora:
        return None
    merged = out / MERGED_DIR
    if accelerator.is_main_process:
        from dialogsum.export import export_merged

        export_merged(out, merged, cfg.model.model_name_or_path)
    accelerator.wait_for_everyone()
    return merged


def publish(accelerator: Any, cfg: Config, run: RunPlan) -> str | None:
    """``--push_to_hub``: the main process uploads the run's model or adapter, tokenizer, generation config, card,
    metrics, settings, report and plots (:func:`dialogsum.publish.files_to_publish`) to the checked repository."""
    if run.hub is None:
        return None
    url = None
    if accelerator.is_main_process:
        url = push_folder(run.out, run.hub, f"dialogsum: {cfg.method} fine-tune of {cfg.model.model_name_or_path}")
    accelerator.wait_for_everyone()
    return url


def _headline(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("rouge1", "rouge2", "rougeL", "rougeLsum") if k in metrics]
    parts = [f"{k}={100 * metrics[k]:.2f}" for k in keys]
    if "train_loss" in metrics:
        parts.append(f"train_loss={metrics['train_loss']:.4f}")
    return ", ".join(parts)
