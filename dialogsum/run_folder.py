"""The output folder of a run: who holds it, what the run wrote there, checked before any expensive work.

A run owns its output folder, and only what it wrote there:

* **Lock.** The main process holds an exclusive lock on the folder (``fcntl.flock`` on :data:`LOCK_FILE`, whose
  text names the holder: pid, host, start time, command) for its whole life. A second run into the same place is
  refused with one line naming the holder. The kernel drops the lock of a process that dies however it dies, so
  the lock file a killed run leaves behind is simply taken over by the next run.
* **Manifest.** :data:`MANIFEST_FILE` lists the top-level files and folders runs wrote in the folder.
  Everything that appears in the folder while a run holds it is that run's (the lock makes sure nobody else
  writes there meanwhile); names that were there before and are not in the manifest are a person's and are never
  recorded. ``--overwrite_output_dir`` removes exactly what the manifest lists (moved aside by atomic renames,
  then deleted), never matched by name. A non-empty folder without a manifest is not a run folder: refused.
* **Inputs.** The folder may not be, contain or sit inside any input of the run (model, tokenizer, adapter,
  data, ``--config``, a checkpoint of another folder being resumed).

:func:`check_output_dir` takes the lock and looks (it deletes nothing); :func:`start_output_dir` creates the
folder once every check has passed and, with ``--overwrite_output_dir``, first clears what the previous run
wrote. :func:`release_output_dirs` records the manifest and lets the lock go (``distributed.finish`` calls it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dialogsum.checkpointing import checkpoint_dirs, checkpoint_root, find_latest, fingerprint, settings_differences
from dialogsum.command import mask_secrets
from dialogsum.config import Config, build_config
from dialogsum.errors import UserError
from dialogsum.files import discard, write_json
from dialogsum.process import is_main_launch_process

logger = logging.getLogger(__name__)

#: The lock file of an output folder (a run's own bookkeeping: never listed as a user's file).
LOCK_FILE = ".dialogsum-lock"
#: The list of what runs wrote in an output folder.
MANIFEST_FILE = ".dialogsum-manifest.json"
MANIFEST_FORMAT = 1

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
#: What a run killed before its first checkpoint may have left (besides its config.yaml and parameters.json).
_TRANSIENT = re.compile(
    r"^(checkpoint-\d+\.(tmp|deleting|replaced)|tensorboard|wandb|wandb_run\.json|quickstart_assets)$"
)
#: Where --overwrite_output_dir moves the previous run's files before deleting them.
_TRASH_PREFIX = ".overwritten-"
#: Names of the folder's own bookkeeping: lock, manifest (and its temporary copy), probes, the trash being deleted.
_INTERNAL = re.compile(
    rf"^({re.escape(LOCK_FILE)}|{re.escape(MANIFEST_FILE)}|\.{re.escape(MANIFEST_FILE)}\..*\.tmp"
    rf"|\.dialogsum-probe-.*|{re.escape(_TRASH_PREFIX)}.*)$"
)


def is_internal(name: str) -> bool:
    """Whether ``name`` (top level of an output folder) is the folder's bookkeeping rather than a result."""
    return bool(_INTERNAL.match(name))


