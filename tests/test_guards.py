"""Guards of a training run, in real processes: diverged (NaN/inf) states are never saved and the last good
checkpoint survives; a full disk fails clearly and leaves the previous checkpoint intact.

(fp16 with T5 and a non-empty --output_dir are in test_bad_input.py; ``latest`` without a checkpoint, damaged
checkpoint files and --overwrite_output_dir in test_hostile_inputs.py.)
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_TIMEOUT_S, REPO, run_script, subprocess_env
from safetensors.torch import load_file, save_file

from dialogsum.checkpointing import STATE_FILE, find_latest


def _train(
    method: str, model: Path, data: Path, out: Path, *extra: str, **popen: object
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "scripts" / f"train_{method}.py"),
        *("--model_name_or_path", str(model), "--output_dir", str(out)),
        *("--train_file", str(data / "train.jsonl"), "--max_train_samples", "16"),
        *("--per_device_train_batch_size", "4", "--max_source_length", "64", "--max_target_length", "24"),
        *("--report_to", "none", "--do_eval", "false", "--learning_rate", "3e-3"),
        *extra,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        cwd=str(REPO),
        **popen,  # type: ignore[arg-type]
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def _corrupt(model_dir: Path, target: Path, tensor: str, row: int | None = None, value: float = float("nan")) -> Path:
    """Copy a model folder and put ``value`` into one weight (a whole row or the first element)."""
    shutil.copytree(model_dir, target)
    weights = load_file(str(target / "model.safetensors"))
    if row is None:
        weights[tensor].view(-1)[0] = value
    else:
        weights[tensor][row] = value
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_nan_loss_stops_before_any_checkpoint_is_saved(tiny_model_dir: Path, synthetic_data_dir: Path, tmp_path):
    model = _corrupt(tiny_model_dir, tmp_path / "nan-model", "encoder.block.0.layer.0.SelfAttention.q.weight")
    out = tmp_path / "out"
    proc = _train("full", model, synthetic_data_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "1")
    error = _error_line(proc)
    assert "loss is not finite (not saving this state) at step 1: training diverged" in error
    assert "lower --learning_rate" in error and "no checkpoint was saved before this" in error
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_non_finite_weights_are_not_saved(tiny_model_dir: Path, synthetic_data_dir: Path, tmp_path: Path) -> None:
    """An inf in an embedding row no token uses leaves the loss finite; the weights check still catches it."""
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    model = _corrupt(tiny_model_dir, tmp_path / "inf-model", "shared.weight", row=vocab - 1, value=float("inf"))
    out = tmp_path / "out"
    extra = ("--max_train_steps", "2", "--checkpointing_steps", "2", "--logging_steps", "1")
    error = _error_line(_train("full", model, synthetic_data_dir, out, *extra))
    assert "weights are not finite (not saving this state) at step 2" in error
    losses = [json.loads(x)["loss"] for x in (out / "log_history.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(v == v and v < float("inf") for v in losses)  # the loss never showed it
    assert not list(out.glob("checkpoint-*"))


def test_base_weights_gone_bad_after_a_checkpoint_keep_it(
    tiny_model_dir: Path, synthetic_data_dir: Path, tmp_path: Path
) -> None:
    """LoRA: train to checkpoint-2; the base weights then go bad (NaN) at the same path. The resume is refused
    before any step (the base's weights digest differs from the checkpoint's), naming the changed base, and
    checkpoint-2 stays untouched. (Before the digest, this run diverged at step 3: divergence itself is covered
    by the two tests above.)"""
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "out"
    first = _train("lora", model, synthetic_data_dir, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digest(out / "checkpoint-2")
    shutil.rmtree(model)
    _corrupt(tiny_model_dir, model, "decoder.block.0.layer.1.EncDecAttention.o.weight")

    extra = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1")
    error = _error_line(_train("lora", model, synthetic_data_dir, out, *extra, "--resume_from_checkpoint", "latest"))
    assert f"cannot resume from {out / 'checkpoint-2'}" in error
    assert f"the weights at --model_name_or_path {model} changed since the checkpoint" in error
    assert find_latest(out) == out / "checkpoint-2" and _digest(out / "checkpoint-2") == before
    assert not list(out.glob("checkpoint-[34]*"))


# --------------------------------------------------------------------------------------------- disk full


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, synthetic_data_dir: Path) -> Path:
    """A finished 2-step full fine-tune with checkpoint-2 (to be resumed on a full disk)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    extra = ("--max_train_steps", "2", "--checkpointing_steps", "2")
    proc = _train("full", tiny_model_dir, synthetic_data_dir, out, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def trained(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _resume_on_full_disk(out: Path, model: Path, data: Path, **popen: object) -> str:
    before = _digest(out / "checkpoint-2")
    extra = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    error = _error_line(_train("full", model, data, out, *extra, **popen))
    assert f"could not write checkpoint {out / 'checkpoint-4'}: " in error
    assert "--resume_from_checkpoint latest" in error
    assert f"the latest complete checkpoint {out / 'checkpoint-2'} is intact" in error
    assert _digest(out / "checkpoint-2") == before
    assert not list(out.glob("checkpoint-4*")), "a partial checkpoint was left behind"
    assert find_latest(out) == out / "checkpoint-2"
    return error


def test_file_size_limit_while_saving_fails_clearly(trained: Path, tiny_model_dir: Path, synthetic_data_dir: Path):
    """RLIMIT_FSIZE: the weights file cannot be written (EFBIG), as on a full disk; works without root."""
    limit = (trained / "checkpoint-2" / "model.safetensors").stat().st_size // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail

    error = _resume_on_full_disk(trained, tiny_model_dir, synthetic_data_dir, preexec_fn=small_files)
    assert "File too large" in error


@pytest.fixture
def small_disk(tmp_path: Path):
    """A tmpfs mount (needs root); skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()

    def mount(size_kb: int) -> Path:
        proc = run_script(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount_point)])
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
        return mount_point

    yield mount
    subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=HANG_TIMEOUT_S)


@pytest.mark.skipif(not shutil.which("mount"), reason="no mount command")
def test_disk_full_while_saving_fails_clearly(
    trained: Path, small_disk, tiny_model_dir: Path, synthetic_data_dir: Path
) -> None:
    """A real ENOSPC: the run folder on a tmpfs with room for less than one more checkpoint."""
    used_kb = sum(p.stat().st_size for p in trained.rglob("*") if p.is_file()) // 1024
    checkpoint_kb = sum(p.stat().st_size for p in (trained / "checkpoint-2").iterdir()) // 1024
    disk = small_disk(used_kb + checkpoint_kb // 2 + 64)
    out = disk / "run"
    shutil.copytree(trained, out)
    error = _resume_on_full_disk(out, tiny_model_dir, synthetic_data_dir)
    assert ": the disk is full (" in error
    state = json.loads((out / "checkpoint-2" / STATE_FILE).read_text())
    assert state["step"] == 2
    assert load_file(str(out / "checkpoint-2" / "model.safetensors"))
    torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)
