"""The output folder of a run: what may be written where, checked before any expensive work.

A run never writes over its inputs (model, tokenizer, adapter, data) nor over another run's results unless
asked to, and the result files a person reads are listed here once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dialogsum.config import Config
from dialogsum.errors import UserError

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


def check_output_dir(cfg: Config, resuming: bool) -> Path:
    """Refuse to write into a non-empty output folder unless overwriting or resuming was asked for."""
    out = Path(cfg.train.output_dir or "")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not (cfg.train.overwrite_output_dir or resuming):
        raise UserError(
            f"--output_dir {out} is not empty; pass --overwrite_output_dir to write into it, or "
            "--resume_from_checkpoint latest to continue its run"
        )
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
