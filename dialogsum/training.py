"""The training loop, shared by full fine-tuning and LoRA, and the pieces it is made of.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on every process:
8 per device x 4 accumulation x 2 processes = 64 examples per optimizer step. The learning-rate schedule is
built in optimizer steps and stepped here exactly once per optimizer step (it is deliberately not passed to
``accelerator.prepare``, whose wrapper would step it once per process).

:func:`train_loop` reads top to bottom; what it needs around the step lives in three small objects:
:class:`TrainBatches` (the batches from where the run stands, exact resume included), :class:`LogWindow`
(running sums on the device -> one log event) and :class:`Checkpointer` (saves, never a diverged state).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
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
from dialogsum.files import write_jsonl, write_text
from dialogsum.tracking import peak_memory_mb

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


def plan_steps(cfg: Config, batches_per_epoch: int, num_processes: int) -> int:
    """Total optimizer steps, from the prepared dataloader's length (batches per process); logs the arithmetic."""
    t = cfg.train
    per_epoch = max(math.ceil(batches_per_epoch / t.gradient_accumulation_steps), 1)
    total = t.max_train_steps or max(int(math.ceil(t.num_train_epochs * per_epoch)), 1)
    logger.info(
        "effective batch: %d per device x %d accumulation x %d process(es) = %d examples per optimizer "
        "step; %d optimizer steps per epoch, %d in total; learning rate %.2e",
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        num_processes,
        t.per_device_train_batch_size * t.gradient_accumulation_steps * num_processes,
        per_epoch,
        total,
        cfg.learning_rate,
    )
    return total


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

    def metrics(self) -> dict[str, Any]:
        """The training entries of ``metrics.json``."""
        seconds = max(self.runtime_s, 1e-9)
        return {
            "train_loss": self.train_loss,
            "train_runtime_s": round(self.runtime_s, 3),
            "train_samples_per_s": round(self.samples / seconds, 3),
            "train_tokens_per_s": round(self.real_tokens / seconds, 2),
            "train_steps": self.state.step,
            "stopped_early": self.stopped_early,
            "best_metric": self.state.best_metric,
            "best_step": self.state.best_step,
        }


# --------------------------------------------------------------------------------------------- the loop


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
) -> TrainResult:
    """Run optimizer steps until ``total_steps`` (or early stopping); return loss, timing and counters.

    ``state`` holds the counters to start from (zero, or those of the checkpoint ``resume_from``, whose RNG
    states and running sums are put back); ``evaluate(step)`` returns eval metrics (``eval_loss``, maybe ROUGE).
    """
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    batches = TrainBatches(accelerator, train_loader, sampler, state, resume_from)
    window = LogWindow(accelerator, state, resume_from, t.output_dir)
    saver = Checkpointer(accelerator, cfg, state, window, params)
    history = History(accelerator, t.output_dir, keep_from_step=state.step)
    every = int(t.checkpointing_steps) if str(t.checkpointing_steps).isdigit() else 0
    progress = tqdm(
        total=total_steps, initial=state.step, desc="training", disable=not accelerator.is_local_main_process
    )
    stopped_early = False
    model.train()
    try:
        for batch, ends_epoch in batches:
            num_tokens = batch.pop("num_tokens")  # real prompt + summary tokens, for throughput
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    window.grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(loss, num_tokens, batch["input_ids"].shape[0])
            if not accelerator.sync_gradients:
                continue
            scheduler.step()  # once per optimizer step, whatever the number of processes
            state.step += 1
            progress.update(1)
            if state.step % t.logging_steps == 0 or state.step == total_steps:
                event = window.close(state.step, batches.epoch_progress(), scheduler.get_last_lr()[0])
                history.write(event, "train")
                progress.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['learning_rate']:.2e}")
            if evaluate is not None and t.eval_steps and state.step % t.eval_steps == 0:
                stopped_early = _periodic_eval(evaluate, state, cfg, history, saver)
            if every and state.step % every == 0:
                saver.save()
            if state.step >= total_steps or stopped_early:
                break
            if ends_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if t.checkpointing_steps == "epoch":
                    saver.save()
        if window.micro_batches:  # steps after the last log line (early stopping)
            history.write(window.close(state.step, batches.epoch_progress(), scheduler.get_last_lr()[0]), "train")
    finally:
        progress.close()  # the bar's line ends before any error message
    return TrainResult(
        state=state,
        train_loss=window.mean_train_loss(),
        runtime_s=window.elapsed_s(),
        samples=window.total_samples,
        real_tokens=window.total_tokens,
        stopped_early=stopped_early,
        history=history.events,
    )


