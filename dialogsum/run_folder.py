"""The output folder of a run: what may be written where, checked before any expensive work.

A run never writes over its inputs (model, tokenizer, adapter, data) nor over another run's results unless
asked to, and the result files a person reads are listed here once. :func:`check_output_dir` only looks (it
deletes nothing); :func:`start_output_dir` creates the folder once every check has passed and, with
``--overwrite_output_dir``, first clears what the previous run left there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from dialogsum.config import Config, build_config
from dialogsum.errors import UserError

logger = logging.getLogger(__name__)

#: The files of a finished run a person reads (not the weights); copied to SageMaker's output data folder.
RESULT_FILES = (
    "metrics.json",
    "predictions.jsonl",
    "log_history.jsonl",
    "config.yaml",
    "parameters.json",
    "report.md",
    "plots",
)
#: Kept with a training run's checkpoints (in ``--checkpoint_dir``, by default the output folder): the id of its
#: W&B run, which every restart continues, and the last step W&B is known to hold.
WANDB_RUN_FILE = "wandb_run.json"
#: Everything else a run writes at the top of its output folder: weights, model/adapter config, tokenizer,
#: model card, tracker files and the quick-start assets.
#: What a saved model or adapter folder holds at its top level: weights, configs, generation settings, tokenizer.
MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
)

RUN_FILES = (
    *RESULT_FILES,
    *MODEL_FILES,
    "README.md",
    "tensorboard",
    "wandb",
    WANDB_RUN_FILE,
    "quickstart_assets",
    "merged",
)
#: Names of run files that come in numbered series: checkpoints (also half-written or half-deleted ones) and
#: sharded weights.
RUN_FILE_PATTERN = re.compile(
    r"^(checkpoint-\d+(\.(tmp|deleting|replaced))?|model-\d+-of-\d+\.safetensors|pytorch_model.*\.bin)$"
)
#: What a run killed before its first checkpoint may have left (besides its config.yaml and parameters.json).
_TRANSIENT = re.compile(
    r"^(checkpoint-\d+\.(tmp|deleting|replaced)|tensorboard|wandb|wandb_run\.json|quickstart_assets|\.overwritten-.*"
    r"|\.dialogsum-probe-.*)$"
)
#: Where --overwrite_output_dir moves the previous run's files before deleting them.
_TRASH_PREFIX = ".overwritten-"


# --------------------------------------------------------------------------------------------- inputs


def input_paths(cfg: Config) -> list[tuple[str, Path]]:
    """``(flag, resolved path)`` of every local input of a run: model, tokenizer, adapter, data files or folder.

    Hub ids (no such local path) are not inputs on this disk.
    """
    candidates = (
        ("--model_name_or_path", cfg.model.model_name_or_path),
        ("--tokenizer_name", cfg.model.tokenizer_name),
        ("--adapter_path", cfg.model.adapter_path),
        ("--dataset_name", cfg.data.dataset_name),
        ("--train_file", cfg.data.train_file),
        ("--validation_file", cfg.data.validation_file),
        ("--test_file", cfg.data.test_file),
    )
    return [(flag, Path(value).resolve()) for flag, value in candidates if value and Path(value).exists()]


def check_not_an_input(target: str | Path, flag: str, inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output path that is, contains or sits inside any input (links resolved)."""
    resolved = Path(target).resolve()
    for input_flag, path in inputs:
        if resolved == path:
            relation = "is"
        elif path.is_relative_to(resolved):
            relation = "contains"
        elif resolved.is_relative_to(path):
            relation = "is inside"
        else:
            continue
        raise UserError(
            f"{flag} {target} {relation} the {input_flag} {path}: a run never writes where its inputs are; "
            f"choose another {flag}"
        )


# --------------------------------------------------------------------------------------------- writability


def check_can_create(target: str | Path, flag: str, kind: str = "folder") -> None:
    """Refuse a file or folder that could not be created (a path under a file, a read-only or virtual place).

    Tried for real: a temporary folder (or file, for ``kind="file"``) is made in the nearest existing parent
    and removed again.
    """
    path = Path(target).absolute()
    parent = path if kind == "folder" and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {target} cannot be created: {parent} is a file, not a folder")
    try:
        if kind == "folder":
            os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".dialogsum-probe-"))
        else:
            handle, probe = tempfile.mkstemp(dir=parent, prefix=".dialogsum-probe-")
            os.close(handle)
            os.unlink(probe)
    except OSError as exc:
        where = "written" if parent == path else "created"
        raise UserError(
            f"{flag} {target} cannot be {where}: making a {kind} in {parent} failed ({exc.strerror or exc})"
        ) from exc


# --------------------------------------------------------------------------------------------- checks


