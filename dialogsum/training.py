"""The training loop, shared by full fine-tuning and LoRA. Reads top to bottom.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every process:
8 per device x 4 accumulation x 2 processes = 64 examples per optimizer step. The learning-rate schedule is
built in optimizer steps and stepped here exactly once per optimizer step (it is deliberately not passed to
``accelerator.prepare``, whose wrapper would step it once per process).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dialogsum.checkpointing import (
    TrainState,
    find_latest,
    load_process_state,
    load_rng,
    prune_checkpoints,
    remove_leftovers,
    save_checkpoint,
)
from dialogsum.config import Config
from dialogsum.data import LengthGroupedBatchSampler
from dialogsum.errors import UserError

logger = logging.getLogger(__name__)

NO_DECAY = ("bias", "layer_norm", "layernorm", "ln_")


def check_mixed_precision(mixed_precision: str, model_name_or_path: str) -> None:
    """Refuse fp16 for T5-family models: their activations overflow fp16's range (loss becomes NaN).

    ``mixed_precision`` comes from the accelerate launcher (``accelerator.mixed_precision``). The model type is
    read from a local ``config.json`` when there is one, otherwise taken from the hub id (``google/flan-t5-base``).
    """
    if mixed_precision != "fp16":
        return
    config = Path(model_name_or_path) / "config.json"
    if config.is_file():
        try:
            model_type = str(json.loads(config.read_text()).get("model_type", "t5"))
        except (OSError, json.JSONDecodeError):
            model_type = "t5"
    else:
        model_type = model_name_or_path
    if "t5" in model_type.lower():
        raise UserError(
            "mixed precision fp16 is not supported for T5 models (their activations overflow in fp16 and the "
            "loss becomes NaN); use bf16 (accelerate launch --mixed_precision bf16, or mixed_precision: bf16 "
            "in the accelerate config) or no mixed precision"
        )


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters")
    # CPU: the fused kernel updates each tensor in one pass; foreach falls back to full-size temporaries there
    # (flan-t5-base on 2 cores: fused ~0.2 s per step, foreach ~10x slower). GPU: foreach, one launch per group.
    implementation = {"fused": True} if not torch.cuda.is_available() else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, **implementation)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> Any:
    """LR schedule in optimizer steps, with linear warm-up."""
    from transformers import get_scheduler

    warmup = cfg.train.num_warmup_steps
    if warmup is None:
        warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    return get_scheduler(
        cfg.train.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


def plan_steps(cfg: Config, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) from the prepared dataloader's length."""
    per_epoch = max(math.ceil(batches_per_epoch / cfg.train.gradient_accumulation_steps), 1)
    if cfg.train.max_train_steps:
        return per_epoch, cfg.train.max_train_steps
    return per_epoch, max(int(math.ceil(cfg.train.num_train_epochs * per_epoch)), 1)


@dataclass
class TrainResult:
    """What the loop reports back."""

    state: TrainState
    train_loss: float
    runtime_s: float
    samples: int
    real_tokens: int
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "eval_loss" else value > best


class HistoryWriter:
    """Appends log events to ``log_history.jsonl`` (main process) and keeps them in memory."""

    def __init__(self, path: Path | None, keep_from_step: int = 0) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        if path is not None and path.exists() and keep_from_step:
            # resuming: keep what was logged up to the checkpoint, drop what came after it
            kept = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            self.events = [e for e in kept if e.get("step", 0) <= keep_from_step]
            path.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        elif path is not None:
            path.write_text("")

    def write(self, event: dict[str, Any]) -> None:
        """Record one event."""
        self.events.append(event)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(event) + "\n")


