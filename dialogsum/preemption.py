"""Stopping a training run early and cleanly: on a stop signal, or before a wall-clock limit.

Preemptible jobs end with a warning first: a SageMaker spot interruption sends SIGTERM about two minutes before
the kill, Kubernetes SIGTERM with a 30-second grace period, SLURM a chosen signal before the time limit. While
the training loop runs, SIGTERM, SIGINT and SIGUSR1 only set a flag (:class:`StopRequest`); ``--max_time``
asks for the same stop when the next step, a checkpoint and the exit would no longer fit in the budget. The
loop agrees on it at the next optimizer-step boundary: every process adds its two votes (signal, time) to the
all-reduce that counts the step's target tokens, so all processes stop at the same step even when only one of
them got the signal. It then writes a complete checkpoint of the steps done, closes the trackers and raises
:class:`TrainingStopped`; the process exits with :data:`EXIT_STOPPED` and ``--resume_from_checkpoint latest``
continues exactly where it stopped.

Before and after the loop the signals keep their usual effect (nothing would be saved: loading starts again,
and a finished training's model is already written). A second Ctrl-C more than :data:`ABORT_AFTER_S` after the
first aborts at once, without a checkpoint.

Nothing here imports torch: :mod:`dialogsum.cli` uses :data:`EXIT_STOPPED` and :class:`TrainingStopped`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from typing import Any

from dialogsum.process import is_main_launch_process

logger = logging.getLogger(__name__)

#: Exit code of a run stopped with a checkpoint (signal or ``--max_time``): EX_TEMPFAIL of sysexits.h,
#: "temporary failure, try again": run the same command with ``--resume_from_checkpoint latest``.
EXIT_STOPPED = 75
#: The signals that stop a run at the next optimizer step with a checkpoint.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
#: A repeated SIGINT this many seconds after the first aborts at once (a launcher that forwards the terminal's
#: Ctrl-C delivers it twice within milliseconds: that is still one request).
ABORT_AFTER_S = 2.0
#: Kept back by ``--max_time`` for leaving: trackers flushed and closed, process group and interpreter ended.
EXIT_MARGIN_S = 10.0
#: Before the first save its duration is estimated from the bytes a checkpoint holds (weights, Adam's two
#: moments, the loadable copy) at this rate, plus a fixed part (tokenizer, RNG, fsync, renames).
ESTIMATED_WRITE_BYTES_PER_S = 100e6
ESTIMATED_SAVE_OVERHEAD_S = 5.0


class TrainingStopped(Exception):
    """Training stopped early with a checkpoint (a stop signal or ``--max_time``); not an error.

    :func:`dialogsum.cli.run_cli` prints the message once and exits with :data:`EXIT_STOPPED`.
    """

    exit_code = EXIT_STOPPED


def parse_duration(text: str) -> float:
    """Seconds from ``"5400"``, ``"90.5"`` or ``"[H]H:MM:SS"`` (``"1:30:00"``); ValueError otherwise."""
    value = str(text).strip()
    match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)", value)
    if match:
        hours, minutes, seconds = match.groups()
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    raise ValueError(f"expected seconds (5400) or HH:MM:SS (1:30:00), got {text!r}")


def process_started_at() -> float:
    """When this process started (``time.time()`` scale): ``--max_time`` counts from there, loading included."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - no psutil or no /proc: the import of this module is close enough
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


def estimated_save_s(parameters: Any) -> float:
    """A first checkpoint's duration before any was written: trainable weights three times (themselves, or their
    loadable copy, and Adam's two moments, all float32) at :data:`ESTIMATED_WRITE_BYTES_PER_S`, plus
    :data:`ESTIMATED_SAVE_OVERHEAD_S`. ``parameters``: the trainable parameters."""
    trainable = sum(p.numel() for p in parameters)
    return 3 * 4 * trainable / ESTIMATED_WRITE_BYTES_PER_S + ESTIMATED_SAVE_OVERHEAD_S


