"""The flag and YAML layer (dialogsum/config.py): any command line, any YAML file gives a Config or one
ConfigError line. In-process; the property tests generate the argv and files (hypothesis)."""

from __future__ import annotations

import gzip
import logging
import re
import runpy
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
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=20)  # lone surrogates aside
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
    path.write_text("seed: " + "[" * 600 + "]" * 600 + "\n")
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


# ------------------------------------------------------------------------------------- names and numbers


@pytest.mark.parametrize("project", ["../../elsewhere", "..", "a/b", "x\\y", "p" * 129])
def test_tracker_project_stays_a_name_inside_the_output_folder(project: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=f"--wandb_project {re.escape(repr(project))}: it "):
        parse_config(["--output_dir", "o", "--wandb_project", project], "full")
    monkeypatch.setenv("WANDB_PROJECT", project)
    with pytest.raises(ConfigError, match="WANDB_PROJECT"):
        parse_config(["--output_dir", "o"], "full")
    assert parse_config(["--output_dir", "o", "--report_to", "none"], "full").track.report_to == "none"


def test_names_longer_than_the_filesystem_allows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dialogsum.cli import run_cli

    long = "n" * 300
    for flag in ("--output_dir", "--train_file", "--checkpoint_dir", "--model_name_or_path"):
        with pytest.raises(ConfigError, match=f"^{flag} .*: a name in it is 300 bytes long, more than the 255"):
            parse_config(["--output_dir", "o", flag, str(tmp_path / long)], "full")
    with pytest.raises(SystemExit) as leaving:  # anywhere else a script meets such a name: one line, exit 1
        run_cli(lambda argv: (tmp_path / long / "metrics.json").is_file(), [])
    assert leaving.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(": a name in this path is longer than the filesystem allows"), err


def test_compare_seed_and_resamples_are_bounded(tmp_path: Path) -> None:
    from dialogsum.comparison import compare_runs

    runs = [f"a={tmp_path}", f"b={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^--seed must be in \[0, 4294967295\], got -1$"):
        compare_runs(runs, tmp_path / "c", seed=-1)
    with pytest.raises(ConfigError, match=r"^--n_resamples must be in \[1, 100000\]"):
        compare_runs(runs, tmp_path / "c", n_resamples=10**12)


def test_lab_stage_flags_with_open_quotes() -> None:
    from helpers import REPO

    stage_flags = runpy.run_path(str(REPO / "scripts" / "lab.py"))["stage_flags"]
    assert stage_flags("--full_args", "--seed 3 --run_name 'a b'") == ["--seed", "3", "--run_name", "a b"]
    with pytest.raises(ConfigError) as caught:
        stage_flags("--full_args", "--seed '3")
    assert str(caught.value) == '--full_args "--seed \'3" cannot be split into flags: no closing quotation'


# --------------------------------------------------------------------------------- settings that do nothing


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_quickstart_replacing_an_explicit_model_or_data_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    parse_config(["--output_dir", "o", "--quickstart", "--model_name_or_path", "m", "--train_file", "t.jsonl"], "lora")
    assert _warnings(caplog) == [
        "--quickstart trains its own tiny model on synthetic dialogues: --model_name_or_path, --train_file are "
        "ignored (leave out --quickstart to use them)"
    ]
    caplog.clear()
    parse_config(["--output_dir", "o", "--quickstart"], "lora")
    assert _warnings(caplog) == []


def test_settings_that_would_do_nothing_are_named() -> None:
    from dialogsum.config import idle_settings

    flags = {"output_dir": "o", "eval_steps": 50, "checkpointing_steps": "10", "load_best_model_at_end": True}
    cfg = build_config("full", {**flags, "early_stopping_patience": 2, "num_warmup_steps": 40})
    assert idle_settings(cfg, 40) == [
        "--eval_steps 50 is beyond the run's last optimizer step (40): no evaluation happens during training, so "
        "--load_best_model_at_end and --early_stopping_patience have no effect; use --eval_steps 40 or less",
        "the warm-up (40 steps) is not shorter than the run (40 optimizer steps): the learning rate never reaches "
        "5e-05; use a shorter --num_warmup_steps/--warmup_ratio",
    ]
    assert idle_settings(cfg, 100) == []
    assert idle_settings(build_config("lora", {"output_dir": "o", "warmup_ratio": 0.5}), 1) != []  # ceil(0.5) = 1
    assert idle_settings(build_config("lora", {"output_dir": "o", "eval_steps": 500}), 10) == []  # only logs loss


def test_same_dialogues_in_train_and_test_warn(caplog: pytest.LogCaptureFixture) -> None:
    from dialogsum.data import warn_shared_dialogues

    train = [{"dialogue": f"#P1#: hello {i}"} for i in range(5)]
    test = [{"dialogue": "#P1#:  hello 3\n"}, {"dialogue": "#P1#: new"}, {"dialogue": "#P1#: hello 4"}]
    warn_shared_dialogues({"train": train, "test": test, "validation": train[:1]}, "dialogue")
    assert _warnings(caplog) == [
        "1 of the 1 validation dialogues also appear in the training data (same text): validation scores on them "
        "measure memory, not summarization",
        "2 of the 3 test dialogues also appear in the training data (same text): test scores on them measure "
        "memory, not summarization",
    ]


@PROPERTY
@given(prompt=TEXT, name=TEXT)
def test_saved_config_reads_back_with_any_characters(prompt: str, name: str) -> None:
    """config.yaml, written by every run and read by --config and resumes, keeps any text as it was."""
    try:
        argv = ["--output_dir", "o", "--prompt_template", prompt + "{dialogue}", "--run_name", name]
        cfg = parse_config(argv, "full")
    except ConfigError:
        return
    with tempfile.TemporaryDirectory() as folder:
        cfg.save(Path(folder) / "config.yaml")
        again = parse_config(["--config", str(Path(folder) / "config.yaml")], "full")
    assert (again.data.prompt_template, again.track.run_name) == (cfg.data.prompt_template, cfg.track.run_name)


def test_config_yaml_keeps_next_line_and_line_separators(tmp_path: Path) -> None:
    cfg = parse_config(["--output_dir", "o", "--prompt_template", "\x85a\u2028b\u2029{dialogue}"], "full")
    cfg.save(tmp_path / "config.yaml")
    again = parse_config(["--config", str(tmp_path / "config.yaml")], "full")
    assert again.data.prompt_template == cfg.data.prompt_template


def test_compare_and_lab_flag_errors_are_one_line() -> None:
    from helpers import REPO

    for script, argv in (
        ("compare", ["--run", "a=x", "--output_dir", "o", "--seed", "x"]),
        ("lab", ["--num_samples", "x"]),
    ):
        main = runpy.run_path(str(REPO / "scripts" / f"{script}.py"))["main"]
        with pytest.raises(ConfigError) as caught:
            main(argv)
        assert str(caught.value).startswith("argument --") and str(caught.value).endswith(" (see --help)")


@PROPERTY
@given(pairs=st.lists(st.tuples(st.sampled_from(FLAGS), TYPED), max_size=4), summarize=st.booleans())
def test_any_evaluate_or_summarize_command_line_gives_a_config_or_one_error(
    pairs: list[tuple[str, str]], summarize: bool
) -> None:
    from dialogsum.inference import parse_evaluate_args, parse_summarize_args

    argv = ["--output_dir", "out"] if not summarize else []
    for flag, value in pairs:
        argv += [f"--{flag}={value}"]
    try:
        (parse_summarize_args if summarize else parse_evaluate_args)(argv)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(str(exc))