def folder_entries(out: Path) -> list[str]:
    """The names at the top of ``out`` that are not its bookkeeping (sorted; empty for a missing folder)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if not is_internal(p.name))


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} entries)" if len(names) > limit else shown


# --------------------------------------------------------------------------------------------- lock


@dataclass
class Lock:
    """An exclusive ``flock`` held on ``path`` by this process (open descriptor ``fd``)."""

    path: Path
    fd: int

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one can lock the old file), then let it go."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)


def holder_text(info: dict[str, Any] | None) -> str:
    """``pid 123 on host h since 2026-01-01 10:00:00 UTC (python scripts/train_full.py ...)``."""
    if not info:
        return "a process that did not say who it is"
    text = f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"
    return f"{text} ({info['command']})" if info.get("command") else text


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(lock_path: Path, target: str | Path, flag: str) -> Lock:
    """Take the exclusive lock ``lock_path`` for ``target`` or refuse with one line naming its holder.

    The holder's pid, host, start time and command are written into the lock file. A lock file left by a killed
    process is not locked any more (the kernel released it): it is taken over, and a line says so.
    """
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UserError(f"{flag} {target} cannot be locked: {exc.strerror or exc} ({lock_path})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{flag} {target} cannot be locked: {exc.strerror or exc}") from exc
            raise UserError(
                f"{flag} {target} is in use by another run: {holder_text(holder)}; wait for it to end or choose "
                f"another {flag}"
            ) from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file between our open and our lock: lock the new one
    previous = _read_holder(fd)
    if previous and (previous.get("host") != socket.gethostname() or not _pid_alive(previous.get("pid"))):
        logger.warning("%s %s: taking over the lock left by %s, which ended", flag, target, holder_text(previous))
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(mask_secrets([Path(sys.argv[0]).name, *sys.argv[1:]]))[:300],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    return Lock(lock_path, fd)


# --------------------------------------------------------------------------------------------- manifest


def read_manifest(out: Path) -> set[str] | None:
    """The names the manifest of ``out`` lists, or None when it has none; a damaged one is an error."""
    path = out / MANIFEST_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["entries"]
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError("entries is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"--output_dir {out}: its {MANIFEST_FILE} (the list of what runs wrote there) cannot be read "
            f"({exc}); remove the folder's contents yourself or choose another --output_dir"
        ) from exc
    # only plain names at the top of this folder: never a path leading elsewhere
    return {e for e in entries if e and "/" not in e and "\\" not in e and e not in (".", "..") and not is_internal(e)}


@dataclass
class RunFolder:
    """An output folder held by this process: its lock and what it holds of runs (the manifest)."""

    out: Path
    flag: str
    lock: Lock
    created: bool
    """The folder did not exist before this run (removed again when the run leaves nothing in it)."""
    found: set[str]
    """Names in the folder when the run took it that are not runs' (a person's): never recorded."""
    owned: set[str] = field(default_factory=set)
    """What the manifest lists: the previous runs' entries still there, and this run's."""
    has_manifest: bool = False
    cleared: bool = False
    claimed: bool = True
    """The folder is this run's to write (empty, or a run folder): only then is a manifest written."""

    def record(self) -> None:
        """Add what appeared in the folder since the run took it to the manifest (written atomically)."""
        if not self.claimed or not self.out.is_dir():
            return
        now = set(folder_entries(self.out))
        owned = (self.owned | (now - self.found)) & now
        if owned == self.owned and self.has_manifest:
            return
        self.owned = owned
        write_json(
            self.out / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "written_by": "dialogsum", "entries": sorted(owned)}
        )
        self.has_manifest = True

    def clear_previous(self) -> list[str]:
        """Move what the manifest lists out of the folder (atomic renames into a hidden folder), then delete it.

        Returns the names removed. A kill part-way leaves the hidden folder, which the next clearing deletes.
        """
        if self.cleared:
            return []
        self.cleared = True
        names = sorted(name for name in self.owned if (self.out / name).exists() or (self.out / name).is_symlink())
        trash_left = [p.name for p in self.out.iterdir() if p.name.startswith(_TRASH_PREFIX)]
        if not names and not trash_left:
            return []
        trash = Path(tempfile.mkdtemp(dir=self.out, prefix=_TRASH_PREFIX))
        try:
            discard([self.out / name for name in [*names, *trash_left]], trash)
        except OSError as exc:
            raise UserError(
                f"--overwrite_output_dir: could not move the previous run's files out of {self.out} "
                f"({exc.strerror or exc}: {exc.filename}); nothing of the new run was written"
            ) from exc
        self.owned.clear()
        self.found -= set(names)
        self.record()  # the manifest lists nothing of the previous run any more
        return names

    def move_in(self, built: Path) -> None:
        """Replace the previous run's entries by the entries of the finished folder ``built`` (renamed in one by
        one; weights last, so a kill part-way leaves no loadable half model), then remove ``built``."""
        names = sorted(p.name for p in built.iterdir())
        names.sort(key=lambda name: name.endswith(".safetensors"))
        persons = [name for name in names if name in self.found]
        if persons:
            raise UserError(
                f"{self.flag} {self.out} holds {_listing(persons)}, which no run wrote and this one would replace; "
                f"move it away or choose another {self.flag}"
            )
        self.clear_previous()
        for name in names:
            os.replace(built / name, self.out / name)
        built.rmdir()
        self.record()

    def release(self) -> None:
        """Record the manifest and let the lock go; a folder this run created and left empty is removed."""
        try:
            self.record()
            empty = self.created and not folder_entries(self.out)
            if empty:
                (self.out / MANIFEST_FILE).unlink(missing_ok=True)
        except OSError:
            empty = False
        self.lock.release()
        if empty:
            try:
                self.out.rmdir()
            except OSError:
                pass  # something arrived meanwhile: leave it


#: The output folders (and files) this process holds, by resolved path.
_HELD: dict[Path, RunFolder | Lock] = {}