class StopRequest:
    """Whether this process wants the run to stop: a stop signal arrived, or ``--max_time`` is nearly used up.

    Between :meth:`install` and :meth:`release` (the training loop), SIGTERM, SIGINT and SIGUSR1 set a flag
    instead of ending the process. Once the processes agreed to stop (:meth:`stopping`), a second Ctrl-C no longer
    aborts: the stop's checkpoint and the trackers' flush are under way.

    The time budget needs the durations of what comes next: the longest training step so far, the last
    evaluation, the last save (estimated before the first one) and :data:`EXIT_MARGIN_S`; the loop reports them
    with :meth:`record` / :meth:`timed`. ``eval_every`` and ``save_every`` say which steps also evaluate or save.
    """

    def __init__(
        self, max_time_s: float | None = None, save_estimate_s: float = 0.0, eval_every: int = 0, save_every: int = 0
    ) -> None:
        self.deadline = process_started_at() + max_time_s if max_time_s else None
        self.max_time_s = max_time_s
        self.eval_every, self.save_every = eval_every, save_every  # the steps that also evaluate or save
        self.signal_name: str | None = None
        self.signal_at = 0.0
        self.durations = {"step": 0.0, "eval": 0.0, "save": save_estimate_s}
        self._previous: dict[int, Any] = {}
        self._stopping = False

    # ------------------------------------------------------------------ signals

    def install(self) -> None:
        """From now on SIGTERM, SIGINT and SIGUSR1 set the flag instead of ending the process."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in a notebook worker)
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, self._on_signal)

    def release(self) -> None:
        """Give the signals their previous handlers back (the process leaving after a stop ignores SIGTERM from
        then on: :func:`dialogsum.cli.run_cli`)."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _on_signal(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self.signal_at = name, now
            if is_main_launch_process():  # os.write: safe in a signal handler, unlike logging
                os.write(2, f"{name} received: stopping after the current optimizer step with a checkpoint\n".encode())
        elif name == "SIGINT" and now - self.signal_at > ABORT_AFTER_S and not self._stopping:
            raise KeyboardInterrupt  # a second Ctrl-C: abort without a checkpoint

    # ------------------------------------------------------------------ time budget

    def record(self, kind: str, seconds: float) -> None:
        """Note how long a ``step`` (the longest is kept), an ``eval`` or a ``save`` (the last is kept) took."""
        self.durations[kind] = max(self.durations[kind], seconds) if kind == "step" else seconds

    def timed(self, kind: str) -> _Timer:
        """Context manager that :meth:`record`s the duration of its block as ``kind``."""
        return _Timer(self, kind)

    def next_step_cost_s(self, step: int) -> float:
        """Seconds needed to run optimizer step ``step`` (with its evaluation and scheduled save), then save the
        stop checkpoint and exit."""
        d = self.durations
        evaluates = bool(self.eval_every) and step % self.eval_every == 0
        saves = bool(self.save_every) and step % self.save_every == 0
        return d["step"] + (d["eval"] if evaluates else 0.0) + d["save"] * (2 if saves else 1) + EXIT_MARGIN_S

    @property
    def signalled(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signal_name is not None

    def votes(self, next_step: int) -> tuple[int, int]:
        """This process's ``(signal, time)`` votes for stopping before optimizer step ``next_step``, each 0 or 1."""
        late = self.deadline is not None and time.time() + self.next_step_cost_s(next_step) > self.deadline
        return int(self.signalled), int(late)

    def stopping(self) -> None:
        """The processes agreed to stop: from now on a repeated Ctrl-C does not abort the checkpoint."""
        self._stopping = True

    def reason(self, signal_votes: int, time_votes: int, num_processes: int) -> str:
        """Why the run stops, from the summed votes of all processes."""
        if signal_votes:
            if self.signal_name is not None and signal_votes == num_processes:
                return self.signal_name
            seen = f"{self.signal_name} here, " if self.signal_name else ""
            return f"a stop signal ({seen}seen by {signal_votes} of {num_processes} processes)"
        return f"--max_time {self.max_time_s:g} s (the next step, a checkpoint and the exit would not fit)"


class _Timer:
    def __init__(self, request: StopRequest, kind: str) -> None:
        self.request, self.kind = request, kind

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc_info: Any) -> None:
        self.request.record(self.kind, time.perf_counter() - self.started)