def _periodic_eval(
    evaluate: Callable[[int], dict[str, float]],
    state: TrainState,
    cfg: Config,
    history: History,
    saver: Checkpointer,
) -> bool:
    """Evaluate, track the best metric (saving its checkpoint), and tell whether to stop early."""
    t = cfg.train
    metrics = evaluate(state.step)
    event = {"step": state.step, **{k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}}
    history.write(event, "eval")
    key = t.metric_for_best if t.metric_for_best == "eval_loss" else f"eval_{t.metric_for_best}"
    value = event.get(key)
    if value is None:
        return False
    if state.best_metric is None or (value < state.best_metric if key == "eval_loss" else value > state.best_metric):
        state.best_metric, state.best_step = value, state.step
        state.evals_without_improvement = 0
        if t.checkpointing_steps:
            state.best_checkpoint = f"checkpoint-{state.step}"
            saver.save()
    else:
        state.evals_without_improvement += 1
    logger.info("step %d: %s = %.4f (best %.4f at step %s)", state.step, key, value, state.best_metric, state.best_step)
    return bool(t.early_stopping_patience and state.evals_without_improvement >= t.early_stopping_patience)


# --------------------------------------------------------------------------------------------- its pieces


class TrainBatches:
    """This process's training micro-batches from where ``state`` stands, epoch after epoch (no end).

    Yields ``(batch, ends_epoch)`` and counts ``state.batches_in_epoch``; the loop moves ``state.epoch`` on after
    an epoch's last batch. Resuming from a checkpoint, its RNG states are put back at the point of the loop where
    they were saved, and the batches already trained on in the current epoch are drawn and dropped (collation
    only, no model work): with several processes, accelerate's sharder tops up an epoch's last batches from its
    first ones, so the whole epoch must pass through it for the shards to come out as they did.
    """

    def __init__(
        self,
        accelerator: Any,
        loader: Any,
        sampler: LengthGroupedBatchSampler,
        state: TrainState,
        resume_from: Path | None,
    ) -> None:
        self.accelerator, self.loader, self.sampler, self.state = accelerator, loader, sampler, state
        self.resume_from = resume_from
        self.world = accelerator.num_processes
        self.per_epoch = math.ceil(len(sampler.lengths) / sampler.batch_size)  # all processes together
        if state.batches_in_epoch >= self.per_epoch:
            # saved on the last batch of an epoch: the uninterrupted run went straight on to the next epoch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (for log lines)."""
        return round(self.state.epoch + min(self.state.batches_in_epoch / self.per_epoch, 1.0), 4)

    def _restore_rng(self) -> None:
        if self.resume_from is not None:
            load_rng(self.resume_from, self.accelerator.process_index)
            self.resume_from = None

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        while True:
            state = self.state
            # accelerate's prepared loader calls set_epoch(<its own iteration count>) on the sampler when
            # iterated: align that count with ours so the sampler shuffles for the right epoch
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(state.epoch)
            self.sampler.set_epoch(state.epoch)
            skip = state.batches_in_epoch // self.world
            if skip == 0:
                # at an epoch start the uninterrupted run saved before this epoch's loader started (one RNG draw)
                self._restore_rng()
            last = len(self.loader) - 1
            for index, batch in enumerate(self.loader):
                if index < skip:
                    continue
                # mid-epoch the loader had started before the save: restore only now that it has
                self._restore_rng()
                state.batches_in_epoch += self.world
                yield batch, index == last


