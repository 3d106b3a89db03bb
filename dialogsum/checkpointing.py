"""Training checkpoints: atomic save, ``latest`` lookup, retention, exact resume and compatibility checks.

A checkpoint is written to ``checkpoint-<step>.tmp`` by every process (``accelerator.save_state``: weights,
optimizer, scheduler, RNG states), then the main process writes ``trainer_state.json`` last and renames the
folder to ``checkpoint-<step>``. A kill at any moment therefore leaves either a complete checkpoint or a
``.tmp`` folder that :func:`find_latest` ignores.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dialogsum.config import Config
from dialogsum.errors import UserError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")

#: Settings that must match between a checkpoint and the run resuming from it (else the run is not "the
#: same run"): method, model, data and batch order.
RESUME_KEYS = (
    "method",
    "model_name_or_path",
    "dataset_name",
    "train_file",
    "prompt_template",
    "max_source_length",
    "max_target_length",
    "max_train_samples",
    "subsample_every",
    "group_by_length",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "text_column",
    "summary_column",
)


@dataclass
class TrainState:
    """Counters of the loop; saved as JSON in every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batches_in_epoch: int = 0
    """Sampler batches (all processes together) consumed in the current epoch."""
    best_metric: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    num_processes: int = 1
    fingerprint: dict[str, Any] = field(default_factory=dict)


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint."""
    flat = cfg.to_dict()
    keys = RESUME_KEYS if cfg.method == "lora" else tuple(k for k in RESUME_KEYS if not k.startswith("lora_"))
    return {k: flat[k] for k in keys}


def _rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng_state_{rank}.pkl"


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states of this process."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    """Set the RNG states captured by :func:`capture_rng`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """Turn ``--resume_from_checkpoint`` (a path or ``latest``) into a checkpoint folder, checked."""
    if not resume:
        return None
    if resume == "latest":
        latest = find_latest(output_dir)
        if latest is None:
            raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint: {resume} is not a directory")
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> TrainState:
    """Load ``trainer_state.json`` of a checkpoint."""
    data = json.loads((checkpoint / STATE_FILE).read_text())
    return TrainState(**data)


def check_compatible(state: TrainState, cfg: Config, num_processes: int, checkpoint: Path) -> None:
    """Refuse a checkpoint made with different method, model, data or batch settings, naming them."""
    current = fingerprint(cfg)
    diffs = [
        f"{k}: checkpoint {state.fingerprint.get(k)!r} vs now {v!r}"
        for k, v in current.items()
        if state.fingerprint.get(k) != v
    ]
    if state.num_processes != num_processes:
        diffs.append(f"num_processes: checkpoint {state.num_processes} vs now {num_processes}")
    if diffs:
        raise UserError(f"cannot resume from {checkpoint}: settings differ ({'; '.join(diffs)})")


def save_checkpoint(accelerator: Any, output_dir: str | Path, state: TrainState, cfg: Config) -> Path:
    """Write a complete checkpoint atomically; on failure (e.g. disk full) remove the partial folder."""
    root = Path(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f"checkpoint-{state.step}.tmp"
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        with open(_rng_file(tmp, accelerator.process_index), "wb") as fh:
            pickle.dump(capture_rng(), fh)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            cfg.save(tmp / "config.yaml")
            _write_json_synced(tmp / STATE_FILE, asdict(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"could not save checkpoint {final} ({exc.strerror or exc}); earlier checkpoints are intact"
        ) from exc
    accelerator.wait_for_everyone()
    return final


def _write_json_synced(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


def prune_checkpoints(output_dir: str | Path, keep: int | None, protect: str | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, never the ``protect``ed (best) one."""
    if keep is None:
        return []
    dirs = checkpoint_dirs(output_dir)
    removable = [d for d in dirs[:-keep] if protect is None or d.name != Path(protect).name] if keep else dirs
    for path in removable:
        shutil.rmtree(path, ignore_errors=True)
    return removable


def load_checkpoint(accelerator: Any, checkpoint: Path) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from ``checkpoint``; return its loop counters."""
    accelerator.load_state(str(checkpoint))
    return read_state(checkpoint)


def load_rng(checkpoint: Path, rank: int) -> None:
    """Restore this process's RNG states from a checkpoint (after the data iterator has been created)."""
    path = _rng_file(checkpoint, rank)
    if path.is_file():
        with open(path, "rb") as fh:
            restore_rng(pickle.load(fh))  # noqa: S301 - our own file, written by save_checkpoint
