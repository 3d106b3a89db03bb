"""Shared fixtures: tiny real models and tokenizers built locally, paths to ../shared, subprocess helpers.

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FLAN_T5_BASE_DIR = SHARED / "models" / "flan-t5-base"
DIALOGSUM_DEV = SHARED / "data" / "dialogsum" / "dialogsum.dev.jsonl"


@pytest.fixture(scope="session")
def quickstart_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model_dir, data_dir): the tiny random T5 + word tokenizer + synthetic jsonl splits, built once."""
    from dialogsum.quickstart import build_quickstart_assets

    return build_quickstart_assets(tmp_path_factory.mktemp("quickstart"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(quickstart_assets: tuple[Path, Path]) -> Path:
    """Directory of the tiny random T5 (config, safetensors weights, tokenizer)."""
    return quickstart_assets[0]


@pytest.fixture(scope="session")
def synthetic_data_dir(quickstart_assets: tuple[Path, Path]) -> Path:
    """Directory with train.jsonl / validation.jsonl / test.jsonl of synthetic dialogues."""
    return quickstart_assets[1]


@pytest.fixture(scope="session")
def flan_t5_base_dir() -> Path:
    """The real flan-t5-base config + tokenizer (no weights) from ../shared; skipped when absent."""
    if not (FLAN_T5_BASE_DIR / "config.json").is_file():
        pytest.skip("../shared/models/flan-t5-base is not available")
    return FLAN_T5_BASE_DIR


@pytest.fixture(scope="session")
def dialogsum_dev() -> Path:
    """500 real DialogSum rows from ../shared; skipped when absent."""
    if not DIALOGSUM_DEV.is_file():
        pytest.skip("../shared/data/dialogsum/dialogsum.dev.jsonl is not available")
    return DIALOGSUM_DEV


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
    args: list[str], timeout: int = 600, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run a command (e.g. ``accelerate launch ...`` or ``python scripts/x.py``), capturing text output."""
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=env or subprocess_env(), cwd=str(cwd or REPO)
    )


def accelerate_launch(
    config: str, script: str, args: list[str], timeout: int = 600, env: dict[str, str] | None = None
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
