"""Token-budget batches (``--max_tokens_per_batch``) through the real training script.

Setup: 40 training rows of the quick-start data, 64/24 tokens, length buckets on, a budget of 256 padded tokens
(2 or 3 examples per batch; 16 batches in epoch 0, 18 in epoch 1), 2 micro-batches per optimizer step, 2 epochs.
The tiny T5 has dropout 0.1, so a slip in the resumed RNG state changes the weights.

* The planned number of optimizer steps is exactly what two epochs take: the run ends on the last batch of
  epoch 2 (the log's last ``epoch`` is 2.0), with as many steps as the sampler's batches say.
* A run resumed from a copy of a mid-epoch checkpoint ends bit for bit where the uninterrupted one did.
* Two gloo processes (slow): accelerate's sharder deals the different-sized batches out evenly; planned steps
  match again and a resumed run is bit for bit the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, accelerate_launch, run_script, subprocess_env
from safetensors.torch import load_file

from dialogsum.checkpointing import STATE_FILE
from dialogsum.config import DataArguments
from dialogsum.data import LengthGroupedBatchSampler, PadWidths, TokenBudget, read_rows, tokenize_rows
from dialogsum.modeling import load_tokenizer

SETTINGS = {
    "max_train_samples": "40",
    "max_source_length": "64",
    "max_target_length": "24",
    "max_tokens_per_batch": "256",
    "length_buckets": "on",
    "gradient_accumulation_steps": "2",
    "num_train_epochs": "2",
    "logging_steps": "2",
    "learning_rate": "3e-3",
    "report_to": "none",
    "do_eval": "false",
}
LOG_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm")


def _args(model: Path, data: Path, out: Path, *extra: str, **flags: str) -> list[str]:
    settings = {
        "model_name_or_path": str(model),
        "train_file": str(data / "train.jsonl"),
        "output_dir": str(out),
        **SETTINGS,
        **flags,
    }
    return [*(a for k, v in settings.items() for a in (f"--{k}", v)), *extra]


def _env() -> dict[str, str]:
    return subprocess_env(OMP_NUM_THREADS="1")  # a tiny model runs fastest on one thread


def _train(model: Path, data: Path, out: Path, *extra: str, **flags: str) -> None:
    cmd = [sys.executable, str(REPO / "scripts" / "train_full.py"), *_args(model, data, out, *extra, **flags)]
    proc = run_script(cmd, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]


def _launch_two(model: Path, data: Path, out: Path, *extra: str, **flags: str) -> None:
    args = _args(model, data, out, *extra, **flags)
    proc = accelerate_launch("multi_cpu.yaml", "train_full.py", args, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]


def _sampler(model: Path, data: Path) -> LengthGroupedBatchSampler:
    """The sampler the run builds (same rows, tokenization, buckets and budget)."""
    args = DataArguments(max_source_length=64, max_target_length=24)
    rows = read_rows(data / "train.jsonl")[:40]
    dataset, _ = tokenize_rows(rows, load_tokenizer(str(model)), args)
    src, tgt = [len(x) for x in dataset.input_ids], [len(x) for x in dataset.labels]
    budget = TokenBudget(256, src, tgt, PadWidths.bucketed(64, 24))
    return LengthGroupedBatchSampler(dataset.lengths(), 8, seed=42, budget=budget)


def _expected_steps(sampler: LengthGroupedBatchSampler, processes: int) -> int:
    return sum(math.ceil(math.ceil(sampler.num_batches(e) / processes) / 2) for e in (0, 1))


def _log(out: Path) -> list[dict]:
    events = map(json.loads, (out / "log_history.jsonl").read_text().splitlines())
    return [{k: e.get(k) for k in LOG_KEYS} for e in events]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _log(a) == _log(b)
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    assert ma["train_loss"] == mb["train_loss"] and ma["train_steps"] == mb["train_steps"]


def test_budget_batches_differ_in_size(dropout_model: Path, synthetic_data_dir: Path) -> None:
    sampler = _sampler(dropout_model, synthetic_data_dir)
    assert len({len(b) for e in (0, 1) for b in sampler.batches(e)}) > 1
    assert sampler.num_batches(0) != sampler.num_batches(1)  # so the plan must count epoch by epoch


def test_one_process_plans_whole_epochs_and_resumes_exactly(
    dropout_model: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    sampler = _sampler(dropout_model, synthetic_data_dir)
    steps = _expected_steps(sampler, 1)
    ref = tmp_path / "reference"
    _train(dropout_model, synthetic_data_dir, ref, checkpointing_steps="3")
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["train_steps"] == steps
    assert _log(ref)[-1]["epoch"] == 2.0  # ended on the last batch of the second epoch, not before or after
    state = json.loads((ref / "checkpoint-3" / STATE_FILE).read_text())
    assert state["epoch"] == 0 and 0 < state["batches_in_epoch"] < sampler.num_batches(0)  # mid-epoch
    copy = tmp_path / "resumed"  # a new output folder, resumed from the reference's checkpoint (its log comes along)
    _train(dropout_model, synthetic_data_dir, copy, "--resume_from_checkpoint", str(ref / "checkpoint-3"),
           checkpointing_steps="3")  # fmt: skip
    _assert_same_run(ref, copy)


@pytest.mark.slow
def test_two_processes_share_uneven_batches_and_resume_exactly(
    dropout_model: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    sampler = _sampler(dropout_model, synthetic_data_dir)
    steps = _expected_steps(sampler, 2)
    ref = tmp_path / "reference"
    _launch_two(dropout_model, synthetic_data_dir, ref, checkpointing_steps="2")
    metrics = json.loads((ref / "metrics.json").read_text())
    assert metrics["train_steps"] == steps and metrics["num_processes"] == 2
    assert _log(ref)[-1]["epoch"] == pytest.approx(2.0, abs=0.1)  # the sharder may top the last round up
    state = json.loads((ref / "checkpoint-2" / STATE_FILE).read_text())
    assert state["num_processes"] == 2 and state["epoch"] == 0
    copy = tmp_path / "resumed"  # a new output folder, resumed from the reference's checkpoint (its log comes along)
    _launch_two(dropout_model, synthetic_data_dir, copy, "--resume_from_checkpoint", str(ref / "checkpoint-2"),
                checkpointing_steps="2")  # fmt: skip
    _assert_same_run(ref, copy)
