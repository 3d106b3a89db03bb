"""Training checkpoints: what a save writes and in which order, ``latest`` lookup, retention, exact resume and
compatibility checks. The loop asks :class:`Checkpointer` to save; everything a save does is in this module.

One save (:meth:`Checkpointer.save`, every process), in this order:

1. one all-reduce: the log window's sums and whether the weights are finite; a non-finite loss or weight is
   refused (:func:`diverged`), so no diverged state ever gets a checkpoint name. The sums go into
   ``state.sums`` (:class:`LogSums`).
2. :func:`save_checkpoint` into ``checkpoint-<step>.tmp``:

   a. the model in loadable form (``save_pretrained``: ``model.safetensors`` + ``config.json``, or the LoRA
      adapter), the tokenizer the recipe loaded, ``generation_config.json``. This comes first because of the
      next step's hook: it looks for that loadable copy.
   b. ``accelerator.save_state`` (weights, optimizer, scheduler, accelerate's RNG files). Its save hook
      (:func:`install_checkpoint_hooks`) keeps only the trainable tensors of a partly frozen model (LoRA:
      the frozen base comes from ``--model_name_or_path`` on resume), and for a fully trained model whose
      loadable copy is already in the folder it saves no second copy of the weights, writing
      ``trainable_only.json`` instead; the load hook reads the weights back from the loadable copy.
   c. ``rng_state_<rank>.pkl``: this process's RNG states and its own loss sums; every file is flushed to disk.
   d. the main process: ``config.yaml``, ``log_history.jsonl`` (the log up to this step), then
      ``trainer_state.json`` last (:class:`TrainState`, listing every other file with its size), then the
      folder is renamed to ``checkpoint-<step>``. A kill at any moment leaves either a complete checkpoint or a
      ``.tmp`` folder that :func:`find_latest` ignores (and the next run removes).

3. the main process: old checkpoints are pruned (never the best one), then the loop's ``on_saved`` (the
   trackers flushed, the output folder's manifest updated).

Folders are deleted the same way round: renamed to ``*.deleting`` first (atomic), then removed, so a kill during
a deletion never leaves a half-deleted folder under a checkpoint name.

For flan-t5-base with LoRA r=32 a checkpoint holds ~14 MB of weights instead of ~1 GB. Every checkpoint loads on
its own, like the final model, so ``evaluate.py``, ``summarize.py`` and ``export.py`` take a checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dialogsum.config import ADAPTER_METHODS, Config, older_checkpoint_values, resume_settings
from dialogsum.errors import UserError
from dialogsum.files import (
    discard,
    json_object_or_none,
    jsonl_text,
    read_json_object,
    write_bytes,
    write_json,
    write_text,
)
from dialogsum.preemption import StopRequest

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
#: The log events of a run, one JSON object per line (output folder; a copy in every checkpoint).
HISTORY_FILE = "log_history.jsonl"
#: In STATE_FILE: every other file of the checkpoint with its size in bytes.
FILES_KEY = "files"
#: In TRAINABLE_ONLY_FILE: the model's weights are the checkpoint's loadable model (``model.safetensors``).
LOADABLE_WEIGHTS = "loadable model.safetensors"
DATA_DIGEST = "train_file_sha256"
BASE_DIGEST = "base_model_weights_digest"
TRAINABLE_ONLY_FILE = "trainable_only.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^checkpoint-\d+\.(tmp|deleting|replaced)$")

@dataclass
class LogSums:
    """The log window's and the run's running sums, over all processes (each process's own loss sums are saved
    with its RNG states instead). They let a resumed run write the same log lines as an uninterrupted one: a log
    window that straddles the checkpoint continues from the saved sums instead of starting empty."""

    window_targets: int = 0
    """Target (summary) tokens (all processes) in the current log window: the token-weighted loss's divisor."""
    window_tokens: int = 0
    """Real tokens (all processes) in the current log window."""
    window_samples: int = 0
    """Examples (all processes) in the current log window."""
    total_targets: int = 0
    """Target (summary) tokens (all processes) since the start of training."""
    total_tokens: int = 0
    """Real tokens (all processes) logged since the start of training."""
    total_samples: int = 0
    """Examples (all processes) logged since the start of training."""
    elapsed_s: float = 0.0
    """Training time before this process started (earlier runs of a resumed training)."""


