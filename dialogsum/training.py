"""The training loop, shared by full fine-tuning and LoRA, and the pieces it is made of.

One optimizer step = a window of ``gradient_accumulation_steps`` micro-batches on every process:
8 per device x 4 accumulation x 2 processes = 64 examples per optimizer step. The learning-rate schedule is
built in optimizer steps and stepped here exactly once per optimizer step (it is deliberately not passed to
``accelerator.prepare``, whose wrapper would step it once per process).

The loss of an optimizer step is token-weighted: the sum of the per-token losses of every micro-batch of the
window on every process, divided by the window's target (summary) tokens on all processes. A micro-batch with
400 summary tokens therefore weighs ten times one with 40, and ``8 per device x 1 x 1``, ``4 x 2 accumulation``
and ``4 x 1 x 2 processes`` take the same optimizer step (a mean of per-micro-batch means would not). The window
is drawn before its first backward pass, so its token count is known (one small all-reduce per step). The same
all-reduce carries every process's votes to stop early (a stop signal, ``--max_time``: :mod:`dialogsum.preemption`),
so all processes stop at the same step boundary and save a checkpoint of the steps done.

:func:`train_loop` reads top to bottom; what it needs around the step lives in small objects:
:class:`TrainBatches` (the windows from where the run stands, exact resume included), :class:`LogWindow`
(running sums on the device -> one log event); saving is :class:`dialogsum.checkpointing.Checkpointer`'s.
"""

from __future__ import annotations

import contextlib
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
    HISTORY_FILE,
    Checkpointer,
    LogSums,
    TrainState,
    capture_rng,
    checkpoint_root,
    diverged,
    load_process_state,
    load_rng,
)
from dialogsum.config import Config, checkpoint_every, idle_settings, warn_once
from dialogsum.data import LengthGroupedBatchSampler
from dialogsum.distributed import mark_progress, optimizer_offload, peak_memory_mb
from dialogsum.errors import UserError
from dialogsum.files import json_object_or_none, parse_jsonl, read_text, write_jsonl, write_text
from dialogsum.preemption import StopRequest, TrainingStopped, estimated_save_s, parse_duration, process_started_at
from dialogsum.run_folder import record_outputs
from dialogsum.tracking import close_trackers, flush_trackers, resend_lost_events, tracked_values

logger = logging.getLogger(__name__)

#: Parameters without weight decay (IA3's scales start at one: decay would pull them towards zero).
NO_DECAY = ("bias", "layer_norm", "layernorm", "ln_", "ia3_l")


def check_mixed_precision(mixed_precision: str, model_name_or_path: str) -> None:
    """Refuse fp16 for T5-family models: their activations overflow fp16's range (loss becomes NaN).

    ``mixed_precision`` comes from the accelerate launcher (``accelerator.mixed_precision``). The model type is
    read from a local ``config.json`` when there is one, otherwise taken from the hub id (``google/flan-t5-base``).
    """
    if mixed_precision != "fp16":
        return
    config = Path(model_name_or_path) / "config.json"
    if config.is_file():
        model_type = str((json_object_or_none(config) or {}).get("model_type", "t5"))
    else:
        model_type = model_name_or_path
    if "t5" in model_type.lower():
        raise UserError(
            "mixed precision fp16 is not supported for T5 models (their activations overflow in fp16 and the "
            "loss becomes NaN); use bf16 (accelerate launch --mixed_precision bf16, or mixed_precision: bf16 "
            "in the accelerate config) or no mixed precision"
        )