def take_output_dir(out: str | Path, flag: str = "--output_dir") -> RunFolder | None:
    """Lock ``out`` for this run (main process only; created if missing) and read its manifest.

    Taking a folder this process already holds returns the same :class:`RunFolder`. Other processes of a launch
    get None: the main process alone holds the folder and writes the manifest.
    """
    if not is_main_launch_process():
        return None
    path = Path(out)
    key = path.resolve()
    held = _HELD.get(key)
    if isinstance(held, RunFolder):
        return held
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {out} cannot be created: {exc.strerror or exc}") from exc
    lock = acquire_lock(path / LOCK_FILE, out, flag)
    try:
        manifest = read_manifest(path)
    except UserError:
        lock.release()
        raise
    entries = set(folder_entries(path))
    owned = (manifest or set()) & entries
    folder = RunFolder(path, flag, lock, created, found=entries - owned, owned=owned, has_manifest=manifest is not None)
    folder.claimed = manifest is not None or not entries  # a person's folder is never made a run folder
    _HELD[key] = folder
    if not entries and manifest is None:
        folder.record()  # an empty folder: from now on it is a run folder
    return folder


def check_folder_contents(out: Path, overwrite: bool, flag: str = "--output_dir") -> None:
    """A folder may be written when it is empty, or a run folder (manifest) and ``overwrite`` is given."""
    entries = folder_entries(out)
    if not entries:
        return
    if read_manifest(out) is None:
        raise UserError(
            f"{flag} {out} is not empty and is not a run folder (no {MANIFEST_FILE}: a run only ever writes into "
            f"an empty folder or its own): it holds {_listing(entries)}; choose another {flag}"
        )
    if not overwrite:
        raise UserError(f"{flag} {out} is not empty; pass --overwrite_output_dir to replace the run in it")


def take_output_file(target: str | Path, flag: str = "--output_file") -> Lock | None:
    """Lock one output file for this run: ``.<name>.dialogsum-lock`` beside it (removed on release)."""
    if not is_main_launch_process():
        return None
    path = Path(target)
    key = path.absolute()
    held = _HELD.get(key)
    if isinstance(held, Lock):
        return held
    lock = acquire_lock(path.parent / f".{path.name}{LOCK_FILE}", target, flag)
    _HELD[key] = lock
    return lock


def held_folder(out: str | Path) -> RunFolder | None:
    """The :class:`RunFolder` this process holds for ``out``, if any."""
    held = _HELD.get(Path(out).resolve())
    return held if isinstance(held, RunFolder) else None


def record_outputs() -> None:
    """Update the manifest of every folder this process holds (after a checkpoint, after the results)."""
    for held in list(_HELD.values()):
        if isinstance(held, RunFolder):
            held.record()


def release_output_dirs() -> None:
    """Record the manifests and release every folder and file this process holds (idempotent)."""
    while _HELD:
        _, held = _HELD.popitem()
        held.release()


# --------------------------------------------------------------------------------------------- inputs


def input_paths(cfg: Config) -> list[tuple[str, Path]]:
    """``(flag, resolved path)`` of every local input of a run: model, tokenizer, adapter, data files or folder,
    the ``--config`` file, and a checkpoint being resumed that is not one of this run's own.

    Hub ids (no such local path) are not inputs on this disk.
    """
    candidates = [
        ("--model_name_or_path", cfg.model.model_name_or_path),
        ("--tokenizer_name", cfg.model.tokenizer_name),
        ("--adapter_path", cfg.model.adapter_path),
        ("--dataset_name", cfg.data.dataset_name),
        ("--train_file", cfg.data.train_file),
        ("--validation_file", cfg.data.validation_file),
        ("--test_file", cfg.data.test_file),
        ("--config", cfg.config_file),
    ]
    resume = cfg.train.resume_from_checkpoint
    if resume and resume != "latest" and not resumes_own_checkpoint(cfg):
        candidates.append(("--resume_from_checkpoint", resume))
    return [(flag, Path(value).resolve()) for flag, value in candidates if value and Path(value).exists()]


def resumes_own_checkpoint(cfg: Config) -> bool:
    """Whether the run continues from a checkpoint of its own checkpoint folder (``latest``, or a path inside
    ``--checkpoint_dir``/``--output_dir``) rather than from another run's checkpoint."""
    resume = cfg.train.resume_from_checkpoint
    if not resume:
        return False
    if resume == "latest":
        return True
    return Path(resume).resolve().parent == Path(checkpoint_root(cfg)).resolve()


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


def check_checkpoint_dir(cfg: Config) -> None:
    """A ``--checkpoint_dir`` apart from ``--output_dir``: not an input, creatable, and holding no checkpoints of
    an earlier run unless this run continues from them (``--overwrite_output_dir`` clears ``--output_dir`` only)."""
    t = cfg.train
    if not t.checkpoint_dir or Path(t.checkpoint_dir).resolve() == Path(t.output_dir or ".").resolve():
        return
    root = Path(t.checkpoint_dir)
    check_not_an_input(root, "--checkpoint_dir", input_paths(cfg))
    if root.exists() and not root.is_dir():
        raise UserError(f"--checkpoint_dir {root} exists and is a file")
    check_can_create(root, "--checkpoint_dir")
    found = checkpoint_dirs(root)
    if found and not t.resume_from_checkpoint:
        raise UserError(
            f"--checkpoint_dir {root} holds checkpoints of an earlier run (newest {found[-1].name}); continue it "
            "with --resume_from_checkpoint latest, or choose another --checkpoint_dir"
        )