@dataclass
class TrainState:
    """Where the loop stands, saved as ``trainer_state.json`` in every checkpoint: its progress (step, position in
    the epoch, best metric, the settings it was made with) and, in :attr:`sums`, the log's running sums. The JSON
    file holds both flat, in one object (the keys of checkpoints written before the split)."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    batches_in_epoch: int = 0
    """Sampler batches (all processes together) consumed in the current epoch."""
    best_metric: float | None = None
    """Best value of --metric_for_best so far."""
    best_step: int | None = None
    """Step at which it was reached."""
    best_checkpoint: str | None = None
    """Folder name of the checkpoint saved at the best step (never pruned)."""
    evals_without_improvement: int = 0
    """Evaluations since the last improvement (early stopping)."""
    num_processes: int = 1
    """World size of the run (the batch order depends on it)."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """Settings a resumed run must share (``config.resume_settings``)."""
    sums: LogSums = field(default_factory=LogSums)
    """The log's running sums (saved flat, next to the progress)."""

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of ``trainer_state.json``: progress and sums side by side."""
        progress = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sums"}
        return {**progress, **asdict(self.sums)}


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (plus a digest of a local training file)."""
    flat = cfg.to_dict()
    flat["learning_rate"] = cfg.learning_rate
    found = {k: flat[k] for k in resume_settings(cfg.method)}
    train_file = cfg.data.train_file
    if train_file and Path(train_file).is_file():
        found[DATA_DIGEST] = _sha256(Path(train_file))
    if cfg.method in ADAPTER_METHODS and Path(cfg.model.model_name_or_path).is_dir():
        # an adapter checkpoint holds the adapter only: resuming puts it on whatever base is at that path now
        found[BASE_DIGEST] = weights_digest(Path(cfg.model.model_name_or_path))
    return found


