"""Shared fixtures: tiny real models and tokenizers built locally, paths to ../shared.

Nothing here touches the network: HF_HUB_OFFLINE is set for the whole test session. Non-fixture helpers
(paths, subprocess launches) live in ``helpers.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import DIALOGSUM_DEV, FLAN_T5_BASE_DIR, REPO, SHARED, accelerate_launch, run_script, subprocess_env


@pytest.fixture(autouse=True)
def _denormals_restored() -> object:
    """A test that builds the Accelerator in this process leaves denormals flushed to zero (the project's CPU
    runtime setting, for the training process it is): every later test would then run in a process with
    non-IEEE floats (hypothesis refuses to generate floats there). Put the default back after each test."""
    yield
    torch.set_flush_denormal(False)

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


@pytest.fixture
def fresh_accelerate_state():
    """Tests that build an Accelerator in-process: forget accelerate's singleton state before and after."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine are ~50x slower)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # also tells build_accelerator the count was chosen
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> Path:
    """The quick-start tiny T5 trained for 30 steps of 8 examples (one thread, ~1 s) so that it writes words.

    The model picks up the summary templates but is far from perfect, so ROUGE is informative (neither 0 nor
    1). Plain torch: this is a test asset, not the training under test.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dialogsum.config import LAB_PROMPT

    model_dir, data_dir = quickstart_assets
    output_dir = tmp_path_factory.mktemp("trained_tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(30):
        batch = [rows[(step * 8 + i) % len(rows)] for i in range(8)]
        prompts = [LAB_PROMPT.format(dialogue=r["dialogue"]) for r in batch]
        inputs = tokenizer(prompts, padding=True, return_tensors="pt")
        labels = tokenizer([r["summary"] for r in batch], padding=True, return_tensors="pt").input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    return output_dir


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The quick-start tiny T5 with dropout switched on (so the RNG matters for exact-resume tests)."""
    import shutil

    model = tmp_path_factory.mktemp("dropout") / "tiny-t5-dropout"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["dropout_rate"] = 0.1
    (model / "config.json").write_text(json.dumps(config, indent=2))
    return model
