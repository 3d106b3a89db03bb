"""The flag and YAML layer (dialogsum/config.py): any command line, any YAML file gives a Config or one
ConfigError line. In-process; the property tests generate the argv and files (hypothesis)."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dialogsum.config import Config, build_config, field_names, parse_config
from dialogsum.errors import ConfigError

PROPERTY = settings(
    max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

FLAGS = sorted(field_names())
#: Values a user might type after a flag: numbers of every kind, odd digits, text, booleans, paths, nothing.
TYPED = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["²", "١٢", "1_000", "0x10", "1e400", "-0", "", " ", "true", "no", "epoch", "..", "latest"]),
    st.text(max_size=12),
)
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.sampled_from(["²", "1e-3", "5"])
)
YAML_VALUES = st.recursive(
    YAML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
YAML_KEYS = st.one_of(st.sampled_from(FLAGS), st.text(max_size=10), st.integers(), st.booleans(), st.none())


def _config_or_one_error(argv: list[str], method: str = "full") -> Config | None:
    try:
        cfg = parse_config(argv, method)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(str(exc))
        assert exc.exit_code == 2
        return None
    assert isinstance(cfg, Config)
    return cfg


@PROPERTY
@given(
    pairs=st.lists(st.tuples(st.sampled_from(FLAGS), TYPED), max_size=4),
    method=st.sampled_from(["full", "lora"]),
    equals=st.booleans(),
)
def test_any_command_line_gives_a_config_or_one_error(pairs: list[tuple[str, str]], method: str, equals: bool) -> None:
    argv = ["--output_dir", "out"]
    for flag, value in pairs:
        argv += [f"--{flag}={value}"] if equals else [f"--{flag}", value]
    _config_or_one_error(argv, method)


@PROPERTY
@given(data=st.dictionaries(YAML_KEYS, YAML_VALUES, max_size=4), method=st.sampled_from(["full", "lora"]))
def test_any_yaml_file_gives_a_config_or_one_error(data: dict, method: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        _config_or_one_error(["--config", str(path), "--output_dir", "out"], method)


@PROPERTY
@given(text=st.text(max_size=200))
def test_any_yaml_text_gives_a_config_or_one_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _config_or_one_error(["--config", str(path), "--output_dir", "out"])


# ------------------------------------------------------------------------------------------------ cases


@pytest.mark.parametrize("value", ["²", "١٢", "1_0", " 5", "-3", "0"])
def test_checkpointing_steps_parsed_strictly(value: str) -> None:
    with pytest.raises(ConfigError, match="--checkpointing_steps must be a positive integer or 'epoch'"):
        build_config("full", {"output_dir": "o", "checkpointing_steps": value})


@pytest.mark.parametrize(("text", "key"), [("1: 2\n", "1"), ("true: x\n", "True"), ("null: 3\n", "None")])
def test_yaml_keys_must_be_names(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text + "learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=f"key {key} is not a name"):
        parse_config(["--config", str(path), "--output_dir", "o"], "full")


def test_deeply_nested_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: " + "[" * 1500 + "]" * 1500 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_config(["--config", str(path), "--output_dir", "o"], "full")


def test_config_from_a_pipe(tmp_path: Path) -> None:
    """``--config <(echo ...)``: the shell gives /dev/fd/N, a pipe."""
    import os
    import threading

    read_end, write_end = os.pipe()
    threading.Thread(target=lambda: (os.write(write_end, b"seed: 7\n"), os.close(write_end)), daemon=True).start()
    try:
        assert parse_config(["--config", f"/dev/fd/{read_end}", "--output_dir", "o"], "full").train.seed == 7
    finally:
        os.close(read_end)


def test_sagemaker_channel_without_a_readable_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    channel = tmp_path / "train"
    channel.mkdir()
    (channel / "train.tsv").write_text("dialogue\tsummary\n")
    (channel / "notes.txt").write_text("x")
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("SM_CHANNEL_TRAIN", str(channel))
    with pytest.raises(ConfigError) as caught:
        parse_config([], "full")
    assert str(caught.value) == (
        f"SM_CHANNEL_TRAIN={channel} holds no data file this project reads (found: notes.txt, train.tsv); give "
        "the channel a .jsonl, .json, .csv, .parquet, .jsonl.gz, .json.gz, .csv.gz file"
    )
    # an explicit --train_file does not need the channel; a compressed file in it is read
    no_eval = ["--do_eval", "false"]  # (no test channel here)
    assert parse_config(["--train_file", "t.jsonl", *no_eval], "full").data.train_file == "t.jsonl"
    (channel / "train.jsonl.gz").write_bytes(gzip.compress(b'{"dialogue": "a", "summary": "b"}\n'))
    assert parse_config(no_eval, "full").data.train_file == str(channel / "train.jsonl.gz")