def weights_digest(folder: Path, blocks: int = 16, block_size: int = 1 << 16) -> str:
    """A cheap digest of a model folder's weights: each weight file's name and size, its first MiB (a safetensors
    header with every tensor's name, dtype, shape and offsets, then the first values) and ``blocks`` blocks spread
    evenly over the rest. Other weights at the same path almost surely differ in it; reads ~2 MB per file."""
    from dialogsum.modeling import weight_files

    digest = hashlib.sha256()
    for path in weight_files(folder):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
            for i in range(blocks):
                fh.seek((size - block_size) * i // max(blocks - 1, 1) if size > block_size else 0)
                digest.update(fh.read(block_size))
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# --------------------------------------------------------------------------------------------- finding


def checkpoint_root(cfg: Config) -> Path:
    """Where a run's checkpoints go and where ``latest`` looks: ``--checkpoint_dir``, else ``--output_dir``."""
    return Path(cfg.train.checkpoint_dir or cfg.train.output_dir or ".")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first: a ``trainer_state.json`` and every file it lists (a
    folder copied back in part, e.g. by a sync to object storage, is not complete; a file that is there but cut
    short is reported by :func:`check_checkpoint_files` instead)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file() and _all_files_there(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _all_files_there(checkpoint: Path) -> bool:
    """Whether the files listed in the checkpoint's state (``files``: name -> bytes) are all there. Checkpoints
    written before the list existed count as complete, and so does an unreadable state file (reported later)."""
    listed = (json_object_or_none(checkpoint / STATE_FILE) or {}).get(FILES_KEY)
    return not isinstance(listed, dict) or all((checkpoint / name).is_file() for name in listed)


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """Turn ``--resume_from_checkpoint`` (a path or ``latest``) into a checkpoint folder, checked.

    ``latest`` without any complete checkpoint gives None: the run starts from the beginning.
    """
    if not resume:
        return None
    if resume == "latest":
        # No checkpoint yet (first start, or killed before the first save completed): start from the beginning,
        # so the same command serves the first start and every restart (spot instances, SageMaker).
        # (whether the folder may be started afresh is run_folder.check_output_dir's decision)
        latest = find_latest(output_dir)
        if latest is not None:
            check_checkpoint_files(latest)
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint: {resume} is not a directory")
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint (no {STATE_FILE})")
    check_checkpoint_files(path)
    return path


def _damaged(checkpoint: Path, file: Path, reason: str) -> UserError:
    """The error for a checkpoint file that cannot be read, pointing to the previous complete checkpoint."""
    earlier = [d for d in checkpoint_dirs(checkpoint.parent) if d.resolve() != checkpoint.resolve()]
    earlier = [d for d in earlier if _step_of(d) < _step_of(checkpoint)]
    if earlier:
        advice = (
            f"the previous complete checkpoint is {earlier[-1]}: resume from it with --resume_from_checkpoint "
            f"{earlier[-1]} (or delete {checkpoint} and use latest)"
        )
    else:
        advice = f"there is no earlier checkpoint: delete {checkpoint} to start afresh"
    return UserError(f"checkpoint {checkpoint} is damaged: {file.name} is cut short or corrupt ({reason}); {advice}")


def _step_of(checkpoint: Path) -> int:
    match = _NAME.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def _file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be read (None if it looks whole); cheap: headers and indexes, not all data."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):  # parses the header, checks it covers the whole file
                pass
        elif magic == b"PK\x03\x04":  # torch.save's zip format (optimizer, scheduler, random states)
            zipfile.ZipFile(path).close()  # reads the central directory at the very end of the file
        elif magic[:1] == b"\x80":  # a plain pickle (rng_state_*.pkl)
            with open(path, "rb") as fh:
                pickle.load(fh)  # noqa: S301 - our own file, written by save_checkpoint
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - each reader has its own error types (SafetensorError, BadZipFile, ...)
        return str(exc).splitlines()[0][:200] or type(exc).__name__
    return None


def check_checkpoint_files(checkpoint: Path) -> None:
    """Refuse a checkpoint with a file cut short (a copy or disk problem), before anything is loaded."""
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        problem = _file_problem(path)
        if problem is not None:
            raise _damaged(checkpoint, path, problem)


def read_state(checkpoint: Path) -> TrainState:
    """Load ``trainer_state.json`` of a checkpoint (keys this version does not know are ignored)."""
    path = checkpoint / STATE_FILE
    data = read_json_object(path, "checkpoint state")
    values = {k: v for k, v in data.items() if k in _STATE_TYPES}
    for name, value in values.items():
        expected = _STATE_TYPES[name]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
            raise UserError(f"{path}: {name} is {json.dumps(value)[:60]}, expected {kinds}; the file is not this run's")
    sums = {f.name: values.pop(f.name) for f in fields(LogSums) if f.name in values}
    return TrainState(**values, sums=LogSums(**sums))


#: The JSON types of each key of ``trainer_state.json``, TrainState's and LogSums' fields (ints also read where
#: floats are expected).
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "best_metric": (int, float, type(None)),
    "best_step": (int, type(None)),
    "best_checkpoint": (str, type(None)),
    "fingerprint": (dict,),
    "elapsed_s": (int, float),
    **{
        name: (int,)
        for name in (
            "step",
            "epoch",
            "batches_in_epoch",
            "evals_without_improvement",
            "num_processes",
            "window_targets",
            "window_tokens",
            "window_samples",
            "total_targets",
            "total_tokens",
            "total_samples",
        )
    },
}


def settings_differences(saved: dict[str, Any], cfg: Config, then: str = "checkpoint") -> list[str]:
    """The settings of ``cfg`` that differ from a saved :func:`fingerprint` (``then``: what saved it)."""
    current = fingerprint(cfg)
    same_data = DATA_DIGEST in current and saved.get(DATA_DIGEST) == current[DATA_DIGEST]
    same_base = BASE_DIGEST in current and saved.get(BASE_DIGEST) == current[BASE_DIGEST]
    changed = {
        DATA_DIGEST: f"the content of --train_file {cfg.data.train_file} changed since the {then}",
        BASE_DIGEST: f"the weights at --model_name_or_path {cfg.model.model_name_or_path} changed since the {then} "
        "(the LoRA adapter was trained on the base model that was there then)",
    }
    older = older_checkpoint_values()
    return [
        changed.get(k) or f"{k}: {then} {saved.get(k, older.get(k))!r} vs now {v!r}"
        for k, v in current.items()
        if saved.get(k, older.get(k)) != v
        and not (k == "train_file" and same_data)  # the same data, moved: fine
        and not (k == "model_name_or_path" and same_base)  # the same base weights, moved: fine
        and not (k in changed and k not in saved)  # nothing to compare with
    ]


def check_compatible(state: TrainState, cfg: Config, num_processes: int, checkpoint: Path) -> None:
    """Refuse a checkpoint made with different method, model, data or batch settings, naming them."""
    diffs = settings_differences(state.fingerprint, cfg)
    if state.num_processes != num_processes:
        diffs.append(f"num_processes: checkpoint {state.num_processes} vs now {num_processes}")
    if diffs:
        raise UserError(f"cannot resume from {checkpoint}: settings differ ({'; '.join(diffs)})")


# --------------------------------------------------------------------------------------------- saving


def _trainable_names(model: torch.nn.Module) -> set[str] | None:
    """Names of the trainable parameters, or None when every parameter trains (nothing to leave out)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = any(not p.requires_grad for p in model.parameters())
    return names if frozen else None


def _save_trainable_only(models: list[torch.nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate save hook: keep only trainable tensors of models that have frozen parameters; a fully trained
    model whose loadable copy is already in the folder (:func:`save_checkpoint`) is not saved a second time."""
    if len(weights) != len(models):  # DeepSpeed/FSDP save their own weights; leave them alone
        return
    folder = Path(output_dir)
    loadable = (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    if len(models) == 1 and _trainable_names(models[0]) is None and loadable:
        weights.clear()
        write_json(folder / TRAINABLE_ONLY_FILE, {"0": LOADABLE_WEIGHTS})
        return
    reduced = {}
    for i, model in enumerate(models):
        names = _trainable_names(model)
        if names is None:
            continue
        weights[i] = {k: v for k, v in weights[i].items() if k in names}
        reduced[str(i)] = sorted(weights[i])
    if reduced:
        write_json(Path(output_dir) / TRAINABLE_ONLY_FILE, reduced)


def _load_trainable_only(models: list[torch.nn.Module], input_dir: str) -> None:
    """accelerate load hook: load trainable-only weights non-strictly (the frozen base is already in place)."""
    marker = Path(input_dir) / TRAINABLE_ONLY_FILE
    if not marker.is_file() or not models:
        return
    from safetensors.torch import load_file

    reduced = json.loads(marker.read_text())
    if reduced.get("0") == LOADABLE_WEIGHTS and len(models) == 1:
        _load_loadable_copy(models[0], Path(input_dir))
        models.clear()
        return
    for i, model in enumerate(models):
        if str(i) not in reduced:
            raise UserError(f"checkpoint {input_dir} holds partial weights for some models only; cannot load it")
        ending = f"_{i}" if i else ""
        tensors = load_file(str(Path(input_dir) / f"model{ending}.safetensors"))
        names = _trainable_names(model) or {n for n, _ in model.named_parameters()}
        current = model.state_dict()
        problems = [f"{n} missing" for n in sorted(names - set(tensors))]
        problems += [f"{n} unexpected" for n in sorted(set(tensors) - set(current))]
        problems += [
            f"{n} {tuple(t.shape)} vs {tuple(current[n].shape)}"
            for n, t in sorted(tensors.items())
            if n in current and t.shape != current[n].shape
        ]
        if problems:
            raise UserError(
                f"checkpoint {input_dir} does not match this model (e.g. {problems[0]}); "
                "were the LoRA settings or the model changed?"
            )
        model.load_state_dict(tensors, strict=False)
    models.clear()  # loaded here; accelerate must not load them again (strictly) from the reduced file


def _load_loadable_copy(model: torch.nn.Module, folder: Path) -> None:
    """Load a checkpoint's ``model.safetensors`` written by ``save_pretrained`` into the (possibly wrapped) model.

    ``save_pretrained`` stores a tensor shared by several names (T5's input embeddings) once; a name missing from
    the file is accepted only when it shares its tensor with a name that was loaded.
    """
    from safetensors.torch import load_file

    inner = getattr(model, "module", model)  # DDP wraps the model
    tensors = load_file(str(folder / "model.safetensors"))
    current = inner.state_dict()
    problems = [f"{n} unexpected" for n in sorted(set(tensors) - set(current))]
    problems += [
        f"{n} {tuple(t.shape)} vs {tuple(current[n].shape)}"
        for n, t in sorted(tensors.items())
        if n in current and t.shape != current[n].shape
    ]
    loaded = {current[n].data_ptr() for n in tensors if n in current}
    problems += [f"{n} missing" for n in sorted(set(current) - set(tensors)) if current[n].data_ptr() not in loaded]
    if problems:
        raise UserError(f"checkpoint {folder} does not match this model (e.g. {problems[0]}); was the model changed?")
    inner.load_state_dict(tensors, strict=False)


def install_checkpoint_hooks(accelerator: Any) -> None:
    """Make ``save_state``/``load_state`` store only trainable tensors of partly frozen models (idempotent)."""
    if getattr(accelerator, "_dialogsum_hooks", False):
        return
    accelerator.register_save_state_pre_hook(_save_trainable_only)
    accelerator.register_load_state_pre_hook(_load_trainable_only)
    accelerator._dialogsum_hooks = True


def _fsync_tree(directory: Path) -> None:
    """Flush every file of ``directory`` (and the folder itself) to disk before it is renamed into place."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def _remove(path: Path, suffix: str) -> None:
    """Delete a checkpoint folder by way of ``<name><suffix>`` (a leftover name that :func:`checkpoint_dirs`
    never takes for a checkpoint and the next run cleans up)."""
    trash = path.with_name(path.name + suffix)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    discard([path], trash)


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    state: TrainState,
    cfg: Config,
    *,
    process_state: dict[str, Any] | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    rng: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a complete checkpoint atomically; on failure (e.g. disk full) remove the partial folder.

    Every process must call this. ``process_state`` is this process's own loop state (e.g. its running loss
    sums), saved with its RNG states (``rng``, else the current ones: :func:`capture_rng`) and given back by
    :func:`load_process_state`. ``extra_files`` (name -> text) are written by the main process. With ``model``
    (the prepared model being trained) the checkpoint also holds it in loadable form, with ``tokenizer`` (the
    run's, loaded once by the recipe) and the generation config (:func:`dialogsum.modeling.save_model_files`). Raises
    :class:`UserError` when the checkpoint cannot be written; earlier checkpoints are untouched in that case.
    """
    if model is not None and tokenizer is None:
        raise ValueError("save_checkpoint: a checkpoint with the model needs its tokenizer")
    install_checkpoint_hooks(accelerator)
    root = Path(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f"checkpoint-{state.step}.tmp"
    try:
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        if model is not None:  # first: accelerate's save hook then leaves out a full model's second copy
            from dialogsum.modeling import save_model_files

            save_model_files(accelerator, model, tokenizer, tmp)
        accelerator.save_state(str(tmp))
        own = {"rng": rng or capture_rng(), "process": process_state or {}}
        write_bytes(_rng_file(tmp, accelerator.process_index), pickle.dumps(own))
        _fsync_tree(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            cfg.save(tmp / "config.yaml")
            for name, text in (extra_files or {}).items():
                write_text(tmp / name, text, sync=True)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            # last: its presence, with every file it lists, marks a complete folder
            write_json(tmp / STATE_FILE, {**state.to_json(), FILES_KEY: files}, sync=True)
            if final.exists():
                _remove(final, ".replaced")
            os.replace(tmp, final)
            _fsync_dir(root)
    except Exception as exc:  # noqa: BLE001 - write failures surface as OSError, RuntimeError (torch), ...
        latest = find_latest(root)
        # measured before the partial folder is removed: on a full disk, less room than one checkpoint is left
        free = shutil.disk_usage(root).free if root.is_dir() else None
        disk_full = free is not None and free < max(_folder_bytes(latest), 16 * 2**20)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if not (disk_full or _is_write_failure(exc)):
            raise
        if disk_full:
            reason = f"the disk is full ({free / 1e6:.1f} MB free)"
        else:
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200]
        kept = f"the latest complete checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
        raise UserError(
            f"could not write checkpoint {final}: {reason}; {kept}. Free some space (or lower "
            "--save_total_limit) and continue with --resume_from_checkpoint latest"
        ) from exc
    accelerator.wait_for_everyone()
    return final


def _folder_bytes(folder: Path | None) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder else 0


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from writing files (file too large, quota, permissions, I/O error)."""
    if isinstance(exc, OSError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(k in text for k in ("no space", "file too large", "disk quota", "i/o error", "write failed"))


def prune_checkpoints(output_dir: str | Path, keep: int | None, protect: str | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, never the ``protect``ed (best) one."""
    if not keep:
        return []
    dirs = checkpoint_dirs(output_dir)
    removable = [d for d in dirs[:-keep] if protect is None or d.name != Path(protect).name]
    for path in removable:
        _remove(path, ".deleting")
    return removable


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete partial folders left by a run killed while saving or deleting (``checkpoint-N.tmp`` etc.)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.is_dir() and _LEFTOVER.match(p.name)]
    for path in leftovers:
        logger.info("removing incomplete checkpoint folder %s (left by an interrupted run)", path)
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def diverged(where: str, step: int, checkpoint_dir: str | Path) -> UserError:
    """The error for a diverged run, naming the last good checkpoint."""
    latest = find_latest(checkpoint_dir)
    kept = (
        f"the last good checkpoint {latest} is intact (resume from it with a lower --learning_rate)"
        if latest
        else "no checkpoint was saved before this"
    )
    return UserError(f"{where} at step {step}: training diverged; lower --learning_rate or check the data; {kept}")


class Checkpointer:
    """Saves the training state when asked (at most once per step), never a diverged one, and prunes old ones.

    Checkpoints go to ``--checkpoint_dir`` (default ``--output_dir``). Each also holds the log history up to its
    step, so a restart that lost the output folder (a SageMaker spot restart) keeps the whole history.

    ``log`` is the loop's :class:`dialogsum.training.LogWindow` (its device sums are reduced and put into
    ``state.sums`` at each save), ``history`` its :class:`dialogsum.training.History` (``events`` copied into each
    checkpoint), ``timer`` notes each save's duration, and ``on_saved`` runs on the main process after each save
    (what else must outlive a kill: the trackers' buffered events, the output folder's manifest).
    """

    def __init__(
        self,
        accelerator: Any,
        *,
        cfg: Config,
        state: TrainState,
        model: torch.nn.Module,
        tokenizer: Any,
        log: Any,
        history: Any = None,
        timer: StopRequest | None = None,
        on_saved: Callable[[], None] | None = None,
        resumed: bool = False,
    ) -> None:
        self.accelerator, self.cfg, self.state, self.log = accelerator, cfg, state, log
        self.model, self.tokenizer = model, tokenizer  # saved loadable in each checkpoint
        self.params = [p for p in model.parameters() if p.requires_grad]  # checked finite before each save
        self.history, self.timer, self.on_saved = history, timer, on_saved
        self.root = checkpoint_root(cfg)
        self.last_saved = state.step if resumed else -1  # a resumed run's starting step has its checkpoint
        if accelerator.is_main_process:
            remove_leftovers(self.root)  # partial folders of a run killed while saving

    def save(self, rng: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint of the current step (every process calls this) and return its folder.

        ``rng``: this process's RNG states to store instead of the current ones (see
        :meth:`dialogsum.training.TrainBatches.unwind`).
        """
        accelerator, state, log = self.accelerator, self.state, self.log
        path = self.root / f"checkpoint-{state.step}"
        if state.step == self.last_saved:  # e.g. a best-metric save and a scheduled save at the same step
            return path
        started = time.perf_counter()
        # the window's losses and the weights themselves must be finite on every process (one all-reduce)
        finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
        samples = torch.tensor(float(log.samples), device=accelerator.device, dtype=torch.float64)
        sums = torch.stack([log.loss.double(), log.tokens.double(), samples, finite.double()])
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        if not math.isfinite(sums[0].item()):
            raise diverged("loss is not finite (not saving this state)", state.step, self.root)
        if sums[3].item() < accelerator.num_processes:
            raise diverged("weights are not finite (not saving this state)", state.step, self.root)
        own = log.save_to(state.sums, tokens=int(sums[1].item()), samples=int(sums[2].item()))
        extra = {HISTORY_FILE: jsonl_text(self.history.events)} if self.history is not None else None
        path = save_checkpoint(
            accelerator,
            self.root,
            state,
            self.cfg,
            process_state=own,
            model=self.model,
            tokenizer=self.tokenizer,
            rng=rng,
            extra_files=extra,
        )
        self.last_saved = state.step
        if accelerator.is_main_process:
            prune_checkpoints(self.root, self.cfg.train.save_total_limit, state.best_checkpoint)
            if self.on_saved is not None:
                self.on_saved()
        accelerator.wait_for_everyone()
        if self.timer is not None:
            self.timer.record("save", time.perf_counter() - started)
        logger.info("saved checkpoint %s", path)
        return path


# --------------------------------------------------------------------------------------------- loading


def start_or_resume(accelerator: Any, cfg: Config, scheduler: Any, checkpoint: Path | None) -> TrainState:
    """The loop's starting state: fresh, or restored from ``checkpoint`` (weights, optimizer, schedule, RNG).

    Call after ``accelerator.prepare``; the schedule, which is not prepared, is registered for checkpointing here.
    """
    accelerator.register_for_checkpointing(scheduler)
    if checkpoint is None:
        return TrainState(num_processes=accelerator.num_processes, fingerprint=fingerprint(cfg))
    state = load_checkpoint(accelerator, checkpoint)
    logger.info("resumed from %s at step %d (epoch %d)", checkpoint, state.step, state.epoch)
    return state


def load_checkpoint(accelerator: Any, checkpoint: Path) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from ``checkpoint``; return its loop counters."""
    install_checkpoint_hooks(accelerator)
    try:
        accelerator.load_state(str(checkpoint))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch, safetensors, pickle and DeepSpeed each raise their own types
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):  # name the damaged file if one is
            problem = _file_problem(path)
            if problem is not None:
                raise _damaged(checkpoint, path, problem) from exc
        if not isinstance(exc, (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)):
            raise
        raise UserError(f"cannot load checkpoint {checkpoint}: {str(exc).splitlines()[0][:300]}") from exc
    return read_state(checkpoint)


def load_best_model(accelerator: Any, cfg: Config, state: TrainState) -> Path | None:
    """``--load_best_model_at_end``: put the weights of the best checkpoint by ``--metric_for_best`` back into the
    model (every process calls this, after the loop), so that the final save and evaluation are of the best
    model. Nothing happens when the last step was the best. Returns the checkpoint loaded, or None.

    The whole training state is restored (``accelerator.load_state``: the one loader that also handles DeepSpeed
    and FSDP); nothing trains after it, so only the weights matter.
    """
    if not cfg.train.load_best_model_at_end or state.best_checkpoint is None or state.best_step == state.step:
        return None
    best = checkpoint_root(cfg) / state.best_checkpoint
    if not (best / STATE_FILE).is_file():
        raise UserError(f"--load_best_model_at_end: the best checkpoint {best} is missing; its weights are lost")
    load_checkpoint(accelerator, best)
    logger.info(
        "--load_best_model_at_end: the final model is %s (%s %.4f at step %d; training ran to step %d)",
        best.name,
        cfg.train.metric_for_best,
        state.best_metric,
        state.best_step,
        state.step,
    )
    return best


def _process_file(checkpoint: Path, rank: int) -> dict[str, Any]:
    path = _rng_file(checkpoint, rank)
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)  # noqa: S301 - our own file, written by save_checkpoint
    except Exception as exc:  # noqa: BLE001 - a cut file raises UnpicklingError, EOFError, ValueError, ...
        raise _damaged(checkpoint, path, str(exc).splitlines()[0][:200] or type(exc).__name__) from exc


def load_rng(checkpoint: Path, rank: int) -> None:
    """Restore this process's RNG states from a checkpoint (at the point of the loop where they were saved)."""
    saved = _process_file(checkpoint, rank)
    if "rng" in saved:
        restore_rng(saved["rng"])


def load_process_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    """This process's own loop state as given to :func:`save_checkpoint` (empty if none)."""
    return _process_file(checkpoint, rank).get("process", {})
