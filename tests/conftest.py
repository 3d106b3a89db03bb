"""Shared fixtures: tiny real models and tokenizers built locally, paths to ../shared.

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole test session. Non-fixture helpers
(paths, subprocess launches) live in ``helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import DIALOGSUM_DEV, FLAN_T5_BASE_DIR, REPO, SHARED, accelerate_launch, run_script, subprocess_env

__all__ = ["REPO", "SHARED", "accelerate_launch", "run_script", "subprocess_env"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