def check_output_dir(cfg: Config, resuming: bool, can_resume: bool = True) -> Path:
    """Check ``--output_dir`` before anything expensive; nothing is created or deleted here.

    Refused: a folder that is, contains or sits inside an input; one that cannot be created or written; a
    non-empty one, unless ``--overwrite_output_dir`` is given or the run continues from a checkpoint
    (``resuming``). ``--resume_from_checkpoint latest`` with no checkpoint yet starts afresh only in an empty
    folder or in the leftovers of this same run (same settings). ``can_resume`` says whether the script takes
    ``--resume_from_checkpoint`` (for the hint of the message).
    """
    t = cfg.train
    out = Path(t.output_dir or "")
    check_not_an_input(out, "--output_dir", input_paths(cfg))
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is a file")
    check_can_create(out, "--output_dir")
    if not out.is_dir() or not any(out.iterdir()):
        if t.resume_from_checkpoint == "latest":
            from dialogsum.checkpointing import checkpoint_root

            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s yet; starting afresh", checkpoint_root(cfg)
            )
        return out
    if t.overwrite_output_dir:
        resume = t.resume_from_checkpoint
        if resume and resume != "latest" and Path(resume).resolve().is_relative_to(out.resolve()):
            raise UserError(
                f"--overwrite_output_dir would delete --resume_from_checkpoint {resume}, which is inside "
                f"--output_dir {out}; pass only one of them"
            )
        return out
    if t.resume_from_checkpoint == "latest":
        from dialogsum.checkpointing import checkpoint_root, find_latest

        if find_latest(checkpoint_root(cfg)) is None:
            _check_leftovers_of_this_run(cfg, out)
            logger.warning(
                "--resume_from_checkpoint latest: no complete checkpoint in %s; starting afresh", checkpoint_root(cfg)
            )
        return out
    if resuming:
        return out
    hint = ", or --resume_from_checkpoint latest to continue its run" if can_resume else ""
    raise UserError(f"--output_dir {out} is not empty; pass --overwrite_output_dir to write into it{hint}")


def _check_leftovers_of_this_run(cfg: Config, out: Path) -> None:
    """``latest`` found no checkpoint: allow starting afresh only over what this same run left when killed."""
    advice = "pass --overwrite_output_dir to replace it, or choose another --output_dir"
    if (out / "metrics.json").exists():
        raise UserError(
            f"--output_dir {out} holds a finished run (metrics.json) and no checkpoint to continue from; "
            f"--resume_from_checkpoint latest would start afresh over it: {advice}"
        )
    saved = out / "config.yaml"
    if saved.is_file():
        differences = _settings_differences(saved, cfg)
        if differences:
            raise UserError(
                f"--output_dir {out} holds another run's files and no checkpoint to continue from (its "
                f"config.yaml differs: {'; '.join(differences[:3])}); {advice}"
            )
        return
    others = sorted(p.name for p in out.iterdir() if p.name != "parameters.json" and not _TRANSIENT.match(p.name))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise UserError(f"--output_dir {out} is not empty ({shown}) and holds no checkpoint to continue from; {advice}")


def _settings_differences(saved_config: Path, cfg: Config) -> list[str]:
    """How the run that wrote ``saved_config`` differs from ``cfg`` in the settings a resume must share."""
    import yaml

    from dialogsum.checkpointing import fingerprint, settings_differences

    try:
        values = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
        method = values.pop("method")
        saved = build_config(method, values)
    except Exception as exc:  # noqa: BLE001 - unreadable, or written by another version: not this run's
        return [f"it cannot be read as a config of this version ({str(exc).splitlines()[0][:120]})"]
    if saved.train.quickstart and cfg.train.quickstart:
        # a quick-start run points at the assets it generated in this folder; the same command regenerates them
        paths = ("dataset_name", "train_file", "validation_file", "test_file")
        saved = replace(
            saved,
            model=replace(saved.model, model_name_or_path=cfg.model.model_name_or_path),
            data=replace(saved.data, **{k: getattr(cfg.data, k) for k in paths}),
        )
    return settings_differences(fingerprint(saved), cfg, then="that run")


# --------------------------------------------------------------------------------------------- writing


def start_output_dir(cfg: Config) -> Path:
    """Create ``--output_dir`` (after :func:`check_output_dir` and every other cheap check).

    With ``--overwrite_output_dir`` the previous run's files (:data:`RUN_FILES`, checkpoints) are first moved
    aside into one hidden folder, each by an atomic rename, then deleted: ``--resume_from_checkpoint latest``
    only ever sees this run's checkpoints, and files that are not a run's are left alone. Only the main process
    (``RANK`` 0; the Accelerator may not exist yet) clears.
    """
    out = Path(cfg.train.output_dir or "")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.overwrite_output_dir and int(os.environ.get("RANK", "0") or 0) == 0:
        clear_previous_run(out)
    return out


def clear_previous_run(out: Path) -> list[str]:
    """Move a previous run's files out of ``out`` (atomic renames into a hidden folder), then delete them.

    Returns the names removed. A kill part-way leaves the hidden folder, which the next clearing deletes.
    """
    names = sorted(
        p.name
        for p in out.iterdir()
        if p.name in RUN_FILES or RUN_FILE_PATTERN.match(p.name) or p.name.startswith(_TRASH_PREFIX)
    )
    if not names:
        return []
    try:
        trash = Path(tempfile.mkdtemp(dir=out, prefix=_TRASH_PREFIX))
        for name in names:
            os.replace(out / name, trash / name)
    except OSError as exc:
        raise UserError(
            f"--overwrite_output_dir: could not move the previous run's files out of {out} "
            f"({exc.strerror or exc}: {exc.filename}); nothing of the new run was written"
        ) from exc
    shutil.rmtree(trash, ignore_errors=True)
    return names


def copy_results_for_sagemaker(out: Path) -> Path | None:
    """On SageMaker, also put the result files (not the weights) in ``SM_OUTPUT_DATA_DIR`` (output.tar.gz)."""
    target = os.environ.get("SM_OUTPUT_DATA_DIR")
    if not target or Path(target).resolve() == out.resolve():
        return None
    dest = Path(target)
    dest.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        src = out / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest / name)
    return dest