def check_output_dir(cfg: Config, can_resume: bool = True) -> Path:
    """Check ``--output_dir`` before anything expensive and take its lock; nothing is deleted here.

    Refused: a folder that is, contains or sits inside an input; one that cannot be created or written; one
    another run holds; a non-empty one that is not a run folder (no manifest: whatever the flags); a non-empty
    run folder, unless ``--overwrite_output_dir`` is given or the run continues from one of its own checkpoints
    (a checkpoint elsewhere is an input, never a reason to write into a used folder). ``--resume_from_checkpoint
    latest`` with no checkpoint yet starts afresh only in an empty folder or in the leftovers of this same run
    (same settings). ``can_resume`` says whether the script takes ``--resume_from_checkpoint`` (for the hint).
    """
    t = cfg.train
    out = Path(t.output_dir or "")
    check_not_an_input(out, "--output_dir", input_paths(cfg))
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is a file")
    check_can_create(out, "--output_dir")
    folder = take_output_dir(out)
    try:
        _check_contents(cfg, out, can_resume)
    except BaseException:
        if folder is not None:
            release_output_dirs()
        raise
    return out


def _check_contents(cfg: Config, out: Path, can_resume: bool) -> None:
    """What may be in ``out`` for this run (see :func:`check_output_dir`)."""
    t = cfg.train
    entries = folder_entries(out)
    if not entries:
        if t.resume_from_checkpoint == "latest":
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s yet; starting afresh", checkpoint_root(cfg)
            )
        return
    if read_manifest(out) is None:
        check_folder_contents(out, overwrite=True)  # refused: not a run folder
    if t.overwrite_output_dir:
        resume = t.resume_from_checkpoint
        if resume and resume != "latest" and Path(resume).resolve().is_relative_to(out.resolve()):
            raise UserError(
                f"--overwrite_output_dir would delete --resume_from_checkpoint {resume}, which is inside "
                f"--output_dir {out}; pass only one of them"
            )
        return
    if t.resume_from_checkpoint == "latest":
        if find_latest(checkpoint_root(cfg)) is None:
            _check_leftovers_of_this_run(cfg, out)
            _adopt_leftovers(out)
            logger.warning(
                "--resume_from_checkpoint latest: no complete checkpoint in %s; starting afresh", checkpoint_root(cfg)
            )
        return
    if resumes_own_checkpoint(cfg):
        return
    hint = ", or --resume_from_checkpoint latest to continue its run" if can_resume else ""
    elsewhere = (
        " (resuming from a checkpoint of another folder starts a new run here)" if t.resume_from_checkpoint else ""
    )
    raise UserError(
        f"--output_dir {out} is not empty{elsewhere}; pass --overwrite_output_dir to replace the run in it{hint}"
    )


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
    others = [name for name in folder_entries(out) if name != "parameters.json" and not _TRANSIENT.match(name)]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise UserError(f"--output_dir {out} is not empty ({shown}) and holds no checkpoint to continue from; {advice}")


def _adopt_leftovers(out: Path) -> None:
    """The leftovers of this same run killed before it recorded them (settings, half-saved checkpoints, tracker
    files) are the run's: listed in the manifest from now on, so that ``--overwrite_output_dir`` clears them."""
    folder = held_folder(out)
    if folder is None:
        return
    leftovers = {n for n in folder.found if n in ("config.yaml", "parameters.json") or _TRANSIENT.match(n)}
    folder.found -= leftovers
    folder.owned |= leftovers


def _settings_differences(saved_config: Path, cfg: Config) -> list[str]:
    """How the run that wrote ``saved_config`` differs from ``cfg`` in the settings a resume must share."""
    import yaml

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

    With ``--overwrite_output_dir`` what the manifest lists (the previous run's files, checkpoints) is first
    moved aside into one hidden folder, each by an atomic rename, then deleted: ``--resume_from_checkpoint latest``
    only ever sees this run's checkpoints, and files that are not a run's are left alone. Only the main process
    (``RANK`` 0; the Accelerator may not exist yet) clears and records.
    """
    out = Path(cfg.train.output_dir or "")
    out.mkdir(parents=True, exist_ok=True)
    folder = take_output_dir(out)
    if folder is not None:
        if cfg.train.overwrite_output_dir:
            folder.clear_previous()
        folder.record()
    return out


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
