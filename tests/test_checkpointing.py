"""Checkpoint folders: finding ``latest``, retention, leftovers, compatibility, adapter-only LoRA checkpoints;
and evaluation during training (best checkpoint kept, early stopping) in real training processes."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_script, subprocess_env
from safetensors.torch import load_file, save_file

from dialogsum.checkpointing import (
    STATE_FILE,
    TRAINABLE_ONLY_FILE,
    LogSums,
    TrainState,
    check_compatible,
    checkpoint_dirs,
    find_latest,
    fingerprint,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
)
from dialogsum.config import build_config
from dialogsum.errors import UserError


def _fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))  # whole: resuming checks the files
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"step": 1}))
    return folder


def test_latest_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-2"):
        _fake_checkpoint(tmp_path, name)
    _fake_checkpoint(tmp_path, "checkpoint-12", complete=False)  # killed before trainer_state.json
    _fake_checkpoint(tmp_path, "checkpoint-11.tmp")  # killed before the rename
    _fake_checkpoint(tmp_path, "checkpoint-13.deleting")
    (tmp_path / "checkpoint-14").write_text("a file, not a folder")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10"]
    assert find_latest(tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("latest", str(tmp_path)) == tmp_path / "checkpoint-10"
    assert find_latest(tmp_path / "nothing-here") is None


def test_resume_argument_errors(tmp_path: Path) -> None:
    assert resolve_resume("latest", str(tmp_path)) is None  # nothing saved yet: start from the beginning
    with pytest.raises(UserError, match="is not a directory"):
        resolve_resume(str(tmp_path / "missing"), str(tmp_path))
    partial = _fake_checkpoint(tmp_path, "checkpoint-3.tmp", complete=False)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(str(partial), str(tmp_path))
    assert resolve_resume(None, str(tmp_path)) is None


def test_retention_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, f"checkpoint-{step}")
    removed = prune_checkpoints(tmp_path, keep=2, protect="checkpoint-2")
    assert sorted(p.name for p in removed) == ["checkpoint-1", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert prune_checkpoints(tmp_path, keep=None, protect=None) == []


def test_leftovers_of_killed_saves_are_removed(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, "checkpoint-4")
    for name in ("checkpoint-6.tmp", "checkpoint-2.deleting", "checkpoint-4.replaced"):
        _fake_checkpoint(tmp_path, name, complete=False)
    assert sorted(p.name for p in remove_leftovers(tmp_path)) == [
        "checkpoint-2.deleting",
        "checkpoint-4.replaced",
        "checkpoint-6.tmp",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


def test_incompatible_checkpoint_names_every_difference(tmp_path: Path) -> None:
    base = {"output_dir": str(tmp_path), "model_name_or_path": "m", "train_file": "a.jsonl"}
    saved = TrainState(num_processes=1, fingerprint=fingerprint(build_config("lora", base)))
    check_compatible(saved, build_config("lora", {**base, "num_train_epochs": 3.0}), 1, tmp_path)  # may differ
    now = build_config("lora", {**base, "lora_r": 8, "train_file": "b.jsonl", "learning_rate": 0.1})
    with pytest.raises(UserError) as info:
        check_compatible(saved, now, 2, tmp_path)
    message = str(info.value)
    for part in (
        "lora_r: checkpoint 32 vs now 8",
        "train_file: checkpoint 'a.jsonl' vs now 'b.jsonl'",
        "learning_rate: checkpoint 0.001 vs now 0.1",
        "num_processes: checkpoint 1 vs now 2",
    ):
        assert part in message
    # a checkpoint written before --optim and --label_smoothing_factor existed was made with their defaults
    older = {k: v for k, v in saved.fingerprint.items() if k not in ("optim", "label_smoothing_factor")}
    check_compatible(TrainState(num_processes=1, fingerprint=older), build_config("lora", base), 1, tmp_path)
    with pytest.raises(UserError, match="optim: checkpoint 'adamw' vs now 'adafactor'; label_smoothing_factor: "):
        now = build_config("lora", {**base, "optim": "adafactor", "label_smoothing_factor": 0.1})
        check_compatible(TrainState(num_processes=1, fingerprint=older), now, 1, tmp_path)


def test_state_file_from_a_newer_version_still_reads(tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path, "checkpoint-7")
    (folder / STATE_FILE).write_text(json.dumps({"step": 7, "epoch": 1, "something_new": True}))
    state = read_state(folder)
    assert (state.step, state.epoch) == (7, 1)


def test_state_file_keeps_its_flat_keys_and_reads_back_progress_and_sums(tmp_path: Path) -> None:
    """trainer_state.json is one flat object, as before progress and log sums were split: old checkpoints resume."""
    sums = LogSums(window_targets=5, window_tokens=9, window_samples=2, total_targets=50, total_tokens=90,
                   total_samples=20, elapsed_s=1.5)  # fmt: skip
    state = TrainState(step=4, epoch=1, batches_in_epoch=6, best_metric=0.5, best_step=2, sums=sums)
    flat = state.to_json()
    assert list(flat) == [
        "step", "epoch", "batches_in_epoch", "best_metric", "best_step", "best_checkpoint",
        "evals_without_improvement", "num_processes", "fingerprint", "window_targets", "window_tokens",
        "window_samples", "total_targets", "total_tokens", "total_samples", "elapsed_s",
    ]  # fmt: skip
    folder = _fake_checkpoint(tmp_path, "checkpoint-4")
    (folder / STATE_FILE).write_text(json.dumps(flat))
    assert read_state(folder) == state


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[7, 1]", " must hold a JSON object, but holds a list"),
        ('{"step": "7"}', ': step is "7", expected int; the file is not this run\'s'),
        ('{"step": 7, "fingerprint": []}', ": fingerprint is [], expected dict; the file is not this run's"),
        ('{"step": true}', ": step is true, expected int; the file is not this run's"),
    ],
    ids=["list", "string-step", "list-fingerprint", "bool-step"],
)
def test_a_state_file_of_the_wrong_type_is_one_clear_line(content: str, expected: str, tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path, "checkpoint-7")
    (folder / STATE_FILE).write_text(content)
    with pytest.raises(UserError) as error:
        read_state(folder)
    assert str(error.value) == f"{folder / STATE_FILE}{expected}"


# --------------------------------------------------------------------------------------------- LoRA weights


def _prepared_lora(model_dir: Path, seed: int, r: int = 4):
    from accelerate import Accelerator

    from dialogsum.config import LoraArguments
    from dialogsum.modeling import apply_lora, load_model

    torch.manual_seed(seed)
    model = apply_lora(
        load_model(str(model_dir)), LoraArguments(lora_r=r, lora_alpha=8, lora_target_modules=["q", "v"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero; make the adapter distinguishable
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_lora_checkpoint_holds_only_the_adapter_and_loads_back(
    tiny_model_dir: Path, tmp_path: Path, fresh_accelerate_state: None
) -> None:
    cfg = build_config("lora", {"output_dir": str(tmp_path), "model_name_or_path": str(tiny_model_dir)})
    accelerator, model = _prepared_lora(tiny_model_dir, seed=1)
    path = save_checkpoint(accelerator, tmp_path, TrainState(step=3), cfg)
    saved = load_file(str(path / "model.safetensors"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == set(trainable) and (path / TRAINABLE_ONLY_FILE).is_file()
    full_size = sum(p.numel() for p in model.parameters()) * 4
    assert (path / "model.safetensors").stat().st_size < full_size / 2

    other_accelerator, other = _prepared_lora(tiny_model_dir, seed=2)
    assert not all(torch.equal(p, trainable[n]) for n, p in other.named_parameters() if p.requires_grad)
    state = load_checkpoint(other_accelerator, path)
    assert state.step == 3
    for name, p in other.named_parameters():
        assert torch.equal(p, trainable[name] if name in trainable else dict(model.named_parameters())[name])

    wrong_accelerator, _ = _prepared_lora(tiny_model_dir, seed=3, r=8)
    with pytest.raises(UserError, match="does not match this model"):
        load_checkpoint(wrong_accelerator, path)


# --------------------------------------------------------------------------------------------- evaluation runs


def _train(out: Path, model: Path, data: Path, *extra: str):
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train_full.py"),
        *("--model_name_or_path", str(model), "--output_dir", str(out)),
        *("--train_file", str(data / "train.jsonl"), "--validation_file", str(data / "validation.jsonl")),
        *("--max_train_samples", "32", "--max_eval_samples", "8", "--per_device_train_batch_size", "4"),
        *("--max_source_length", "64", "--max_target_length", "24", "--max_new_tokens", "8"),
        *("--report_to", "none", "--do_eval", "false", "--logging_steps", "1"),
        *extra,
    ]
    proc = run_script(cmd, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, synthetic_data_dir: Path):
    """(a) a model that cannot improve (lr 1e-12 leaves fp32 weights bit-identical): early stopping and the best
    checkpoint kept; (b) a learning model: the best step follows the eval loss."""
    root = tmp_path_factory.mktemp("eval_runs")
    stuck = (
        "--learning_rate", "1e-12", "--max_train_steps", "10", "--eval_steps", "1", "--eval_with_generation",
        "--metric_for_best", "rougeL", "--early_stopping_patience", "2", "--checkpointing_steps", "1",
        "--save_total_limit", "1",
    )  # fmt: skip
    learning = (
        "--learning_rate", "3e-3", "--max_train_steps", "8", "--eval_steps", "2", "--checkpointing_steps", "4",
        "--save_total_limit", "1",
    )  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(_train, root / "stuck", tiny_model_dir, synthetic_data_dir, *stuck)
        b = pool.submit(_train, root / "learning", tiny_model_dir, synthetic_data_dir, *learning)
        return {"stuck": a.result(), "learning": b.result()}


def _events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log_history.jsonl").read_text().splitlines()]


def test_early_stopping_keeps_the_best_and_the_newest_checkpoint(eval_runs: dict[str, Path]) -> None:
    out = eval_runs["stuck"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["train_steps"] == 3  # best at 1, then 2 evals without gain
    assert metrics["best_step"] == 1
    evals = [e for e in _events(out) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [1, 2, 3] and all("eval_rougeL" in e for e in evals)
    assert metrics["best_metric"] == evals[0]["eval_rougeL"]
    # --save_total_limit 1 keeps the newest checkpoint, and the best one on top
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-3"]
    assert read_state(out / "checkpoint-3").best_checkpoint == "checkpoint-1"


def test_best_step_follows_the_eval_loss(eval_runs: dict[str, Path]) -> None:
    out = eval_runs["learning"]
    metrics = json.loads((out / "metrics.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in _events(out) if "eval_loss" in e}
    assert sorted(evals) == [2, 4, 6, 8]
    best = min(evals, key=evals.get)
    assert metrics["best_step"] == best and metrics["best_metric"] == evals[best]
    assert evals[8] < evals[2]  # it learns
    kept = [p.name for p in checkpoint_dirs(out)]
    assert f"checkpoint-{best}" in kept and "checkpoint-8" in kept and len(kept) <= 2


def test_training_data_is_compared_by_content(tmp_path: Path) -> None:
    first, moved = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    for path in (first, moved):
        path.parent.mkdir()
        path.write_text('{"dialogue": "hi", "summary": "greeting"}\n')
    settings = {"output_dir": str(tmp_path), "model_name_or_path": "m"}
    saved = TrainState(fingerprint=fingerprint(build_config("full", {**settings, "train_file": str(first)})))
    check_compatible(saved, build_config("full", {**settings, "train_file": str(moved)}), 1, tmp_path)  # moved: ok
    first.write_text('{"dialogue": "hi", "summary": "another greeting"}\n')
    with pytest.raises(UserError, match=f"the content of --train_file {first} changed since the checkpoint"):
        check_compatible(saved, build_config("full", {**settings, "train_file": str(first)}), 1, tmp_path)


def test_lora_resume_is_refused_when_the_base_weights_changed_at_the_same_path(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    base, moved = tmp_path / "base", tmp_path / "moved"
    shutil.copytree(tiny_model_dir, base)
    shutil.copytree(tiny_model_dir, moved)
    settings = {"output_dir": str(tmp_path / "out"), "train_file": "t.jsonl"}
    saved = TrainState(fingerprint=fingerprint(build_config("lora", {**settings, "model_name_or_path": str(base)})))
    assert len(saved.fingerprint["base_model_weights_digest"]) == 64
    check_compatible(saved, build_config("lora", {**settings, "model_name_or_path": str(base)}), 1, tmp_path)
    # the same weights elsewhere: fine
    check_compatible(saved, build_config("lora", {**settings, "model_name_or_path": str(moved)}), 1, tmp_path)

    # other values, same names, shapes and file size (e.g. another fine-tune saved over it)
    tensors = load_file(str(base / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as error:
        check_compatible(saved, build_config("lora", {**settings, "model_name_or_path": str(base)}), 1, tmp_path)
    assert str(error.value) == (
        f"cannot resume from {tmp_path}: settings differ (the weights at --model_name_or_path {base} changed since "
        "the checkpoint (the LoRA adapter was trained on the base model that was there then))"
    )
    # a full fine-tune resumes from the weights in its checkpoint: the base is not fingerprinted
    assert "base_model_weights_digest" not in fingerprint(
        build_config("full", {**settings, "model_name_or_path": str(base)})
    )
