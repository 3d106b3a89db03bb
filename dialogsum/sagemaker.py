"""SageMaker training jobs: the defaults its environment supplies (output folder, data channels, checkpoints
synced to S3 and restored on a spot restart) and the checks of its channels. Used by the settings layer."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from dialogsum.errors import ConfigError
from dialogsum.files import SUPPORTED_EXTENSIONS, table_format

#: Where SageMaker keeps checkpoints: synced to the estimator's ``checkpoint_s3_uri`` while the job runs and
#: restored from it when a spot job restarts (its ``checkpoint_local_path`` default).
SAGEMAKER_CHECKPOINT_DIR = "/opt/ml/checkpoints"


def on_sagemaker() -> bool:
    """Whether this process runs inside a SageMaker training job (its environment variables are set)."""
    return bool(os.environ.get("SM_MODEL_DIR") or os.environ.get("SM_TRAINING_ENV"))


def sagemaker_defaults(given: Collection[str] = ()) -> dict[str, Any]:
    """On SageMaker, its standard environment variables supply output and data paths; checkpoints go to
    :data:`SAGEMAKER_CHECKPOINT_DIR` and a restarted job continues from the newest one there (``latest``).
    Channels of the settings in ``given`` (set explicitly) are not looked at."""
    defaults: dict[str, Any] = {}
    if on_sagemaker():
        defaults.update(checkpoint_dir=SAGEMAKER_CHECKPOINT_DIR, resume_from_checkpoint="latest")
    if os.environ.get("SM_MODEL_DIR"):
        defaults["output_dir"] = os.environ["SM_MODEL_DIR"]
    for channel, key in (("TRAIN", "train_file"), ("VALIDATION", "validation_file"), ("TEST", "test_file")):
        directory = os.environ.get(f"SM_CHANNEL_{channel}")
        if directory and key not in given:
            defaults[key] = _channel_file(f"SM_CHANNEL_{channel}", directory)
    return defaults


def check_sagemaker_channels(evaluates_test: bool, data_files: dict[str, str | None]) -> None:
    """On SageMaker, evaluating on the test split needs a ``test`` channel when the data come from channels.

    ``evaluates_test``: the run evaluates on ``--eval_split test``; ``data_files``: its ``train``, ``validation``
    and ``test`` files. Without a test file, the default ``--eval_split test`` would have nothing to read; say
    which hyperparameter fixes it.
    """
    if not on_sagemaker() or not evaluates_test or data_files.get("test"):
        return
    if not (data_files.get("train") or data_files.get("validation")):
        return  # --dataset_name: its test split
    channels = [c.lower() for c in ("TRAIN", "VALIDATION", "TEST") if os.environ.get(f"SM_CHANNEL_{c}")]
    raise ConfigError(
        f"SageMaker: --eval_split test (the default) needs a 'test' channel and this job has "
        f"{', '.join(channels) or 'no'} channel(s) only; set the hyperparameter eval_split='validation' to evaluate "
        "on the validation channel, or pass a 'test' channel to fit()"
    )


def _channel_file(variable: str, directory: str) -> str:
    """The data file of a SageMaker channel folder: the first one (by name) of a format the project reads.

    A channel without such a file is an error: the run must not fall back silently to another dataset.
    """
    try:
        entries = sorted(p for p in Path(directory).iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise ConfigError(f"{variable}={directory}: cannot list the channel folder ({exc.strerror or exc})") from exc
    files = [p for p in entries if p.is_file() and table_format(p) is not None]
    if not files:
        found = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "") or "nothing"
        raise ConfigError(
            f"{variable}={directory} holds no data file this project reads (found: {found}); give the channel "
            f"a {', '.join(SUPPORTED_EXTENSIONS)} file"
        )
    return str(files[0])