def _sum_over_processes(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum") if accelerator.num_processes > 1 else values


class LogWindow:
    """Running sums of the log window (since the last log line) and of the run; one log event per window.

    Sums stay on the device, so no step waits for the host; :meth:`close` reduces them over processes once
    per log line. Loss sums are each process's own (one mean loss per micro-batch); real-token and sample
    counts saved in a checkpoint are already summed over processes and come back on the main process only, so
    a resumed run's log lines and ``train_loss`` are those of the uninterrupted run.
    """

    def __init__(self, accelerator: Any, state: TrainState, resume_from: Path | None, output_dir: str) -> None:
        self.accelerator, self.output_dir = accelerator, output_dir
        saved = load_process_state(resume_from, accelerator.process_index) if resume_from is not None else {}
        device, main = accelerator.device, accelerator.is_main_process
        self.loss = torch.tensor(saved.get("window_loss", 0.0), device=device, dtype=torch.float32)
        self.micro_batches = state.window_micro_batches
        self.tokens = torch.tensor(state.window_tokens if main else 0, device=device, dtype=torch.long)
        self.samples = state.window_samples if main else 0
        self.total_loss = torch.tensor(saved.get("total_loss", 0.0), device=device, dtype=torch.float64)
        self.total_micro_batches = state.total_micro_batches
        self.total_tokens, self.total_samples = state.total_tokens, state.total_samples
        self.grad_norm: Any = None
        self.started = self.window_started = time.perf_counter()
        self.elapsed_before = state.elapsed_s

    def add(self, loss: torch.Tensor, num_tokens: torch.Tensor, samples: int) -> None:
        """Count one micro-batch of this process."""
        loss = loss.detach()
        self.loss += loss.float()
        self.total_loss += loss.double()
        self.micro_batches += 1
        self.total_micro_batches += 1
        self.tokens += num_tokens
        self.samples += samples

    def close(self, step: int, epoch: float, learning_rate: float) -> dict[str, Any]:
        """The window's log event, reduced over processes (every process calls this); a new window starts."""
        device = self.accelerator.device
        elapsed = max(time.perf_counter() - self.window_started, 1e-9)
        sums = torch.stack([self.loss.float(), self.tokens.float(), torch.tensor(float(self.samples), device=device)])
        sums = _sum_over_processes(self.accelerator, sums)
        mean_loss = sums[0].item() / max(self.micro_batches * self.accelerator.num_processes, 1)
        if not math.isfinite(mean_loss):
            raise diverged(f"loss became {mean_loss}", step, self.output_dir)
        tokens, samples = int(sums[1].item()), int(sums[2].item())
        self.total_tokens += tokens
        self.total_samples += samples
        self.loss = torch.zeros((), device=device)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)
        self.micro_batches = self.samples = 0
        self.window_started = time.perf_counter()
        return {
            "step": step,
            "epoch": epoch,
            "loss": round(mean_loss, 6),
            "learning_rate": learning_rate,
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "tokens_per_s": round(tokens / elapsed, 2),
            "samples_per_s": round(samples / elapsed, 3),
            "peak_memory_mb": round(peak_memory_mb(self.accelerator.device), 1),
        }

    def save_to(self, state: TrainState, tokens: int, samples: int) -> dict[str, float]:
        """Put the sums into ``state`` (``tokens``/``samples``: the window's counts over all processes); return
        this process's own loss sums, saved with its RNG states."""
        state.window_micro_batches, state.total_micro_batches = self.micro_batches, self.total_micro_batches
        state.window_tokens, state.window_samples = tokens, samples
        state.total_tokens, state.total_samples = self.total_tokens, self.total_samples
        state.elapsed_s = self.elapsed_s()
        return {"window_loss": self.loss.item(), "total_loss": self.total_loss.item()}

    def elapsed_s(self) -> float:
        """Training time so far, earlier runs of a resumed training included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def mean_train_loss(self) -> float:
        """Mean loss of the whole training: mean over processes of per-process micro-batch means (collective)."""
        mean = self.total_loss / max(self.total_micro_batches, 1)
        return float(_sum_over_processes(self.accelerator, mean) / self.accelerator.num_processes)


def diverged(where: str, step: int, output_dir: str) -> UserError:
    """The error for a diverged run, naming the last good checkpoint."""
    latest = find_latest(output_dir)
    kept = (
        f"the last good checkpoint {latest} is intact (resume from it with a lower --learning_rate)"
        if latest
        else "no checkpoint was saved before this"
    )
    return UserError(f"{where} at step {step}: training diverged; lower --learning_rate or check the data; {kept}")


class Checkpointer:
    """Saves the training state when asked (at most once per step), never a diverged one, and prunes old ones."""

    def __init__(
        self, accelerator: Any, cfg: Config, state: TrainState, window: LogWindow, params: list[torch.nn.Parameter]
    ) -> None:
        self.accelerator, self.cfg, self.state, self.window, self.params = accelerator, cfg, state, window, params
        self.last_saved = -1
        if accelerator.is_main_process:
            remove_leftovers(cfg.train.output_dir)  # partial folders of a run killed while saving

    def save(self) -> None:
        """Write a checkpoint of the current step (every process calls this)."""
        accelerator, state, window, t = self.accelerator, self.state, self.window, self.cfg.train
        if state.step == self.last_saved:  # e.g. a best-metric save and a scheduled save at the same step
            return
        # the window's losses and the weights themselves must be finite on every process (one all-reduce)
        finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
        samples = torch.tensor(float(window.samples), device=accelerator.device, dtype=torch.float64)
        sums = torch.stack([window.loss.double(), window.tokens.double(), samples, finite.double()])
        sums = _sum_over_processes(accelerator, sums)
        if not math.isfinite(sums[0].item()):
            raise diverged("loss is not finite (not saving this state)", state.step, t.output_dir)
        if sums[3].item() < accelerator.num_processes:
            raise diverged("weights are not finite (not saving this state)", state.step, t.output_dir)
        own = window.save_to(state, tokens=int(sums[1].item()), samples=int(sums[2].item()))
        path = save_checkpoint(accelerator, t.output_dir, state, self.cfg, process_state=own)
        self.last_saved = state.step
        if accelerator.is_main_process:
            prune_checkpoints(t.output_dir, t.save_total_limit, state.best_checkpoint)
        accelerator.wait_for_everyone()
        logger.info("saved checkpoint %s", path)


class History:
    """Log events, to the trackers (``train/loss``, ``eval/loss``, ...) and to ``log_history.jsonl`` (main
    process); kept in memory too. Resuming, the file keeps what was logged up to the checkpoint's step."""

    def __init__(self, accelerator: Any, output_dir: str, keep_from_step: int = 0) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / "log_history.jsonl" if accelerator.is_main_process else None
        self.events: list[dict[str, Any]] = []
        if self.path is not None and self.path.exists() and keep_from_step:
            kept = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.events = [e for e in kept if e.get("step", 0) <= keep_from_step]
            write_jsonl(self.path, self.events)
        elif self.path is not None:
            write_text(self.path, "")

    def write(self, event: dict[str, Any], kind: str) -> None:
        """Record one event of ``kind`` (``train`` or ``eval``; its keys may repeat the kind: ``eval_loss``)."""
        tracked = {f"{kind}/{k.removeprefix(kind + '_')}": v for k, v in event.items() if k != "step" and v is not None}
        self.accelerator.log(tracked, step=event["step"])
        self.events.append(event)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:  # a log grows line by line
                fh.write(json.dumps(event) + "\n")