def train_loop(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    train_loader: Any,
    sampler: LengthGroupedBatchSampler,
    cfg: Config,
    total_steps: int,
    state: TrainState,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    resume_from: Path | None = None,
    memory_mb: Callable[[], float] | None = None,
) -> TrainResult:
    """Run optimizer steps until ``total_steps`` (or early stopping); return loss, timing and counters.

    ``state`` holds the counters to start from (zero, or those of the checkpoint being resumed);
    ``resume_from`` is that checkpoint, whose RNG states are put back at the point where they were saved.
    ``evaluate(step)`` returns eval metrics (``eval_loss`` and optionally ROUGE) for periodic evaluation.
    """
    t = cfg.train
    world = accelerator.num_processes
    main = accelerator.is_main_process
    if main:
        remove_leftovers(t.output_dir)
    history = HistoryWriter(Path(t.output_dir) / "log_history.jsonl" if main else None, keep_from_step=state.step)
    params = [p for p in model.parameters() if p.requires_grad]
    checkpoint_every = int(t.checkpointing_steps) if t.checkpointing_steps and t.checkpointing_steps != "epoch" else 0
    batches_per_epoch = math.ceil(len(sampler.lengths) / sampler.batch_size)  # all processes together
    if state.batches_in_epoch >= batches_per_epoch:
        # saved on the last batch of an epoch: the uninterrupted run goes straight on to the next epoch
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress = tqdm(
        total=total_steps, initial=state.step, desc="training", disable=not accelerator.is_local_main_process
    )

    # Running sums live on the device: no host sync until a log line is due. A resumed run starts from the
    # sums saved in its checkpoint (each process its own loss sums; token and sample counts, already summed
    # over processes, on the main one), so its log lines and train_loss are those of the uninterrupted run.
    own = load_process_state(resume_from, accelerator.process_index) if resume_from is not None else {}
    loss_sum = torch.tensor(own.get("window_loss", 0.0), device=accelerator.device, dtype=torch.float32)
    loss_count = state.window_micro_batches
    window_tokens = torch.tensor(state.window_tokens if main else 0, device=accelerator.device, dtype=torch.long)
    window_samples = state.window_samples if main else 0
    total_loss = torch.tensor(own.get("total_loss", 0.0), device=accelerator.device, dtype=torch.float64)
    total_micro = state.total_micro_batches
    total_tokens, total_samples = state.total_tokens, state.total_samples
    grad_norm: Any = None
    last_saved = -1
    window_start = start = time.perf_counter()
    elapsed_before = state.elapsed_s
    stopped_early = False
    model.train()

    def diverged(where: str) -> UserError:
        progress.close()  # end the progress bar's line: the error must be a line of its own
        latest = find_latest(t.output_dir)
        kept = (
            f"the last good checkpoint {latest} is intact (resume from it with a lower --learning_rate)"
            if latest
            else "no checkpoint was saved before this"
        )
        return UserError(
            f"{where} at step {state.step}: training diverged; lower --learning_rate or check the data; {kept}"
        )

    def log_window() -> None:
        nonlocal loss_sum, loss_count, window_tokens, window_samples, window_start, total_tokens, total_samples
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        stats = torch.stack(
            [loss_sum.float(), window_tokens.float(), torch.tensor(float(window_samples), device=accelerator.device)]
        )
        stats = accelerator.reduce(stats, reduction="sum") if world > 1 else stats
        mean_loss = stats[0].item() / max(loss_count * world, 1)
        if not math.isfinite(mean_loss):
            raise diverged(f"loss became {mean_loss}")
        tokens, samples = int(stats[1].item()), int(stats[2].item())
        total_tokens += tokens
        total_samples += samples
        event = {
            "step": state.step,
            "epoch": round(state.epoch + min(state.batches_in_epoch / batches_per_epoch, 1.0), 4),
            "loss": round(mean_loss, 6),
            "learning_rate": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": round(tokens / elapsed, 2),
            "samples_per_s": round(samples / elapsed, 3),
        }
        if memory_mb is not None:
            event["peak_memory_mb"] = round(memory_mb(), 1)
        accelerator.log({f"train/{k}": v for k, v in event.items() if k != "step" and v is not None}, step=state.step)
        history.write(event)
        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{event['learning_rate']:.2e}")
        loss_sum = torch.zeros((), device=accelerator.device)
        loss_count, window_samples = 0, 0
        window_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
        window_start = time.perf_counter()

    def checkpoint() -> None:
        nonlocal last_saved
        if state.step == last_saved:  # e.g. a best-metric save and a scheduled save at the same step
            return
        # Never save a diverged state: the window's losses and the weights themselves must be finite.
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all().float()
        sums = torch.stack(
            [
                loss_sum.double(),
                window_tokens.double(),
                torch.tensor(float(window_samples), device=accelerator.device, dtype=torch.float64),
                finite.double(),
            ]
        )
        if world > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        if not math.isfinite(sums[0].item()):
            raise diverged("loss is not finite (not saving this state)")
        if sums[3].item() < world:
            raise diverged("weights are not finite (not saving this state)")
        state.window_micro_batches, state.total_micro_batches = loss_count, total_micro
        state.window_tokens, state.window_samples = int(sums[1].item()), int(sums[2].item())
        state.total_tokens, state.total_samples = total_tokens, total_samples
        state.elapsed_s = elapsed_before + time.perf_counter() - start
        try:
            own_sums = {"window_loss": loss_sum.item(), "total_loss": total_loss.item()}
            path = save_checkpoint(accelerator, t.output_dir, state, cfg, process_state=own_sums)
        except UserError:
            progress.close()
            raise
        last_saved = state.step
        if main:
            prune_checkpoints(t.output_dir, t.save_total_limit, state.best_checkpoint)
        accelerator.wait_for_everyone()
        logger.info("saved checkpoint %s", path)

    while state.step < total_steps and not stopped_early:
        # accelerate's prepared loader calls set_epoch(<its own iteration count>) on the sampler when iterated;
        # align that count with ours so the sampler shuffles for the right epoch
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch, skip_batches=0)
        # Resuming mid-epoch, the batches already trained on are drawn and dropped (collation only, no model
        # work): with several processes, accelerate's sharder tops up the epoch's last batches from the epoch's
        # first ones, so the whole epoch must pass through it for the shards to come out as they did.
        fast_forward = state.batches_in_epoch // world
        if resume_from is not None and fast_forward == 0:
            # resuming at an epoch start: starting the loader draws from the torch RNG after this point, as
            # it did in the uninterrupted run
            load_rng(resume_from, accelerator.process_index)
            resume_from = None
        for batch in train_loader:
            if fast_forward:
                fast_forward -= 1
                continue
            if resume_from is not None:
                # resuming mid-epoch: the uninterrupted run started this epoch's loader (one RNG draw) before
                # the checkpoint was taken, so restore the RNG only now that the loader has started
                load_rng(resume_from, accelerator.process_index)
                resume_from = None
            num_tokens = batch.pop("num_tokens")
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += world
            loss_sum += loss.detach().float()
            loss_count += 1
            total_loss += loss.detach().double()
            total_micro += 1
            window_tokens += num_tokens
            window_samples += batch["input_ids"].shape[0]
            if not accelerator.sync_gradients:
                continue
            scheduler.step()  # once per optimizer step, whatever the number of processes
            state.step += 1
            progress.update(1)
            if state.step % t.logging_steps == 0 or state.step == total_steps:
                log_window()
            if evaluate is not None and t.eval_steps and state.step % t.eval_steps == 0:
                stopped_early = _periodic_eval(accelerator, evaluate, state, cfg, history, checkpoint)
            if checkpoint_every and state.step % checkpoint_every == 0:
                checkpoint()
            if state.step >= total_steps or stopped_early:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
            if t.checkpointing_steps == "epoch":
                checkpoint()
    if loss_count:
        log_window()
    progress.close()
    runtime = elapsed_before + time.perf_counter() - start
    mean = total_loss / max(total_micro, 1)
    # mean over processes of per-process means
    mean = accelerator.reduce(mean, reduction="mean") if world > 1 else mean
    return TrainResult(
        state=state,
        train_loss=float(mean),
        runtime_s=runtime,
        samples=total_samples,
        real_tokens=total_tokens,
        stopped_early=stopped_early,
        history=history.events,
    )


def _periodic_eval(
    accelerator: Any,
    evaluate: Callable[[int], dict[str, float]],
    state: TrainState,
    cfg: Config,
    history: HistoryWriter,
    checkpoint: Callable[[], None],
) -> bool:
    """Evaluate, track the best metric (saving its checkpoint), and tell whether to stop early."""
    t = cfg.train
    metrics = evaluate(state.step)
    event = {"step": state.step, **{k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}}
    history.write(event)
    accelerator.log({f"eval/{k[5:]}": v for k, v in event.items() if k != "step"}, step=state.step)
    key = t.metric_for_best if t.metric_for_best == "eval_loss" else f"eval_{t.metric_for_best}"
    value = event.get(key)
    if value is None:
        return False
    if _is_better(t.metric_for_best, value, state.best_metric):
        state.best_metric, state.best_step = value, state.step
        state.evals_without_improvement = 0
        if t.checkpointing_steps:
            state.best_checkpoint = f"checkpoint-{state.step}"
            checkpoint()
    else:
        state.evals_without_improvement += 1
    logger.info("step %d: %s = %.4f (best %.4f at step %s)", state.step, key, value, state.best_metric, state.best_step)
    return bool(t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience)
