"""Test helpers: repository paths and real subprocess launches (no fixtures here; see conftest.py)."""

from __future__ import annotations

import os
import runpy
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
