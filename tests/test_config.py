"""Config: defaults, YAML + CLI precedence, validation errors (exit code 2), method defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, subprocess_env

from dialogsum.config import DEFAULT_LEARNING_RATE, LAB_PROMPT, parse_config
from dialogsum.errors import ConfigError


def test_defaults_are_the_labs() -> None:
    cfg = parse_config(["--output_dir", "out"], "lora")
    assert cfg.model.model_name_or_path == "google/flan-t5-base"
    assert cfg.data.dataset_name == "knkarthick/dialogsum"
    assert cfg.data.prompt_template == "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
    assert (cfg.lora.lora_r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (32, 32, 0.05)
    assert cfg.lora.lora_target_modules == ["q", "v"]
    assert (cfg.data.max_source_length, cfg.data.max_target_length) == (512, 128)
    assert cfg.learning_rate == DEFAULT_LEARNING_RATE["lora"] == 1e-3
    assert parse_config(["--output_dir", "out"], "full").learning_rate == DEFAULT_LEARNING_RATE["full"]


def test_yaml_then_cli_precedence(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": "from_yaml",
                "learning_rate": 0.002,
                "lora_r": 8,
                "lora_target_modules": ["q", "k", "v"],
                "group_by_length": False,
            }
        )
    )
    cfg = parse_config(["--config", str(config), "--lora_r", "16"], "lora")
    assert cfg.train.output_dir == "from_yaml"
    assert cfg.learning_rate == 0.002
    assert cfg.lora.lora_r == 16  # CLI wins over the file
    assert cfg.lora.lora_target_modules == ["q", "k", "v"]
    assert cfg.data.group_by_length is False


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = parse_config(["--output_dir", "o", "--max_train_steps", "7", "--prompt_template", "Sum: {dialogue}"], "full")
    cfg.save(tmp_path / "config.yaml")
    again = parse_config(["--config", str(tmp_path / "config.yaml")], "full")
    assert again == cfg


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--learning_rate", "-1"], "--learning_rate must be in (0, 1)"),
        (["--lora_r", "0"], "--lora_r must be > 0"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be > 0"),
        (["--prompt_template", "no placeholder"], "must contain the placeholder {dialogue}"),
        (["--report_to", "mlflow"], "--report_to must be one of"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps must be a positive integer or 'epoch'"),
        (["--early_stopping_patience", "2"], "--early_stopping_patience needs --eval_steps"),
    ],
)
def test_invalid_values_raise_config_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(["--output_dir", "o", *argv], "lora")
    assert message in str(info.value)
    assert info.value.exit_code == 2


def test_missing_output_dir_and_unknown_yaml_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--output_dir is required"):
        parse_config([], "full")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: o\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) learning_rat"):
        parse_config(["--config", str(bad)], "full")


def test_quickstart_defaults_yield_to_explicit_flags() -> None:
    cfg = parse_config(["--output_dir", "o", "--quickstart", "--num_train_epochs", "2"], "lora")
    assert cfg.train.quickstart and cfg.train.num_train_epochs == 2.0
    assert cfg.train.per_device_train_batch_size == 16  # from the preset
    assert cfg.track.report_to == "tensorboard"


def test_sagemaker_environment_supplies_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    (train_dir / "train.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n')
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("SM_CHANNEL_TRAIN", str(train_dir))
    cfg = parse_config([], "full")
    assert cfg.train.output_dir == str(tmp_path / "model")
    assert cfg.data.train_file == str(train_dir / "train.jsonl")


def test_cli_bad_flag_is_one_line_exit_2() -> None:
    for argv, expected in (
        (["--bogus_flag"], "unrecognized arguments: --bogus_flag"),
        (["--output_dir", "o", "--lora_r", "0"], "error: --lora_r must be > 0"),
    ):
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "train_lora.py"), *argv],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
        )
        assert proc.returncode == 2
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_help_documents_every_flag() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_full.py"), "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert proc.returncode == 0
    for flag in (
        "--model_name_or_path",
        "--train_file",
        "--per_device_train_batch_size",
        "--lora_r",
        "--max_new_tokens",
        "--report_to",
        "--quickstart",
        "--resume_from_checkpoint",
    ):
        assert flag in proc.stdout
    assert LAB_PROMPT.splitlines()[0] in proc.stdout.replace("\n", " ") or "prompt" in proc.stdout
