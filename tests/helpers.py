"""Test helpers: repository paths and real subprocess launches (no fixtures here; see conftest.py)."""

from __future__ import annotations

import hashlib
import os
import runpy
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FLAN_T5_BASE_DIR = SHARED / "models" / "flan-t5-base"
DIALOGSUM_DEV = SHARED / "data" / "dialogsum" / "dialogsum.dev.jsonl"
#: A test's process still running after this long is hung, not slow: a safety net only, never a speed check.
#: Tests assert what a process did, not how fast (CI's 2 cores may be shared with other work).
HANG_TIMEOUT_S = 900


def script_main(name: str) -> Callable[..., Any]:
    """The ``main`` of ``scripts/<name>.py``, loaded without running it (for in-process runs)."""
    return runpy.run_path(str(REPO / "scripts" / f"{name}.py"))["main"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for script subprocesses: offline, no W&B unless asked, repo importable."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": env.get("WANDB_MODE", "disabled"),
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra)
    return env


def run_script(
    args: list[str], timeout: int = HANG_TIMEOUT_S, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a command (e.g. ``accelerate launch ...`` or ``python scripts/x.py``), capturing text output."""
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env or subprocess_env(), cwd=str(cwd or REPO)
    )


def accelerate_launch(
    config: str, script: str, args: list[str], timeout: int = HANG_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_configs/<config> scripts/<script> <args>``."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / config),
        str(REPO / "scripts" / script),
        *args,
    ]
    return run_script(cmd, timeout=timeout, env=env)


# --------------------------------------------------------------------------------------------- file-system invariant


def _entry(path: Path) -> str:
    """What ``path`` is, not following links: a file's sha256, a link's target, a special file's kind (never
    opened: reading a FIFO would block), a folder."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return f"link -> {os.readlink(path)}"
    if stat.S_ISREG(info.st_mode):
        return "file " + hashlib.sha256(path.read_bytes()).hexdigest()
    if stat.S_ISDIR(info.st_mode):
        return "folder"
    if stat.S_ISFIFO(info.st_mode):
        return "fifo"
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        return f"device {os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    return f"special {stat.S_IFMT(info.st_mode):o}"


def snapshot_tree(roots: list[Path], may_write: list[Path]) -> dict[str, str]:
    """Every entry under ``roots`` (files by sha256, links by target, special files by kind), leaving out what a
    run may write: each path of ``may_write``, everything under it, and the hidden files a writer puts beside it
    while writing a file (``.<name>.*``: temporary copies, locks)."""
    skipped = {p.absolute() for p in may_write}
    beside = {(p.parent.absolute(), f".{p.name}.") for p in may_write}
    found: dict[str, str] = {}

    def visit(path: Path) -> None:
        absolute = path.absolute()
        if absolute in skipped or any(absolute.parent == d and path.name.startswith(n) for d, n in beside):
            return
        try:
            found[str(absolute)] = _entry(path)
        except FileNotFoundError:
            return  # removed while walking: a concurrent run's own temporary file
        if found[str(absolute)] == "folder":
            for child in sorted(path.iterdir()):
                visit(child)

    for root in roots:
        visit(root)
    return found


def tree_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """``created/removed/changed <path>`` for every difference between two snapshots."""
    changes = [f"removed {p}" for p in before if p not in after]
    changes += [f"created {p}" for p in after if p not in before]
    changes += [f"changed {p}" for p in before if p in after and before[p] != after[p]]
    return sorted(changes)