def check_optimizer(accelerator: Any, optim: str) -> None:
    """Refuse ``--optim adafactor`` under DeepSpeed optimizer offload: accelerate swaps any optimizer there for
    DeepSpeed's CPU Adam, so the run would silently train with Adam."""
    device = optimizer_offload(accelerator)
    if optim != "adamw" and device is not None:
        raise UserError(
            f"--optim {optim} cannot run with DeepSpeed's optimizer offload (offload_optimizer_device: "
            f"{device}): accelerate replaces the optimizer with DeepSpeed's CPU Adam there; use "
            "deepspeed_zero2.yaml or deepspeed_zero3.yaml, or --optim adamw"
        )


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``--optim`` (fused AdamW or Adafactor) over trainable parameters only; no weight decay on biases and
    LayerNorm weights (``--loraplus_lr_ratio``: LoRA+ groups, :func:`dialogsum.adapters.loraplus_optimizer`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters")
    if cfg.train.optim == "adafactor":
        from transformers.optimization import Adafactor

        # T5's fine-tuning settings: the lr is the schedule's (relative step off, no warm-up init, no scaling by
        # each tensor's RMS); beta1 None keeps no momentum, and a matrix's second moment is stored as a row and
        # a column vector (rows + columns numbers instead of rows x columns)
        optimizer_class: type = Adafactor
        settings: dict[str, Any] = {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    else:
        # fused: one kernel updates every tensor in one pass. CPU: foreach falls back to full-size temporaries
        # there (flan-t5-base on 2 cores: fused ~0.2 s per step, foreach ~10x slower). GPU: foreach still launches
        # several kernels per tensor group and operation, fused a few per step, and the step is bound by launches
        # (~280 parameter tensors here). DeepSpeed's and FSDP's sharded parameters take the fused kernel too.
        optimizer_class, settings = torch.optim.AdamW, {"betas": (0.9, 0.999), "eps": 1e-8, "fused": True}
    if cfg.method == "lora" and cfg.lora.loraplus_lr_ratio is not None:
        from dialogsum.adapters import loraplus_optimizer

        return loraplus_optimizer(model, cfg, optimizer_class, settings)
    return optimizer_class(groups, lr=cfg.learning_rate, **settings)


def loss_function(
    accelerator: Any, model: torch.nn.Module, label_smoothing: float
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``loss(batch)``: the mean loss over a micro-batch's target tokens (labels other than -100).

    Without smoothing it is the model's own cross-entropy. With ``label_smoothing`` ``e``, each target token's loss
    is ``(1 - e) * -log p(label) + e * mean over the vocabulary of -log p(v)`` (torch's ``label_smoothing``, as
    transformers' ``--label_smoothing_factor``), -100 positions left out. :func:`token_weights` weighs that mean
    like the plain one, so every split of a step sums the same per-token losses. The model then gets the decoder
    inputs (the labels shifted right, as T5 builds them) instead of the labels, so it computes no loss of its own.
    """
    if not label_smoothing:
        return lambda batch: model(**batch).loss
    config = accelerator.unwrap_model(model).config  # DDP, DeepSpeed, compile and PEFT wrappers
    start, pad = config.decoder_start_token_id, config.pad_token_id

    def smoothed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        decoder_input_ids = labels.new_full(labels.shape, start)
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, decoder_input_ids=decoder_input_ids).logits
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=label_smoothing
        )

    return smoothed


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> Any:
    """LR schedule in optimizer steps, with linear warm-up."""
    from transformers import get_scheduler

    warmup = cfg.train.num_warmup_steps
    if warmup is None:
        warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    return get_scheduler(
        cfg.train.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )


def plan_steps(cfg: Config, sampler: LengthGroupedBatchSampler, num_processes: int) -> int:
    """Total optimizer steps; logs the arithmetic.

    Each process gets ``ceil(batches / processes)`` of an epoch's batches (accelerate's sharder tops the last
    round up), cut into windows of ``gradient_accumulation_steps`` (the epoch's last window may be shorter).
    With ``--max_tokens_per_batch`` the number of batches varies by epoch, so the epochs are counted one by one.
    """
    t = cfg.train

    def steps_in(epoch: int) -> int:
        per_process = math.ceil(sampler.num_batches(epoch) / num_processes)
        return max(math.ceil(per_process / t.gradient_accumulation_steps), 1)

    whole, part = divmod(t.num_train_epochs, 1)
    total = t.max_train_steps or max(
        sum(steps_in(e) for e in range(int(whole))) + math.ceil(part * steps_in(int(whole))), 1
    )
    per_step = f"{t.gradient_accumulation_steps} accumulation x {num_processes} process(es)"
    if sampler.budget is None:
        size = t.per_device_train_batch_size
        batch = f"{size} per device x {per_step} = {size * t.gradient_accumulation_steps * num_processes} examples"
    else:
        tokens = sampler.budget.max_tokens
        mean = len(sampler.lengths) / sampler.num_batches(0)  # examples per batch, on average
        batch = (
            f"up to {tokens} padded tokens per device (~{mean:.1f} examples) x {per_step} = up to "
            f"{tokens * t.gradient_accumulation_steps * num_processes} tokens"
        )
    logger.info(
        "effective batch: %s per optimizer step; %d optimizer steps per epoch, %d in total; learning rate %.2e",
        batch,
        steps_in(0),
        total,
        cfg.learning_rate,
    )
    for message in idle_settings(cfg, total):
        warn_once(message)
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
    cfg: Config,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    loader: Any,
    sampler: LengthGroupedBatchSampler,
    total_steps: int,
    state: TrainState,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Run optimizer steps until ``total_steps`` (or early stopping); return loss, timing and counters.

    ``model``, ``optimizer`` and ``loader`` are prepared by ``accelerator``; ``tokenizer`` is saved into each
    checkpoint with the model; ``sampler`` is the loader's batch sampler. ``state`` holds the counters to start
    from (zero, or those of the checkpoint ``resume_from``, whose RNG states and running sums are put back);
    ``evaluate(step)`` returns eval metrics (``eval_loss``, maybe ROUGE). On a stop signal or near ``--max_time``
    it saves a checkpoint at a step boundary and raises :class:`~dialogsum.preemption.TrainingStopped`.
    """
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    compute_loss = loss_function(accelerator, model, t.label_smoothing_factor)
    batches = TrainBatches(accelerator, loader, sampler, state, resume_from)
    log = LogWindow(accelerator, state, resume_from, checkpoint_root(cfg))
    history = History(accelerator, t.output_dir, keep_from_step=state.step, checkpoint=resume_from)
    resend_lost_events(accelerator, checkpoint_root(cfg), history.events)  # what a killed attempt's W&B lost
    every = checkpoint_every(t.checkpointing_steps)
    max_time = parse_duration(t.max_time) if t.max_time else None
    stop = StopRequest(max_time, estimated_save_s(params), t.eval_steps if evaluate else 0, every)
    saver = Checkpointer(
        accelerator,
        cfg=cfg,
        state=state,
        model=model,
        tokenizer=tokenizer,
        log=log,
        history=history,
        timer=stop,
        on_saved=lambda: _after_save(accelerator),
        resumed=resume_from is not None,
    )
    progress = tqdm(
        total=total_steps, initial=state.step, desc="training", disable=not accelerator.is_local_main_process
    )
    stopped_early = False
    first_step = state.step  # where this attempt starts: a stop on time before any step of it is no progress
    model.train()
    stop.install()  # SIGTERM/SIGINT/SIGUSR1 now only ask for a stop at the next step boundary
    try:
        for window, ends_epoch in batches:
            if state.step >= total_steps:  # resumed from the last step's checkpoint: nothing left to train
                break
            started = time.perf_counter()
            mark_progress(f"training step {state.step + 1}")  # named if a collective of this step times out
            # one all-reduce: the window's target tokens, and the processes' votes to stop (signal, time)
            targets, weights, window_targets, votes = token_weights(accelerator, window, stop.votes(state.step + 1))
            if any(votes):
                _stop_with_checkpoint(accelerator, batches, saver, stop, votes, first_step)
            for i, batch in enumerate(window):
                last = i == len(window) - 1
                accelerator.sync_gradients = last  # DDP syncs, DeepSpeed and the optimizer step after the last only
                num_tokens = batch.pop("num_tokens")  # real prompt + summary tokens, for throughput
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    loss = compute_loss(batch)  # mean over this micro-batch's target tokens
                    accelerator.backward(loss * weights[i])
                log.add(loss * targets[i], num_tokens, batch["input_ids"].shape[0])
            if t.max_grad_norm > 0:
                log.grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # once per optimizer step, whatever the number of processes
            stop.record("step", time.perf_counter() - started)
            log.end_step(window_targets)
            state.step += 1
            progress.update(1)
            if state.step % t.logging_steps == 0 or state.step == total_steps:
                event = log.close(state.step, batches.epoch_progress(), scheduler.get_last_lr()[0])
                history.write(event, "train")
                progress.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['learning_rate']:.2e}")
            if evaluate is not None and t.eval_steps and state.step % t.eval_steps == 0:
                with stop.timed("eval"):
                    stopped_early = _periodic_eval(evaluate, state, cfg, history, saver)
            if every and state.step % every == 0:
                saver.save()
            if state.step >= total_steps or stopped_early:
                break
            if ends_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if t.checkpointing_steps == "epoch":
                    saver.save()
        if log.pending():  # steps after the last log line (early stopping)
            history.write(log.close(state.step, batches.epoch_progress(), scheduler.get_last_lr()[0]), "train")
        signalled = _sum_over_processes(accelerator, torch.tensor(int(stop.signalled), device=accelerator.device))
        if signalled:  # a stop signal came during the last step: it ends the same way
            _stop_with_checkpoint(accelerator, batches, saver, stop, (int(signalled), 0), first_step, unwind=False)
    finally:
        progress.close()  # the bar's line ends before any error message
        stop.release()  # signals end the process again (evaluation, saving the model): nothing to checkpoint
    return TrainResult(
        state=state,
        train_loss=log.mean_train_loss(),
        runtime_s=log.elapsed_s(),
        samples=log.total_samples,
        real_tokens=log.total_tokens,
        stopped_early=stopped_early,
        history=history.events,
    )


def _after_save(accelerator: Any) -> None:
    """Main process, after each checkpoint: what must outlive a kill with it."""
    flush_trackers(accelerator)  # the events up to this checkpoint
    record_outputs()  # the output folder's manifest lists this checkpoint (and the trackers' files)


def _stop_with_checkpoint(
    accelerator: Any,
    batches: TrainBatches,
    saver: Checkpointer,
    stop: StopRequest,
    votes: tuple[int, int],
    first_step: int,
    unwind: bool = True,
) -> None:
    """The processes agreed to stop: save the steps done, close the trackers, raise.

    Before a window's step, the window goes back first (``unwind``: :meth:`TrainBatches.unwind`), so the
    checkpoint is the state after the previous optimizer step, as a scheduled save there would have written it.
    A signal that came during the last step also ends here (a restart then only saves and evaluates).

    ``--max_time`` used up before this attempt's first optimizer step (``first_step``) is an error, not a stop:
    a restart with the same budget would stop at the same place again, forever.
    """
    if not votes[0] and batches.state.step == first_step:
        raise UserError(
            f"--max_time {stop.max_time_s:g} s leaves no time for one optimizer step: "
            f"{time.time() - process_started_at():.0f} s went to loading, and a step, a checkpoint and the exit "
            f"need more; no progress is possible, so this is not a stop to continue: give a longer --max_time"
        )
    stop.stopping()
    reason = stop.reason(*votes, accelerator.num_processes)
    rng = batches.unwind() if unwind else None
    step = batches.state.step
    if step == 0:
        where = "no optimizer step was done, nothing to save"
    else:
        where = f"checkpoint {saver.save(rng=rng)} saved"
    close_trackers(accelerator, saver.root, step)  # flushed on the main process before any process exits
    accelerator.wait_for_everyone()
    logger.info("stopped at step %d on %s", step, reason)
    raise TrainingStopped(
        f"at step {step} on {reason}; {where}; continue with the same command and --resume_from_checkpoint latest"
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
    """This process's training micro-batches from where ``state`` stands, in accumulation windows, epoch after
    epoch (no end).

    Yields ``(window, ends_epoch)``: ``gradient_accumulation_steps`` micro-batches (fewer at an epoch's end, where
    a window is cut short), and counts ``state.batches_in_epoch``; the loop moves ``state.epoch`` on after an
    epoch's last window. Resuming from a checkpoint, its RNG states are put back at the point of the loop where
    they were saved, and the batches already trained on in the current epoch are drawn and dropped (collation
    only, no model work): with several processes, accelerate's sharder tops up an epoch's last batches from its
    first ones, so the whole epoch must pass through it for the shards to come out as they did. A window drawn
    but not trained on (the run stops before its step) is put back with :meth:`unwind`.
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
        self.window_start = state.batches_in_epoch  # where the last window began in its epoch
        self.epoch_rng: dict[str, Any] | None = None  # RNG states from before the current epoch's loader started
        if state.batches_in_epoch >= self.per_epoch:
            # saved on the last batch of an epoch: the uninterrupted run went straight on to the next epoch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    @property
    def per_epoch(self) -> int:
        """Batches in the current epoch, all processes together (with a token budget it varies by epoch)."""
        return self.sampler.num_batches(self.state.epoch)

    def epoch_progress(self) -> float:
        """Epochs done, as a fraction (for log lines)."""
        return round(self.state.epoch + min(self.state.batches_in_epoch / self.per_epoch, 1.0), 4)

    def unwind(self) -> dict[str, Any] | None:
        """Put the last window back: the position returns to its start. Returns the RNG states a checkpoint of this
        position must hold (those from before the epoch's loader started when the window was the epoch's first;
        None: the current ones, which drawing a window mid-epoch does not change)."""
        self.state.batches_in_epoch = self.window_start
        return self.epoch_rng if self.window_start == 0 else None

    def _restore_rng(self) -> None:
        if self.resume_from is not None:
            load_rng(self.resume_from, self.accelerator.process_index)
            self.resume_from = None

    def __iter__(self) -> Iterator[tuple[list[dict[str, torch.Tensor]], bool]]:
        size = self.accelerator.gradient_accumulation_steps
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
            self.epoch_rng = capture_rng() if skip == 0 else None  # what a stop before the epoch's first step saves
            last = len(self.loader) - 1
            window: list[dict[str, torch.Tensor]] = []
            for index, batch in enumerate(self.loader):
                if index < skip:
                    continue
                # mid-epoch the loader had started before the save: restore only now that it has
                self._restore_rng()
                if not window:
                    self.window_start = state.batches_in_epoch
                state.batches_in_epoch += self.world
                window.append(batch)
                if len(window) == size or index == last:
                    yield window, index == last
                    window = []


def _sum_over_processes(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(values, reduction="sum") if accelerator.num_processes > 1 else values


def token_weights(
    accelerator: Any, window: list[dict[str, torch.Tensor]], votes: tuple[int, ...] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Target tokens of each micro-batch, the weight of each micro-batch's mean loss, the window's target tokens,
    and ``votes`` (this process's counts, e.g. its stop votes) summed over all processes.

    With ``n_i`` target tokens in micro-batch ``i`` and ``N`` in the whole window on all processes (one
    all-reduce), the window's loss is ``sum_i mean_loss_i * n_i / N``. ``backward`` divides each loss by
    ``gradient_accumulation_steps`` (accelerate does, or under DeepSpeed the engine itself) and the processes'
    gradients are averaged (DDP, FSDP, ZeRO): the weight is ``n_i * accumulation * processes / N``. It is computed
    in float64, so that it is exactly 1 for one micro-batch on one process.

    The votes travel in the same all-reduce as the token count (reading them back is the one host sync per step).
    """
    targets = torch.stack([(batch["labels"] != -100).sum() for batch in window])
    total = targets.sum()
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(torch.cat([total.view(1), targets.new_tensor(votes)]), reduction="sum")
        total, votes = sums[0], tuple(int(v) for v in sums[1:].tolist())
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes
    weights = (targets.double() * scale / total.clamp_min(1).double()).float()
    return targets, weights, total, votes


class LogWindow:
    """Running sums of the log window (since the last log line) and of the run; one log event per window.

    Sums stay on the device, so no step waits for the host; :meth:`close` reduces them over processes once
    per log line. The loss is token-weighted: each process sums the per-token losses of its micro-batches, and
    the window's target tokens (all processes) divide their total. Real-token and sample counts saved in a
    checkpoint are already summed over processes and come back on the main process only, so a resumed run's log
    lines and ``train_loss`` are those of the uninterrupted run.
    """

    def __init__(self, accelerator: Any, state: TrainState, resume_from: Path | None, checkpoint_dir: Path) -> None:
        self.accelerator, self.checkpoint_dir = accelerator, checkpoint_dir  # named by a divergence error
        saved = load_process_state(resume_from, accelerator.process_index) if resume_from is not None else {}
        device, main = accelerator.device, accelerator.is_main_process
        self.loss = torch.tensor(saved.get("window_loss", 0.0), device=device, dtype=torch.float32)
        sums = state.sums
        self.targets = torch.tensor(sums.window_targets, device=device, dtype=torch.long)  # all processes
        self.tokens = torch.tensor(sums.window_tokens if main else 0, device=device, dtype=torch.long)
        self.samples = sums.window_samples if main else 0
        self.total_loss = torch.tensor(saved.get("total_loss", 0.0), device=device, dtype=torch.float64)
        self.total_targets = torch.tensor(sums.total_targets, device=device, dtype=torch.long)
        self.total_tokens, self.total_samples = sums.total_tokens, sums.total_samples
        self.grad_norm: Any = None
        self.started = self.window_started = time.perf_counter()
        self.elapsed_before = sums.elapsed_s

    def add(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor, samples: int) -> None:
        """Count one micro-batch of this process: the sum of its per-token losses, its real tokens and examples."""
        loss_sum = loss_sum.detach()
        self.loss += loss_sum.float()
        self.total_loss += loss_sum.double()
        self.tokens += num_tokens
        self.samples += samples

    def end_step(self, targets: torch.Tensor) -> None:
        """Count an optimizer step's target tokens (all processes)."""
        self.targets += targets
        self.total_targets += targets

    def pending(self) -> bool:
        """Whether steps were counted since the last log event."""
        return bool(self.targets.item())

    def close(self, step: int, epoch: float, learning_rate: float) -> dict[str, Any]:
        """The window's log event, reduced over processes (every process calls this); a new window starts."""
        device = self.accelerator.device
        elapsed = max(time.perf_counter() - self.window_started, 1e-9)
        sums = torch.stack([self.loss.float(), self.tokens.float(), torch.tensor(float(self.samples), device=device)])
        sums = _sum_over_processes(self.accelerator, sums)
        mean_loss = sums[0].item() / max(int(self.targets.item()), 1)
        if not math.isfinite(mean_loss):
            raise diverged(f"loss became {mean_loss}", step, self.checkpoint_dir)
        tokens, samples = int(sums[1].item()), int(sums[2].item())
        self.total_tokens += tokens
        self.total_samples += samples
        self.loss = torch.zeros((), device=device)
        self.targets = torch.zeros((), device=device, dtype=torch.long)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)
        self.samples = 0
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

    def save_to(self, sums: LogSums, tokens: int, samples: int) -> dict[str, float]:
        """Put the sums into ``sums`` (``tokens``/``samples``: the window's counts over all processes); return
        this process's own loss sums, saved with its RNG states."""
        sums.window_targets, sums.total_targets = int(self.targets.item()), int(self.total_targets.item())
        sums.window_tokens, sums.window_samples = tokens, samples
        sums.total_tokens, sums.total_samples = self.total_tokens, self.total_samples
        sums.elapsed_s = self.elapsed_s()
        return {"window_loss": self.loss.item(), "total_loss": self.total_loss.item()}

    def elapsed_s(self) -> float:
        """Training time so far, earlier runs of a resumed training included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def mean_train_loss(self) -> float:
        """Token-weighted mean loss of the whole training, over all processes (a collective)."""
        total = _sum_over_processes(self.accelerator, self.total_loss)
        return float(total / max(int(self.total_targets.item()), 1))


class History:
    """Log events, to the trackers (``train/loss``, ``eval/loss``, ...) and to ``log_history.jsonl`` (main
    process); kept in memory too. Resuming, the file keeps what was logged up to the checkpoint's step (taken
    from the checkpoint's own copy when the output folder lost it)."""

    def __init__(
        self, accelerator: Any, output_dir: str, keep_from_step: int = 0, checkpoint: Path | None = None
    ) -> None:
        self.accelerator = accelerator
        self.path = Path(output_dir) / HISTORY_FILE if accelerator.is_main_process else None
        self.events: list[dict[str, Any]] = []
        source = self.path
        if source is not None and not source.exists() and checkpoint is not None:
            source = checkpoint / HISTORY_FILE
        if source is not None and source.exists() and keep_from_step:
            kept = parse_jsonl(read_text(source, "log history"), str(source), cut_end_ok=True)  # a kill mid-line
            self.events = [e for e in kept if e.get("step", 0) <= keep_from_step]
            write_jsonl(self.path, self.events)
        elif self.path is not None:
            write_text(self.path, "")

    def write(self, event: dict[str, Any], kind: str) -> None:
        """Record one event of ``kind`` (``train`` or ``eval``; its keys may repeat the kind: ``eval_loss``)."""
        self.accelerator.log(tracked_values(event, kind), step=event["step"])
        self.events.append(event)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:  # a log grows line by line
                fh.write(json.dumps(event) + "\n")
