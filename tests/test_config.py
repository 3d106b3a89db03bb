"""Config: defaults, YAML + CLI precedence, validation errors (exit code 2), method defaults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import HANG_TIMEOUT_S, REPO, subprocess_env

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
        (["--optim", "sgd"], "--optim must be one of adamw, adafactor, got 'sgd'"),
        (["--label_smoothing_factor", "1"], "--label_smoothing_factor must be in [0, 1), got 1.0"),
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
    cfg = parse_config(["--do_eval", "false"], "full")  # a train channel only: nothing to evaluate on
    assert cfg.train.output_dir == str(tmp_path / "model")
    assert cfg.data.train_file == str(train_dir / "train.jsonl")


def sagemaker_argv(hyperparameters: dict) -> list[str]:
    """The arguments SageMaker's training toolkit puts after the script: sorted keys, each value as ``str(value)``
    in one argument (sagemaker_training.mapping.to_cmd_args), so a list arrives as ``['q', 'v']``."""
    return [item for key in sorted(hyperparameters) for item in (f"--{key}", str(hyperparameters[key]))]


def test_sagemaker_list_hyperparameters_and_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    channels = {}
    for channel in ("train", "validation"):
        channels[channel] = tmp_path / channel
        channels[channel].mkdir()
        (channels[channel] / f"{channel}.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n')
        monkeypatch.setenv(f"SM_CHANNEL_{channel.upper()}", str(channels[channel]))
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    hyper = {"lora_target_modules": ["q", "k", "v"], "wandb_tags": ["sm", "spot"], "eval_split": "validation"}
    argv = sagemaker_argv(hyper)
    assert argv[:2] == ["--eval_split", "validation"] and "['q', 'k', 'v']" in argv
    cfg = parse_config(argv, "lora")
    assert cfg.lora.lora_target_modules == ["q", "k", "v"] and cfg.track.wandb_tags == ["sm", "spot"]
    # the JSON spelling, and plain separate items, give the same list
    for spelling in (['["q","v"]'], ["q", "v"]):
        lora = parse_config([*argv[:2], "--lora_target_modules", *spelling], "lora").lora
        assert lora.lora_target_modules == ["q", "v"]
    with pytest.raises(ConfigError, match=r"--lora_target_modules: cannot read \['q', 'v' as a list; .* --config"):
        parse_config([*argv[:2], "--lora_target_modules", "['q', 'v'"], "lora")
    # no test channel: the default --eval_split test says what to set
    with pytest.raises(ConfigError) as error:
        parse_config(sagemaker_argv({"lora_target_modules": ["q", "v"]}), "lora")
    assert str(error.value) == (
        "SageMaker: --eval_split test (the default) needs a 'test' channel and this job has train, validation "
        "channel(s) only; set the hyperparameter eval_split='validation' to evaluate on the validation channel, "
        "or pass a 'test' channel to fit()"
    )


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
            timeout=HANG_TIMEOUT_S,
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
        timeout=HANG_TIMEOUT_S,
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


def _from_yaml(tmp_path: Path, text: str, *argv: str, method: str = "lora"):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: o\n" + text)
    return parse_config(["--config", str(config), *argv], method)


def test_yaml_values_are_parsed_like_flags(tmp_path: Path) -> None:
    """Issue 15: a YAML value means what the same text after its flag means (PyYAML's own typing aside)."""
    cfg = _from_yaml(tmp_path, 'lora_target_modules: wo\nlearning_rate: 1e-3\nmax_train_steps: "5"\ndo_train: "no"\n')
    assert cfg.lora.lora_target_modules == ["wo"]  # one name, not the letters w and o
    assert cfg.train.learning_rate == 1e-3  # PyYAML reads 1e-3 as a string
    assert cfg.train.max_train_steps == 5 and cfg.train.do_train is False
    assert _from_yaml(tmp_path, "tokenizer_name: null\nwarmup_ratio: 0\n").train.warmup_ratio == 0.0
    assert _from_yaml(
        tmp_path, "lora_target_modules: [q, k]\n", "--lora_target_modules", "v"
    ).lora.lora_target_modules == ["v"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_train_steps: 2.7\n", "max_train_steps: invalid int value: '2.7'"),
        ("max_train_steps: true\n", "max_train_steps expects an integer, got true"),
        ("run_name: yes\n", "run_name expects text, got true (quote it if you mean the text)"),
        ("do_train: maybe\n", "do_train: Truthy value expected: got maybe"),
        ("lora_target_modules: [q, [v]]\n", "lora_target_modules expects a list of text values, got a list"),
        ("per_device_train_batch_size: null\n", "per_device_train_batch_size expects an integer, got nothing (null)"),
        ("learning_rat: 0.1\n", "unknown key(s) learning_rat"),
    ],
)
def test_yaml_values_the_flag_would_refuse(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _from_yaml(tmp_path, text)
    assert message in str(info.value) and str(tmp_path / "run.yaml") in str(info.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--length_penalty", "nan"], "--length_penalty must be a finite number, got nan"),
        (["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number, got inf"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["--seed", "4294967296"], "--seed must be in [0, 4294967295], got 4294967296"),
        (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "pass only one of them"),
        (["--length_buckets", "yes"], "--length_buckets must be one of auto, on, off, got 'yes'"),
        (["--max_tokens_per_batch", "0"], "--max_tokens_per_batch must be > 0, got 0"),
        (
            ["--max_tokens_per_batch", "600"],
            "--max_tokens_per_batch 600 does not fit one example of the maximum size: --max_source_length 512 + "
            "--max_target_length 128 = 640 padded tokens; use at least 640",
        ),
    ],
)
def test_values_that_make_no_sense(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(["--output_dir", "o", *argv], "full")
    assert message in str(info.value)


def test_switches_take_the_hf_forms() -> None:
    """HfArgumentParser's forms: a bare switch, an explicit value, and --no_<name> for those on by default."""
    cfg = parse_config(["--output_dir", "o", "--strict", "--no_do_eval", "--group_by_length", "false"], "full")
    assert cfg.data.strict is True and cfg.train.do_eval is False and cfg.data.group_by_length is False


def test_token_budget_and_length_bucket_flags() -> None:
    cfg = parse_config(["--output_dir", "o", "--max_tokens_per_batch", "16384", "--length_buckets", "on"], "full")
    assert cfg.data.max_tokens_per_batch == 16384 and cfg.data.length_buckets == "on"
    default = parse_config(["--output_dir", "o"], "lora")
    assert default.data.max_tokens_per_batch is None and default.data.length_buckets == "auto"
    small = ["--output_dir", "o", "--max_source_length", "96", "--max_target_length", "32"]
    assert parse_config([*small, "--max_tokens_per_batch", "128"], "full").data.max_tokens_per_batch == 128
