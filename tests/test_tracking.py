"""Tracking: tracker choice without a W&B account, real offline W&B runs and TensorBoard events read back,
peak memory. Runs a real ``accelerate.Accelerator(cpu=True)`` in-process; nothing touches the network."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import HANG_TIMEOUT_S
from tensorboard.backend.event_processing import event_accumulator
from wandb_records import find_run_file, load_run

from dialogsum import distributed, provenance, tracking
from dialogsum.config import build_config
from dialogsum.errors import UserError

REPO = Path(__file__).resolve().parents[1]
WANDB_VARS = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_BASE_URL",
    "WANDB_DIR",
    "WANDB_DISABLED",
    "RANK",
    "LOCAL_RANK",
)
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No W&B login anywhere: empty HOME, config dir and netrc; cwd in tmp (no ./wandb/settings)."""
    for name in WANDB_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    yield home
    import wandb

    wandb.teardown()  # the next test reads its own environment again


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dialogsum.tracking" and r.levelno >= logging.WARNING]


# --------------------------------------------------------------------------------------- resolve_trackers


def test_report_to_choices_map_to_accelerate_tracker_names(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.resolve_trackers("all") == ["wandb", "tensorboard"]
    assert tracking.resolve_trackers("wandb") == ["wandb"]
    assert tracking.resolve_trackers("tensorboard") == ["tensorboard"]
    assert tracking.resolve_trackers("none") == []  # (other values never get here: the settings refuse them)


def test_no_key_and_no_mode_drops_wandb_with_one_clear_warning(
    wandb_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dialogsum.tracking")
    assert tracking.resolve_trackers("all") == ["tensorboard"]
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "wandb login" in warnings[0] and "WANDB_MODE=offline" in warnings[0]
    assert "continues without W&B" in warnings[0]


def test_explicit_wandb_without_login_stops_before_training(wandb_env: Path) -> None:
    with pytest.raises(UserError, match="wandb login") as info:
        tracking.resolve_trackers("wandb")
    assert info.value.exit_code == 1 and "WANDB_MODE=offline" in str(info.value)


def test_disabled_mode_leaves_wandb_out_quietly(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_trackers("all") == ["tensorboard"]
    assert tracking.resolve_trackers("wandb") == []
    assert _warnings(caplog) == []


@pytest.mark.parametrize("source", ["env", "netrc", "settings_offline", "dryrun"])
def test_credentials_and_offline_settings_are_found(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    assert not tracking.wandb_access().usable
    if source == "env":
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    elif source == "netrc":
        (wandb_env / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
        (wandb_env / ".netrc").chmod(0o600)
    elif source == "settings_offline":  # what `wandb offline` writes
        settings = wandb_env / ".config" / "wandb" / "settings"
        settings.parent.mkdir(parents=True)
        settings.write_text("[default]\nmode = offline\n")
    else:
        monkeypatch.setenv("WANDB_MODE", "dryrun")
    access = tracking.wandb_access()
    assert access.usable
    assert access.offline == (source in ("settings_offline", "dryrun"))
    monkeypatch.setattr(tracking, "wandb_server_problem", lambda url: None)  # as if the server answered
    assert tracking.resolve_trackers("wandb") == ["wandb"]


def test_only_rank_zero_checks_the_login(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RANK", "1")
    # Other ranks never start W&B: they keep the same list and say nothing (no warning per process).
    assert tracking.resolve_trackers("all") == ["wandb", "tensorboard"]
    assert tracking.resolve_trackers("wandb") == ["wandb"]
    assert _warnings(caplog) == []


# ------------------------------------------------------------------------------------ a tracked run


def _config(output_dir: Path, report_to: str = "all"):
    return build_config(
        "lora",
        {
            "output_dir": str(output_dir),
            "report_to": report_to,
            "run_name": "tiny-run",
            "wandb_project": "dialogsum-tests",
            "wandb_group": "unit",
            "wandb_tags": ["ci", "cpu"],
            "lora_target_modules": ["q", "v"],
            "learning_rate": 2e-3,
            "log_model": True,
        },
    )


TRAIN_LOGS = {
    2: {"train/loss": 2.5, "train/learning_rate": 2e-3, "train/tokens_per_s": 1500.0},
    4: {"train/loss": 1.75, "train/learning_rate": 1e-3, "train/tokens_per_s": 1600.0},
    6: {"train/loss": 1.25, "train/learning_rate": 0.0, "train/tokens_per_s": 1700.0},
}
METRICS = {
    "method": "lora",
    "model_name_or_path": "google/flan-t5-base",
    "rouge1": 0.4731,
    "rouge2": 0.2012,
    "rougeL": 0.3977,
    "rougeLsum": 0.4001,
    "multi_reference": {"rouge1": 0.4731, "rouge2": 0.2012, "rougeL": 0.3977, "rougeLsum": 0.4001},
    "flat": {"rouge1": 0.4102, "rouge2": 0.1611, "rougeL": 0.3388, "rougeLsum": 0.3401},
    "headline_protocol": "multi_reference",
    "train_loss": 1.8,
    "train_runtime_s": 12.5,
    "peak_memory_mb": 812.0,
    "learning_rate": 2e-3,
    "num_processes": 1,
    "checkpoint_size_mb": None,
}
PARAMS = {"trainable_params": 3_538_944, "total_params": 251_116_800, "trainable_percent": 1.4093}
PREDICTIONS = [
    {
        "id": f"test_{i}",
        "dialogue": f"#Person1#: Where is the {place}?\n#Person2#: Next to the bank.",
        "reference": f"#Person2# tells #Person1# the {place} is next to the bank.",
        "references": [f"#Person2# tells #Person1# the {place} is next to the bank.", "They talk about a place."],
        "prediction": f"#Person2# says the {place} is next to the bank.",
    }
    for i, place in enumerate(["museum", "station", "library"])
]


def _tracked_run(cfg, output_dir: Path, log_with: list[str]) -> Accelerator:
    accelerator = Accelerator(cpu=True, log_with=log_with, project_dir=str(output_dir / "tensorboard"))
    tracking.start_tracking(accelerator, cfg, {"num_train_examples": 96})
    for step, values in TRAIN_LOGS.items():
        accelerator.log(values, step=step)
    accelerator.log({"eval/loss": 1.5}, step=6)
    (output_dir / "adapter_model.safetensors").write_bytes(b"\0" * 3_000_000)  # 3 MB = 3 x 10^6 bytes
    (output_dir / "adapter_config.json").write_text("{}")
    (output_dir / "predictions.jsonl").write_text("{}\n")
    tracking.finish_tracking(accelerator, METRICS, PREDICTIONS, PARAMS, str(output_dir), log_model=True, step=6)
    accelerator.end_training()
    return accelerator


def _tensorboard_scalars(output_dir: Path, project: str = "dialogsum-tests") -> dict[str, list[tuple[int, float]]]:
    events = sorted((output_dir / "tensorboard" / project).glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {output_dir}"
    acc = event_accumulator.EventAccumulator(str(events[0]), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_offline_wandb_run_records_config_steps_and_summary(
    wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = _config(out)
    _tracked_run(cfg, out, tracking.resolve_trackers(cfg.track.report_to))

    # W&B files go to --output_dir when WANDB_DIR is unset
    run = load_run(find_run_file(out / "wandb"), until_exit=True)
    assert run.exited
    assert (run.name, run.project, run.group, run.tags) == ("tiny-run", "dialogsum-tests", "unit", ["ci", "cpu"])

    # config: every flag with its real type, plus resolved values, topology, versions, git commit, extra
    c = run.config
    assert c["method"] == "lora" and c["lora_r"] == 32 and c["lora_target_modules"] == ["q", "v"]
    assert c["learning_rate"] == pytest.approx(2e-3) and c["wandb_tags"] == ["ci", "cpu"]
    assert c["effective_batch_size"] == 8 and c["num_train_examples"] == 96
    assert (c["num_processes"], c["distributed_type"], c["mixed_precision"]) == (1, "NO", "no")
    assert c["version_torch"] == torch.__version__
    assert {"version_transformers", "version_accelerate", "version_peft", "version_datasets"} <= set(c)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert c["git_commit"] == head.stdout.strip()

    # every logged step with its values
    by_step = {}
    for row in run.history:
        by_step.setdefault(row["_step"], {}).update(row)
    for step, values in TRAIN_LOGS.items():
        for key, value in values.items():
            assert by_step[step][key] == pytest.approx(value), (step, key)
    assert by_step[6]["eval/loss"] == pytest.approx(1.5)
    assert by_step[6]["final/rouge1"] == pytest.approx(0.4731)
    assert by_step[6]["final/flat/rougeL"] == pytest.approx(0.3388)
    assert "final/learning_rate" not in by_step[6] and "final/num_processes" not in by_step[6]
    assert by_step[6]["predictions/nrows"] == 3 and by_step[6]["predictions/ncols"] == 5

    # final summary: metrics, protocol sub-objects, parameter report, measured checkpoint size
    s = run.summary
    assert s["rouge1"] == pytest.approx(0.4731) and s["rougeLsum"] == pytest.approx(0.4001)
    assert s["flat"]["rouge2"] == pytest.approx(0.1611) and s["headline_protocol"] == "multi_reference"
    assert s["trainable_params"] == 3_538_944 and s["trainable_percent"] == pytest.approx(1.4093)
    assert s["checkpoint_size_mb"] == pytest.approx(3.0)
    assert s["train/loss"] == pytest.approx(1.25)  # last logged value

    # --log_model: the adapter folder as a model artifact (not the predictions)
    models = [name for name, kind in run.artifacts if kind == "model"]
    assert models == ["tiny-run-lora"]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(run.artifact_files["tiny-run-lora"])
    assert "predictions.jsonl" not in run.artifact_files["tiny-run-lora"]

    # TensorBoard has the same scalars at the same steps
    scalars = _tensorboard_scalars(out)
    for key in ("train/loss", "train/learning_rate", "train/tokens_per_s"):
        assert scalars[key] == [(step, pytest.approx(values[key])) for step, values in TRAIN_LOGS.items()]
    assert scalars["final/rouge1"] == [(6, pytest.approx(0.4731))]
    assert scalars["eval/loss"] == [(6, pytest.approx(1.5))]


def test_no_login_message_is_printed_once(wandb_env: Path) -> None:
    code = "from dialogsum.tracking import resolve_trackers; print(resolve_trackers('all'))"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-c", code]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['tensorboard']"
    assert result.stderr.count("W&B: no API key found") == 1
    assert "`wandb login`" in result.stderr and "WANDB_MODE=offline" in result.stderr


def test_no_login_run_trains_with_tensorboard_only(wandb_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _config(out)
    log_with = tracking.resolve_trackers(cfg.track.report_to)  # no key, no mode
    assert log_with == ["tensorboard"]
    accelerator = _tracked_run(cfg, out, log_with)
    assert [t.name for t in accelerator.trackers] == ["tensorboard"]
    assert not (out / "wandb").exists()
    scalars = _tensorboard_scalars(out)
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([2.5, 1.75, 1.25])
    assert scalars["final/rougeL"] == [(6, pytest.approx(0.3977))]


def test_wandb_init_failure_falls_back_to_tensorboard(
    wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A key is configured but the server cannot be reached: wandb.init raises after its timeout.
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")
    out = tmp_path / "run"
    cfg = _config(out)
    log_with = ["wandb", "tensorboard"]  # as resolve_trackers gives them when the server answered at first
    accelerator = Accelerator(cpu=True, log_with=log_with, project_dir=str(out / "tensorboard"))
    tracking.start_tracking(accelerator, cfg)
    assert [t.name for t in accelerator.trackers] == ["tensorboard"]
    assert any("W&B could not start a run" in m for m in _warnings(caplog))
    accelerator.log({"train/loss": 0.5}, step=1)
    accelerator.end_training()
    assert _tensorboard_scalars(out)["train/loss"] == [(1, 0.5)]


def test_wandb_init_failure_asked_for_is_the_error_teardown_does_not_hide(
    wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "1")
    accelerator = Accelerator(cpu=True, log_with=["wandb"])
    with pytest.raises(UserError, match="--report_to wandb: W&B could not start a run"):
        tracking.start_tracking(accelerator, _config(tmp_path / "run", report_to="wandb"))
    assert accelerator.trackers == []
    accelerator.end_training()  # the half-started W&B run was dropped: ending the job raises nothing


def test_unreachable_wandb_server_is_found_before_the_run(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Online W&B without a network: refused (--report_to wandb) or left out (all) before anything starts."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as caught:
        tracking.resolve_trackers("wandb")
    assert str(caught.value).startswith(
        f"--report_to wandb: the W&B server http://127.0.0.1:{port} cannot be reached ("
    )
    assert "`export WANDB_MODE=offline` to keep the run on disk" in str(caught.value)
    assert tracking.resolve_trackers("all") == ["tensorboard"]
    assert any("cannot be reached" in m and "continues without W&B" in m for m in _warnings(caplog))


def test_tensorboard_hparams_get_scalars_and_strings_only() -> None:
    safe = tracking.hparams_safe({"a": [1, 2], "b": None, "c": {"x": 1}, "d": 0.5, "e": True, "f": "s"})
    assert safe == {"a": "1, 2", "b": "None", "c": '{"x": 1}', "d": 0.5, "e": True, "f": "s"}


def test_git_info_outside_a_repository_is_empty(tmp_path: Path) -> None:
    assert provenance.git_info(tmp_path) == {}


def test_default_run_name_is_method_and_time() -> None:
    assert re.fullmatch(r"lora-\d{8}-\d{6}", tracking.default_run_name("lora"))


def test_sample_predictions_scores_rouge_l_against_all_references() -> None:
    rows = [
        {"prediction": "the cat sat", "reference": "a dog ran", "references": ["a dog ran", "the cat sat"]},
        {"prediction": "hello", "reference": "bye", "rougeL": 0.25},
    ]
    sample = tracking.sample_predictions(rows, rows=10)
    assert sample[0]["rougeL"] == pytest.approx(1.0)  # best match over references
    assert sample[1]["rougeL"] == 0.25  # kept when given
    many = [{"prediction": "x", "reference": "x", "id": i} for i in range(200)]
    picked = tracking.sample_predictions(many, rows=50)
    assert len(picked) == 50 and [r["id"] for r in picked] == sorted(r["id"] for r in picked)
    assert picked == tracking.sample_predictions(many, rows=50)  # seeded


# ----------------------------------------------------------------------------------------------- memory


def test_peak_memory_on_cpu_is_the_process_peak_rss() -> None:
    peak = distributed.peak_memory_mb("cpu")
    status = Path("/proc/self/status")
    if status.is_file():
        hwm_kb = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        assert peak == pytest.approx(hwm_kb * 1024 / 1e6, rel=0.05)  # MB = 10^6 bytes
    assert 10 < peak < 1e6 and math.isfinite(peak)


# ------------------------------------------------------------------------------------------- end to end


def test_quickstart_training_logs_the_same_values_to_wandb_tensorboard_and_files(
    wandb_env: Path, tmp_path: Path
) -> None:
    """A real tiny LoRA training (scripts/train_lora.py --quickstart) with --report_to all, W&B offline."""
    if not (REPO / "scripts" / "train_lora.py").is_file():
        pytest.skip("scripts/train_lora.py is not there yet")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update({"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    args = [
        sys.executable, str(REPO / "scripts" / "train_lora.py"), "--quickstart", "--output_dir", str(out),
        "--report_to", "all", "--max_train_steps", "6", "--logging_steps", "2", "--eval_steps", "3",
        "--eval_with_generation", "--max_eval_samples", "8", "--max_test_samples", "8", "--log_model",
        "--run_name", "e2e", "--wandb_group", "tests", "--wandb_tags", "quickstart", "cpu",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    params = json.loads((out / "parameters.json").read_text())
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    train_logs = [row for row in history if "loss" in row]
    eval_logs = [row for row in history if "eval_loss" in row]
    assert [row["step"] for row in train_logs] == [2, 4, 6] and [row["step"] for row in eval_logs] == [3, 6]

    run = load_run(find_run_file(out / "wandb"), until_exit=True)
    assert run.exited and (run.name, run.group, run.tags) == ("e2e", "tests", ["quickstart", "cpu"])
    assert run.config["method"] == "lora" and run.config["max_train_steps"] == 6 and run.config["quickstart"]
    assert run.config["num_processes"] == 1 and run.config["version_torch"] == torch.__version__
    by_step: dict[int, dict] = {}
    for row in run.history:
        by_step.setdefault(row["_step"], {}).update(row)
    for row in train_logs:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s"):
            assert by_step[row["step"]][f"train/{key}"] == pytest.approx(row[key]), (row["step"], key)
    for row in eval_logs:
        assert by_step[row["step"]]["eval/loss"] == pytest.approx(row["eval_loss"])
        assert by_step[row["step"]]["eval/rougeL"] == pytest.approx(row["eval_rougeL"])
    assert by_step[6]["final/rouge1"] == pytest.approx(metrics["rouge1"])
    assert by_step[6]["predictions/nrows"] == 8
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "train_loss"):
        assert run.summary[key] == pytest.approx(metrics[key]), key
    assert run.summary["trainable_params"] == params["trainable_params"]
    assert run.summary["checkpoint_size_mb"] == pytest.approx(metrics["checkpoint_size_mb"])
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(run.artifact_files["e2e-lora"])

    scalars = _tensorboard_scalars(out, project="dialogsum")
    assert scalars["train/loss"] == [(row["step"], pytest.approx(row["loss"])) for row in train_logs]
    assert scalars["eval/loss"] == [(row["step"], pytest.approx(row["eval_loss"])) for row in eval_logs]
    assert scalars["final/rouge1"] == [(6, pytest.approx(metrics["rouge1"]))]

    report = (out / "report.md").read_text()
    for image in ("training", "eval", "rouge", "resources"):
        assert f"plots/{image}.png" in report and (out / "plots" / f"{image}.png").stat().st_size > 8_000
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and str(out / "quickstart_assets") in card
    assert f"value: {round(100 * metrics['rouge1'], 2)}" in card


# ------------------------------------------------------------------- W&B environment, evaluation, provenance


def test_wandb_environment_variables_apply_when_the_flags_are_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(name, raising=False)
    plain = tracking.run_identity(build_config("lora", {"output_dir": "o"}))
    assert (plain.project, plain.entity, plain.group, plain.tags) == ("dialogsum", None, None, [])
    assert re.fullmatch(r"lora-\d{8}-\d{6}", plain.name)
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_NAME", "env-name")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    monkeypatch.setenv("WANDB_TAGS", "a, b,,c")
    env = tracking.run_identity(build_config("lora", {"output_dir": "o"}))
    assert env == tracking.RunIdentity("env-project", "env-name", "env-team", "env-group", ["a", "b", "c"])
    flags = {"wandb_project": "p", "run_name": "n", "wandb_entity": "e", "wandb_group": "g", "wandb_tags": ["t"]}
    given = tracking.run_identity(build_config("lora", {"output_dir": "o", **flags}))
    assert given == tracking.RunIdentity("p", "n", "e", "g", ["t"])  # flags win


def test_offline_run_takes_project_group_name_and_tags_from_the_environment(
    wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    monkeypatch.setenv("WANDB_NAME", "trial-3")
    monkeypatch.setenv("WANDB_TAGS", "sweep,cpu")
    out = tmp_path / "run"
    cfg = build_config("full", {"output_dir": str(out), "report_to": "wandb"})
    accelerator = Accelerator(cpu=True, log_with=tracking.resolve_trackers("wandb"))
    tracking.start_tracking(accelerator, cfg)
    accelerator.log({"train/loss": 1.0}, step=1)
    accelerator.end_training()
    run = load_run(find_run_file(out / "wandb"), until_exit=True)
    assert (run.project, run.group, run.name, run.tags) == ("from-env", "sweep-7", "trial-3", ["sweep", "cpu"])
    assert run.config["wandb_project"] == "from-env" and run.config["wandb_group"] == "sweep-7"


def test_evaluate_logs_the_zero_shot_baseline_next_to_the_training_runs(
    wandb_env: Path, tmp_path: Path, trained_tiny_model: Path, synthetic_data_dir: Path
) -> None:
    """scripts/evaluate.py --report_to wandb: a real offline run of job type eval, in the project and group of
    the training runs (taken from the environment here), with the scores of metrics.json; metrics.json records
    the command line, the git commit and the package versions."""
    out = tmp_path / "zero_shot"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env.update(
        {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
         "WANDB_PROJECT": "lab", "WANDB_RUN_GROUP": "lab-1"}
    )  # fmt: skip
    args = [
        sys.executable, str(REPO / "scripts" / "evaluate.py"), "--model_name_or_path", str(trained_tiny_model),
        "--test_file", str(synthetic_data_dir / "test.jsonl"), "--max_test_samples", "8", "--max_new_tokens", "16",
        "--output_dir", str(out), "--report_to", "wandb", "--wandb_tags", "baseline",
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=HANG_TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    run = load_run(find_run_file(out / "wandb"), until_exit=True)
    assert run.exited and (run.project, run.group, run.tags) == ("lab", "lab-1", ["baseline"])
    assert run.name.startswith("eval-") and run.config["max_new_tokens"] == 16
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert run.summary[key] == pytest.approx(metrics[key]), key
    assert [row for row in run.history if "predictions/nrows" in row][0]["predictions/nrows"] == 8
    assert metrics["command"].startswith("python scripts/evaluate.py --model_name_or_path")
    assert "--report_to wandb" in metrics["command"]
    assert metrics["package_versions"]["torch"] == torch.__version__ and "transformers" in metrics["package_versions"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert metrics["git_commit"] == head.stdout.strip() and isinstance(metrics["git_dirty"], bool)


def test_evaluate_without_report_to_starts_no_tracker(tmp_path: Path, trained_tiny_model: Path) -> None:
    from dialogsum.inference import parse_evaluate_args

    cfg = parse_evaluate_args(["--model_name_or_path", str(trained_tiny_model), "--output_dir", str(tmp_path / "o")])
    assert cfg.track.report_to == "none"
