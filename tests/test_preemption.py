"""Preemption under real signals and real processes: graceful stop, --max_time, SageMaker spot, one dashboard run,
one error line, and a short soak.

Every chain trains the setup of :mod:`tools.soak` (tiny T5 with dropout, 60 steps, a checkpoint every 3,
a log line every 4) and is compared with one uninterrupted reference run per setup (full/LoRA x 1/2 processes),
shared by all tests here: the weights bit for bit, the log (step, loss, learning rate, grad norm) and train_loss.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run_script
from tensorboard.backend.event_processing import event_accumulator
from wandb_records import load_run, read_records

from dialogsum import preemption
from dialogsum.checkpointing import find_latest, read_state
from dialogsum.config import parse_config
from dialogsum.errors import ConfigError, UserError
from dialogsum.preemption import EXIT_STOPPED, StopRequest, parse_duration
from dialogsum.run_folder import check_output_dir, release_output_dirs
from dialogsum.sagemaker import SAGEMAKER_CHECKPOINT_DIR
from tools import soak
from tools.soak import TRAIN_FLAGS, Setup

FULL_1P, LORA_1P, FULL_2P, LORA_2P = Setup("full", 1), Setup("lora", 1), Setup("full", 2), Setup("lora", 2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> tuple[Path, Path]:
    """(tiny T5 with dropout, synthetic data folder)."""
    model_dir, data_dir = quickstart_assets
    return soak.dropout_copy(model_dir, tmp_path_factory.mktemp("preemption") / "tiny-t5-dropout"), data_dir


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, assets: tuple[Path, Path]) -> dict[Setup, soak.Reference]:
    """One uninterrupted run per setup."""
    root = tmp_path_factory.mktemp("references")
    return {s: soak.run_reference(s, *assets, root / s.name, soak.environment()) for s in soak.SETUPS}


def _logged_steps(out: Path) -> list[int]:
    path = out / "log_history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _after_log(out: Path, step: int):
    """A ``when`` for :func:`soak.start_and_interrupt`: once a log line of ``step`` or later is written."""
    return lambda: any(s >= step for s in _logged_steps(out))


def _stop_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("stopped: ")]


def _finish(setup: Setup, assets: tuple[Path, Path], out: Path, ref: soak.Reference, env: dict, *extra: str) -> None:
    """Run the chain's command to its end and compare with the reference."""
    cmd = soak.command(setup, *assets, out, "--resume_from_checkpoint", "latest", *extra)
    last = soak.start_and_interrupt(cmd, None, "-", 0, env, out.parent / f"{out.name}.last.stderr")
    assert last.exit_code == 0, (out.parent / f"{out.name}.last.stderr").read_text()[-3000:]
    identical, diff, log_equal, loss_equal = soak.compare_with_reference(out, ref.out, setup.method)
    assert identical, f"max parameter difference {diff}"
    assert log_equal and loss_equal


# --------------------------------------------------------------------------------------------- units


