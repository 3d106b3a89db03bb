"""This process's place in a launch, read from the launcher's environment: usable before the Accelerator exists
(flag checks, logging set-up, output-folder locks, signal handlers). No imports beyond the standard library."""

from __future__ import annotations

import os


def launch_rank() -> int:
    """The global rank the launcher (``accelerate launch``, torchrun, SLURM through either) gave this process:
    ``RANK``, else ``LOCAL_RANK``, else 0 for a plain ``python script.py``."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                return 0  # not a launcher's value: treat the process as a single one
    return 0


def is_main_launch_process() -> bool:
    """Whether this is the launch's main process (rank 0), the one that prints, warns and owns the output."""
    return launch_rank() == 0
