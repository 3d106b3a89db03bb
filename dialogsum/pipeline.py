"""A training run from config to result files, as named ``build_*`` steps. Used by both training scripts.

Order matters for the user: every cheap check (flags, output folder, data files, model path, trackers)
happens before anything expensive (loading weights, tokenizing, training), and nothing already written in
``--output_dir`` is overwritten unless asked for.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dialogsum.checkpointing import (
    TrainState,
    check_compatible,
    fingerprint,
    load_checkpoint,
    read_state,
    resolve_resume,
)
from dialogsum.config import Config
from dialogsum.data import (
    LengthGroupedBatchSampler,
    Seq2SeqCollator,
    TokenizedDataset,
    check_data_sources,
    eval_examples,
    load_splits,
    tokenize_rows,
)
from dialogsum.distributed import build_accelerator, finish, set_deepspeed_micro_batch, topology
from dialogsum.errors import UserError
from dialogsum.evaluation import evaluate_with_config, evaluation_loss
from dialogsum.modeling import (
    apply_lora,
    check_model_source,
    describe_parameters,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    parameter_report,
    save_model,
    whole_model_loading,
)
from dialogsum.quickstart import build_quickstart_assets
from dialogsum.run_folder import check_output_dir, copy_results_for_sagemaker
from dialogsum.tracking import finish_tracking, peak_memory_mb, resolve_trackers, start_tracking
from dialogsum.training import build_optimizer, build_scheduler, check_mixed_precision, plan_steps, train_loop

logger = logging.getLogger(__name__)

QUICKSTART_DIR = "quickstart_assets"


# --------------------------------------------------------------------------------------------- checks


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


def with_quickstart_assets(cfg: Config, accelerator: Any) -> Config:
    """Point the config at the generated tiny model and synthetic data (built once, by the main process)."""
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


# --------------------------------------------------------------------------------------------- builders


def build_model_and_tokenizer(cfg: Config, accelerator: Any) -> tuple[torch.nn.Module, Any]:
    """Tokenizer + model (+ LoRA, + gradient checkpointing) as the method asks."""
    tokenizer = load_tokenizer(cfg.model.tokenizer_name or cfg.model.model_name_or_path)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    with whole_model_loading(plugin is not None and not plugin.zero3_init_flag):
        model = load_model(cfg.model.model_name_or_path)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.model.gradient_checkpointing)
    return model, tokenizer


def build_dataloaders(
    cfg: Config, splits: dict[str, list[dict]], tokenizer: Any
) -> tuple[DataLoader | None, LengthGroupedBatchSampler | None, DataLoader | None]:
    """Training loader (length-grouped, seeded) and validation-loss loader (length-sorted)."""
    collator = Seq2SeqCollator(pad_token_id=tokenizer.pad_token_id)
    train_loader = sampler = val_loader = None
    if "train" in splits:
        train_ds, stats = tokenize_rows(splits["train"], tokenizer, cfg.data)
        logger.info(stats.describe("train"))
        sampler = LengthGroupedBatchSampler(
            train_ds.lengths(),
            cfg.train.per_device_train_batch_size,
            seed=cfg.train.seed,
            group_by_length=cfg.data.group_by_length,
        )
        train_loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collator)
    if "validation" in splits and cfg.train.eval_steps:
        val_ds, stats = tokenize_rows(splits["validation"], tokenizer, cfg.data)
        logger.info(stats.describe("validation"))
        order = sorted(range(len(val_ds)), key=lambda i: val_ds.lengths()[i], reverse=True)
        sorted_ds = TokenizedDataset([val_ds.input_ids[i] for i in order], [val_ds.labels[i] for i in order])
        val_loader = DataLoader(sorted_ds, batch_size=cfg.train.per_device_eval_batch_size, collate_fn=collator)
    return train_loader, sampler, val_loader


def log_batch_arithmetic(cfg: Config, num_processes: int, steps_per_epoch: int, total_steps: int) -> None:
    """Say once how big an optimizer step is and how many there will be."""
    t = cfg.train
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * num_processes
    logger.info(
        "effective batch: %d per device x %d accumulation x %d process(es) = %d examples per optimizer "
        "step; %d optimizer steps per epoch, %d in total; learning rate %.2e",
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        num_processes,
        global_batch,
        steps_per_epoch,
        total_steps,
        cfg.learning_rate,
    )


# --------------------------------------------------------------------------------------------- outputs


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write JSON lines atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- the run


def run_training(cfg: Config) -> dict[str, Any]:
    """Train (full or LoRA), save, evaluate and report. Returns the metrics written to ``metrics.json``."""
    t = cfg.train
    resume = resolve_resume(t.resume_from_checkpoint, t.output_dir or "")
    # "latest" may write into its folder even before a first checkpoint exists (a restart killed before it)
    out = check_output_dir(cfg, resuming=resume is not None or t.resume_from_checkpoint == "latest")
    splits_needed = needed_splits(cfg)
    if not t.quickstart:
        check_data_sources(cfg.data, splits_needed)
        check_model_source(cfg.model.model_name_or_path)
    trackers = resolve_trackers(cfg.track.report_to)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = build_accelerator(
        t.gradient_accumulation_steps, log_with=trackers or None, project_dir=str(out / "tensorboard")
    )
    try:
        return _run(cfg, accelerator, out, resume, splits_needed)
    finally:
        finish(accelerator)


def _run(cfg: Config, accelerator: Any, out: Path, resume: Path | None, splits_needed: list[str]) -> dict[str, Any]:
    from accelerate.utils import set_seed

    t = cfg.train
    check_mixed_precision(accelerator.mixed_precision, cfg.model.model_name_or_path)
    if t.quickstart:
        cfg = with_quickstart_assets(cfg, accelerator)
        if accelerator.device.type == "cpu":
            # a 64-wide model gains nothing from intra-op threads, and OpenMP threads spinning against other
            # work on a busy machine made it up to 20x slower: one thread per process
            torch.set_num_threads(1)
    if resume is not None:  # before any loading: a mismatched checkpoint is refused in seconds
        check_compatible(read_state(resume), cfg, accelerator.num_processes, resume)
    set_seed(t.seed)
    splits = load_splits(cfg.data, splits_needed)
    model, tokenizer = build_model_and_tokenizer(cfg, accelerator)
    params = parameter_report(model)
    logger.info(describe_parameters(params))
    if accelerator.is_main_process:
        cfg.save(out / "config.yaml")
        write_json(out / "parameters.json", params)
    train_loader, sampler, val_loader = build_dataloaders(cfg, splits, tokenizer)

    result = None
    state = TrainState(num_processes=accelerator.num_processes, fingerprint=fingerprint(cfg))
    if t.do_train:
        optimizer = build_optimizer(model, cfg)
        set_deepspeed_micro_batch(accelerator, t.per_device_train_batch_size)  # batch-sampler loaders hide it
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        if val_loader is not None:
            val_loader = accelerator.prepare(val_loader)
        steps_per_epoch, total_steps = plan_steps(cfg, len(train_loader))
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        accelerator.register_for_checkpointing(scheduler)
        log_batch_arithmetic(cfg, accelerator.num_processes, steps_per_epoch, total_steps)
        if resume is not None:
            state = load_checkpoint(accelerator, resume)
            logger.info("resumed from %s at step %d (epoch %d)", resume, state.step, state.epoch)
        start_tracking(accelerator, cfg, {"parameters": params, "total_optimizer_steps": total_steps})

        def periodic_eval(step: int) -> dict[str, float]:
            metrics = {"eval_loss": evaluation_loss(accelerator, model, val_loader)}
            if t.eval_with_generation:
                examples = eval_examples(splits["validation"], cfg.data, limit=cfg.data.max_eval_samples)
                rouge, _ = evaluate_with_config(accelerator, model, tokenizer, examples, cfg, f"eval @ step {step}")
                metrics.update({f"eval_{k}": rouge[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")})
            return metrics

        result = train_loop(
            accelerator,
            model,
            optimizer,
            scheduler,
            train_loader,
            sampler,
            cfg,
            total_steps,
            state,
            evaluate=periodic_eval if val_loader is not None else None,
            resume_from=resume,
            memory_mb=lambda: peak_memory_mb(accelerator.device),
        )
        size_mb = save_model(accelerator, model, tokenizer, out)
    else:
        start_tracking(accelerator, cfg, {"parameters": params})
        set_deepspeed_micro_batch(accelerator, t.per_device_eval_batch_size)
        model = accelerator.prepare(model)
        size_mb = None

    metrics: dict[str, Any] = {"method": cfg.method, "model_name_or_path": cfg.model.model_name_or_path}
    predictions: list[dict[str, Any]] = []
    if t.do_eval:
        limit = cfg.data.max_test_samples if t.eval_split == "test" else cfg.data.max_eval_samples
        examples = eval_examples(splits[t.eval_split], cfg.data, limit=limit)
        rouge, predictions = evaluate_with_config(
            accelerator, model, tokenizer, examples, cfg, f"evaluating on {t.eval_split}"
        )
        metrics.update(rouge)
        metrics["eval_split"] = t.eval_split
    if result is not None:
        metrics.update(
            {
                "train_loss": result.train_loss,
                "train_runtime_s": round(result.runtime_s, 3),
                "train_samples_per_s": round(result.samples / max(result.runtime_s, 1e-9), 3),
                "train_tokens_per_s": round(result.real_tokens / max(result.runtime_s, 1e-9), 2),
                "train_steps": result.state.step,
                "stopped_early": result.stopped_early,
                "best_metric": result.state.best_metric,
                "best_step": result.state.best_step,
            }
        )
    metrics.update(params)
    metrics.update(
        {
            "checkpoint_size_mb": size_mb,
            "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
            "learning_rate": cfg.learning_rate if t.do_train else None,
        }
    )
    topo = topology(accelerator)
    metrics.update(
        {
            "num_processes": topo["num_processes"],
            "distributed_type": topo["distributed_type"],
            "mixed_precision": topo["mixed_precision"],
        }
    )
    if accelerator.is_main_process:
        write_json(out / "metrics.json", metrics)
        if predictions:
            write_jsonl(out / "predictions.jsonl", predictions)
        _write_reports(out, metrics, cfg)
        copy_results_for_sagemaker(out)
        logger.info("results in %s: %s", out, _headline(metrics))
    finish_tracking(
        accelerator,
        metrics,
        predictions,
        params,
        str(out),
        cfg.track.log_model,
        step=state.step if result is not None else None,
    )
    return metrics


def _write_reports(out: Path, metrics: dict[str, Any], cfg: Config) -> None:
    from dialogsum.model_card import write_model_card
    from dialogsum.report import write_run_report

    write_model_card(out, metrics, cfg.to_dict())
    write_run_report(out)


def _headline(metrics: dict[str, Any]) -> str:
    keys = [k for k in ("rouge1", "rouge2", "rougeL", "rougeLsum") if k in metrics]
    parts = [f"{k}={100 * metrics[k]:.2f}" for k in keys]
    if "train_loss" in metrics:
        parts.append(f"train_loss={metrics['train_loss']:.4f}")
    return ", ".join(parts)