def test_durations_parse_as_seconds_or_clock_time() -> None:
    assert parse_duration("5400") == 5400 and parse_duration("90.5") == 90.5
    assert parse_duration("1:30:00") == 5400 and parse_duration("00:00:07") == 7
    for bad in ("1:60:00", "-5", "ten", "1h", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_max_time_and_checkpoint_dir_flags_are_checked(tmp_path: Path) -> None:
    out = ["--output_dir", str(tmp_path / "out")]
    assert parse_config([*out, "--max_time", "2:00:00"], "full").train.max_time == "2:00:00"
    with pytest.raises(ConfigError, match="--max_time: expected seconds"):
        parse_config([*out, "--max_time", "2h"], "full")
    with pytest.raises(ConfigError, match="--max_time must be > 0"):
        parse_config([*out, "--max_time", "0"], "full")
    with pytest.raises(ConfigError, match="--checkpoint_dir must not be empty"):
        parse_config([*out, "--checkpoint_dir", " "], "lora")


def test_sagemaker_checkpoints_go_to_opt_ml_checkpoints_and_latest_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    cfg = parse_config([], "lora").train
    assert (cfg.output_dir, cfg.checkpoint_dir) == (str(tmp_path / "model"), SAGEMAKER_CHECKPOINT_DIR)
    assert cfg.resume_from_checkpoint == "latest"  # a spot restart runs the same command
    cfg = parse_config(["--checkpoint_dir", str(tmp_path / "ckpt")], "lora").train
    assert cfg.checkpoint_dir == str(tmp_path / "ckpt")
    cfg = parse_config(["--overwrite_output_dir"], "lora").train  # starting afresh: no default 'latest'
    assert cfg.overwrite_output_dir and cfg.resume_from_checkpoint is None


def test_latest_without_checkpoint_names_the_folder_it_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    checkpoints = tmp_path / "opt-ml-checkpoints"
    cfg = parse_config(["--checkpoint_dir", str(checkpoints)], "lora")
    with caplog.at_level(logging.WARNING, logger="dialogsum.run_folder"):
        check_output_dir(cfg)
    release_output_dirs()  # the check took the folder's lock
    assert f"no checkpoint in {checkpoints} yet; starting afresh" in caplog.text
    assert str(tmp_path / "model") not in caplog.text


def test_signals_only_set_the_flag_inside_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real signals to this process: SIGUSR1 and SIGTERM are absorbed while installed; a second Ctrl-C later
    than ABORT_AFTER_S aborts; afterwards the previous handlers are back."""
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signalled and stop.signal_name == "SIGUSR1" and stop.votes(1) == (1, 0)
        monkeypatch.setattr(preemption, "ABORT_AFTER_S", 0.0)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes
    finally:
        stop.release()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_time_budget_keeps_back_the_next_step_its_evaluation_and_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preemption, "process_started_at", lambda: time.time())
    stop = StopRequest(max_time_s=100, save_estimate_s=20, eval_every=5, save_every=4)
    stop.record("step", 3.0)
    stop.record("step", 2.0)  # the longest step is kept
    stop.record("eval", 30.0)
    margin = preemption.EXIT_MARGIN_S
    assert stop.next_step_cost_s(3) == 3 + 20 + margin
    assert stop.next_step_cost_s(4) == 3 + 2 * 20 + margin  # a scheduled save, then the stop's
    assert stop.next_step_cost_s(5) == 3 + 30 + 20 + margin
    assert stop.votes(3) == (0, 0)
    stop.record("save", 90.0)  # the last save took longer: 3 + 90 + margin > 100
    assert stop.votes(3) == (0, 1)
    assert "--max_time 100 s" in stop.reason(0, 2, 2)
    assert StopRequest(save_estimate_s=1e9).votes(1) == (0, 0)  # no budget, no time vote


def test_a_checkpoint_dir_with_another_runs_checkpoints_is_refused(
    references: dict[Setup, soak.Reference], assets: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(references[FULL_1P].out / "checkpoint-60", ckpt / "checkpoint-60")
    cmd = soak.command(FULL_1P, *assets, tmp_path / "out", "--checkpoint_dir", str(ckpt))
    proc = run_script(cmd, env=soak.environment())
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "holds checkpoints of an earlier run (newest checkpoint-60)" in errors[0]


def test_latest_skips_a_checkpoint_restored_in_part(references: dict[Setup, soak.Reference], tmp_path: Path) -> None:
    """A checkpoint folder synced back without some of its files (SageMaker/S3 restores object by object) is not
    complete: ``latest`` takes the one before."""
    for name in ("checkpoint-57", "checkpoint-60"):
        shutil.copytree(references[FULL_1P].out / name, tmp_path / name)
    listed = json.loads((tmp_path / "checkpoint-60" / "trainer_state.json").read_text())["files"]
    assert {"model.safetensors", "optimizer.bin", "rng_state_0.pkl", "log_history.jsonl"} <= set(listed)
    assert find_latest(tmp_path).name == "checkpoint-60"
    (tmp_path / "checkpoint-60" / "optimizer.bin").unlink()
    assert find_latest(tmp_path).name == "checkpoint-57"


# --------------------------------------------------------------------------------------------- one process


def test_sigterm_saves_and_resumes_exactly_with_one_dashboard_run(
    references: dict[Setup, soak.Reference], assets: tuple[Path, Path], tmp_path: Path
) -> None:
    """Full fine-tuning, W&B offline + TensorBoard: SIGKILL (after step 8 was logged), restart, SIGTERM (after
    step 24), restart to the end. Weights and log are the reference's; W&B holds one run id whose three parts
    log each step once from the checkpoint on; TensorBoard shows each step once, with the resumed values."""
    out = tmp_path / "run"
    env = soak.environment(WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("WANDB_DIR", None)
    tracked = ("--report_to", "all", "--run_name", "preempted")
    cmd = soak.command(FULL_1P, *assets, out, "--resume_from_checkpoint", "latest", *tracked)

    killed = soak.start_and_interrupt(cmd, "SIGKILL", "process", 0, env, tmp_path / "1.stderr", when=_after_log(out, 8))
    assert killed.exit_code == -signal.SIGKILL
    logged_before_kill = max(_logged_steps(out))

    err = tmp_path / "2.stderr"
    stopped = soak.start_and_interrupt(cmd, "SIGTERM", "process", 0, env, err, when=_after_log(out, 24))
    assert stopped.exit_code == EXIT_STOPPED, err.read_text()[-3000:]
    lines = _stop_lines(err)
    stop_step = read_state(find_latest(out)).step
    assert (
        len(lines) == 1
        and f"at step {stop_step} on SIGTERM; checkpoint {out / f'checkpoint-{stop_step}'} saved" in lines[0]
    )
    assert not [line for line in err.read_text().splitlines() if line.startswith("error")]
    assert stop_step >= 24 and (out / f"checkpoint-{stop_step}" / "log_history.jsonl").is_file()

    _finish(FULL_1P, assets, out, references[FULL_1P], env, *tracked)

    reference_log = [json.loads(x) for x in (references[FULL_1P].out / "log_history.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in reference_log]
    run_id = json.loads((out / "wandb_run.json").read_text())["run_id"]
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"), key=lambda f: f.parent.name)
    parts = [load_run(f) for f in files]
    assert len(parts) == 3 and {p.run_id for p in parts[1:]} == {run_id}  # the killed part may have no records
    logged = [[row["_step"] for row in p.history if "train/loss" in row] for p in parts]
    assert logged[0] == steps[: len(logged[0])] and (not logged[0] or logged[0][-1] <= logged_before_kill)
    # the restart sent again what W&B lost with the killed process (up to its checkpoint), then went on
    assert logged[1] == [s for s in steps if s <= stop_step] and logged[2] == [s for s in steps if s > stop_step]
    losses = {row["_step"]: row["train/loss"] for p in parts[1:] for row in p.history if "train/loss" in row}
    assert losses == {e["step"]: pytest.approx(e["loss"]) for e in reference_log}
    assert "preempting" in [r.WhichOneof("record_type") for r in read_records(files[1])]
    assert parts[2].exited and parts[2].summary["train_steps"] == 60

    board = event_accumulator.EventAccumulator(str(out / "tensorboard" / "dialogsum"), {event_accumulator.SCALARS: 0})
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("train/loss")] == [
        (e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in reference_log
    ]


def test_sagemaker_spot_restart_resumes_from_the_checkpoint_dir(
    references: dict[Setup, soak.Reference], assets: tuple[Path, Path], tmp_path: Path
) -> None:
    """LoRA in a fake SageMaker job: Ctrl-C (SIGINT), the instance goes (SM_MODEL_DIR empty again, the
    checkpoint folder restored), the same command continues from the checkpoint folder to the reference."""
    model, data = assets
    channel, model_dir, ckpt = tmp_path / "channel-train", tmp_path / "opt-ml-model", tmp_path / "opt-ml-checkpoints"
    channel.mkdir()
    shutil.copy(data / "train.jsonl", channel / "train.jsonl")
    env = soak.environment(
        SM_MODEL_DIR=str(model_dir),
        SM_CHANNEL_TRAIN=str(channel),
        SM_OUTPUT_DATA_DIR=str(tmp_path / "opt-ml-output"),
        SM_TRAINING_ENV="{}",
    )
    flags = {**TRAIN_FLAGS, "model_name_or_path": str(model), "learning_rate": soak.LEARNING_RATE["lora"]}
    args = [a for k, v in flags.items() for a in (f"--{k}", v)]
    # no --output_dir, --train_file, --resume_from_checkpoint: SageMaker's; --checkpoint_dir: its /opt/ml/checkpoints
    cmd = [sys.executable, str(REPO / "scripts" / "train_lora.py"), *args, "--checkpoint_dir", str(ckpt)]

    err = tmp_path / "1.stderr"
    first = soak.start_and_interrupt(cmd, "SIGINT", "process", 0, env, err, when=_after_log(model_dir, 12))
    assert first.exit_code == EXIT_STOPPED, err.read_text()[-3000:]
    stopped_at = find_latest(ckpt)
    assert stopped_at is not None and find_latest(model_dir) is None  # checkpoints where SageMaker syncs them
    shutil.rmtree(model_dir)  # a new instance: the model folder is empty, the checkpoint folder restored
    model_dir.mkdir()

    err = tmp_path / "2.stderr"
    second = soak.start_and_interrupt(cmd, None, "-", 0, env, err)
    assert second.exit_code == 0, err.read_text()[-3000:]
    assert f"resumed from {stopped_at}" in err.read_text()
    identical, diff, log_equal, loss_equal = soak.compare_with_reference(model_dir, references[LORA_1P].out, "lora")
    assert identical and log_equal and loss_equal, diff  # the log came back from the checkpoint's copy
    assert (tmp_path / "opt-ml-output" / "metrics.json").is_file()


def test_max_time_stops_with_a_checkpoint_before_the_budget(assets: tuple[Path, Path], tmp_path: Path) -> None:
    """A budget that fits steps stops with a checkpoint (exit 75); one that a slow or busy machine spends on
    start-up alone is refused (exit 1, no endless restart loop). Which of the two a budget gets depends on the
    machine's speed, so the budget doubles until a step fits, and each attempt must be one of the two."""
    budget = 30
    for attempt in range(4):
        out = tmp_path / f"run-{attempt}"
        cmd = soak.command(FULL_1P, *assets, out, "--max_train_steps", "100000", "--max_time", f"{budget}")
        proc = run_script(cmd, env=soak.environment())
        if proc.returncode != EXIT_STOPPED:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
            assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
            assert f"--max_time {budget} s leaves no time for one optimizer step" in errors[0]
            assert find_latest(out) is None
            budget *= 2
            continue
        lines = [line for line in proc.stderr.splitlines() if line.startswith("stopped: ")]
        assert len(lines) == 1, proc.stderr[-3000:]
        assert f"on --max_time {budget} s" in lines[0]  # (how close to the budget it stops is timing: not asserted)
        step = read_state(find_latest(out)).step
        assert step > 0 and f"checkpoint {out}/checkpoint-{step} saved" in lines[0]
        return
    pytest.fail(f"no step fitted in --max_time up to {budget // 2} s")


# --------------------------------------------------------------------------------------------- two processes


def _exit_codes(launcher_stderr: str) -> list[int]:
    """The exit code of every rank in torch's failure summary printed by ``accelerate launch``."""
    return [int(code) for code in re.findall(r"^\s+exitcode\s+:\s+(-?\d+)", launcher_stderr, re.MULTILINE)]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(
    references: dict[Setup, soak.Reference], assets: tuple[Path, Path], tmp_path: Path
) -> None:
    out, err = tmp_path / "run", tmp_path / "1.stderr"
    cmd = soak.command(FULL_2P, *assets, out, "--resume_from_checkpoint", "latest")
    env = soak.environment()
    attempt = soak.start_and_interrupt(cmd, "SIGTERM", "rank 1", 0, env, err, when=_after_log(out, 8))
    text = err.read_text()
    assert attempt.exit_code == 1 and _exit_codes(text) == [EXIT_STOPPED, EXIT_STOPPED], text[-3000:]
    lines = _stop_lines(err)
    step = read_state(find_latest(out)).step
    assert len(lines) == 1 and f"at step {step} on a stop signal (seen by 1 of 2 processes)" in lines[0]
    _finish(FULL_2P, assets, out, references[FULL_2P], env)


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_every_rank(
    references: dict[Setup, soak.Reference], assets: tuple[Path, Path], tmp_path: Path
) -> None:
    out, err = tmp_path / "run", tmp_path / "1.stderr"
    cmd = soak.command(LORA_2P, *assets, out, "--resume_from_checkpoint", "latest")
    env = soak.environment()
    attempt = soak.start_and_interrupt(cmd, "SIGTERM", "launcher", 0, env, err, when=_after_log(out, 8))
    assert attempt.exit_code == 128 + signal.SIGTERM, err.read_text()[-3000:]  # the launcher's own code
    lines = _stop_lines(err)
    # every rank gets it, one may only after the step boundary's vote: "seen by 1 of 2 processes" then
    assert len(lines) == 1 and "SIGTERM" in lines[0] and f"checkpoint {find_latest(out)} saved" in lines[0]
    _finish(LORA_2P, assets, out, references[LORA_2P], env)


@pytest.mark.slow
def test_an_error_is_printed_once_and_every_rank_exits_with_its_code(assets: tuple[Path, Path], tmp_path: Path) -> None:
    """Two processes: a divergence (a model with infinite weights) and a bad flag, one error line each."""
    import torch
    from safetensors.torch import load_file, save_file

    model, data = assets
    broken = tmp_path / "inf-weights"
    shutil.copytree(model, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["lm_head.weight"] = torch.full_like(weights["lm_head.weight"], float("inf"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    env = soak.environment()
    cmd = soak.command(FULL_2P, broken, data, tmp_path / "diverged", "--logging_steps", "1")
    proc = run_script(cmd, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "training diverged" in errors[0], proc.stderr[-3000:]
    assert _exit_codes(proc.stderr) == [1, 1]

    cmd = soak.command(FULL_2P, model, data, tmp_path / "bad-flag", "--max_time", "soon")
    proc = run_script(cmd, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--max_time: expected seconds" in errors[0], proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank ")]  # rank 1 matched rank 0
    assert _exit_codes(proc.stderr) == [2, 2]


# --------------------------------------------------------------------------------------------- soak


@pytest.mark.slow
def test_short_soak(references: dict[Setup, soak.Reference], assets: tuple[Path, Path], tmp_path: Path) -> None:
    """2 SIGKILLs and 2 SIGTERMs at random moments over full/LoRA x 1/2 processes (scripts/soak.py: 20 + 20)."""
    report = soak.soak(tmp_path, kills=2, terms=2, seed=1, per_chain=1, assets=assets, references=references)
    summary = report.summary()
    assert summary["problems"] == [], summary
    assert (summary["sigkill"], summary["sigterm"], summary["corrupt_checkpoints"]) == (2, 2, 0)
    assert summary["identical_to_reference"] == summary["chains"] >= 4
    assert summary["checkpoints_checked"] > 0


def test_soak_flags_are_checked(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    for argv, message in (
        (["--workdir", str(tmp_path / "busy")], "must be an empty folder"),
        (["--workdir", str(tmp_path / "w"), "--setups", "full-3p"], "--setups must name"),
        (["--workdir", str(tmp_path / "w"), "--kills", "0", "--terms", "0"], "not both 0"),
    ):
        with pytest.raises(UserError, match=message):
            soak.parse_args(argv)
