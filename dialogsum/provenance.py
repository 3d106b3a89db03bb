"""Where a result comes from: the command that launched the run, the code's git commit, package versions, and the
launch topology. Written to ``metrics.json`` and logged with every tracked run's config."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dialogsum.command import mask_secrets
from dialogsum.config import Config
from dialogsum.distributed import launcher_command

#: Packages whose versions are logged with every run (absent ones are skipped).
TRACKED_PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "deepspeed", "wandb")

#: How a parent process that started this one as a worker of torch's elastic launcher is called.
_TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def launch_command() -> list[str] | None:
    """The real command that launched this process: ``accelerate launch ...`` or ``torchrun ...`` (the parent's
    command line, launcher first), or None when neither started it (a plain ``python script.py``)."""
    accelerate_args = launcher_command()
    if accelerate_args is not None:
        return ["accelerate", "launch", *accelerate_args]
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        import psutil

        argv = psutil.Process(os.getppid()).cmdline()
    except Exception:  # noqa: BLE001 - no psutil, no /proc: we know only that torch's launcher started us
        return None
    for i, arg in enumerate(argv):
        if os.path.basename(arg) == "torchrun":
            return ["torchrun", *argv[i + 1 :]]
        if arg in _TORCHRUN_MODULES and i > 0 and argv[i - 1] == "-m":
            return ["python", "-m", arg, *argv[i + 1 :]]
    return None


#: Environment variables that say where in a multi-process, multi-machine job a process runs.
LAUNCH_VARIABLES = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_ID",
    "SLURM_NNODES",
    "SLURM_NODEID",
    "SM_CURRENT_HOST",
)


def launch_environment() -> dict[str, str]:
    """The launch variables of :data:`LAUNCH_VARIABLES` that are set (the main process's view)."""
    return {name: os.environ[name] for name in LAUNCH_VARIABLES if os.environ.get(name)}


def git_info(directory: str | Path | None = None) -> dict[str, Any]:
    """``{"git_commit", "git_dirty"}`` of the repository holding the code; empty outside a git checkout."""
    where = Path(directory) if directory is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


def package_versions(packages: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (missing ones are left out), plus Python's."""
    versions = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def topology(accelerator: Any) -> dict[str, Any]:
    """Where and how this run executes (from the accelerate config and launcher): processes, distributed type,
    precision, this process's index and device; logged with the run config and written to ``metrics.json``."""
    distributed = accelerator.distributed_type
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": getattr(distributed, "value", str(distributed)),
        "mixed_precision": str(accelerator.mixed_precision),
        "process_index": accelerator.process_index,
        "device": str(accelerator.device),
        "device_type": accelerator.device.type,
    }


def provenance(cfg: Config) -> dict[str, Any]:
    """Where a result comes from, for ``metrics.json``: the command line (the ``accelerate launch`` or ``torchrun``
    command when a launcher started this process; secrets masked), the git commit of the code (+ dirty flag), the
    package versions and the launch variables (world size, node rank, SLURM job, ...)."""
    launched = launch_command()  # accelerate launch ... / torchrun ...
    command = shlex.join(mask_secrets(launched)) if launched else cfg.command
    provenance = {"command": command, **git_info(), "package_versions": package_versions()}
    return {**provenance, "launch_environment": launch_environment()}
