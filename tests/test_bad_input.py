"""Bad input through the real training/evaluation scripts: one clear line, exit code != 0, no traceback, early.

Every case is a real ``python scripts/<x>.py`` process. They are started together (two at a time) in one
module fixture so the whole suite costs about a minute of wall time on 2 cores; each test then checks one case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import HANG_TIMEOUT_S, REPO, subprocess_env


@dataclass
class Case:
    """One bad-input run: script, flags, environment changes, and what the user must get back.

    (The fields after ``drop_env`` are used by test_hostile_inputs.py.)
    """

    script: str
    args: list[str]
    expect: list[str]
    exit_code: int = 1
    env: dict[str, str] = field(default_factory=dict)
    drop_env: tuple[str, ...] = ()
    unchanged: list[Path] = field(default_factory=list)
    """Files or folders the run must leave byte for byte as they were."""
    absent: list[Path] = field(default_factory=list)
    """Paths the run must not create."""
    check: Callable[[subprocess.CompletedProcess], None] | None = None
    """A further check of the finished process."""
    then: list[str] | None = None
    """Flags of a second run of the same script once the first succeeded (two-step cases)."""


@dataclass
class Outcome:
    """What came back from a case's process."""

    returncode: int
    stdout: str
    stderr: str


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _build_cases(root: Path, model_dir: Path, data_dir: Path) -> dict[str, Case]:
    """Write the bad files and folders under ``root`` and describe every case."""
    good = {s: str(data_dir / f"{s}.jsonl") for s in ("train", "validation", "test")}
    rows = [json.loads(x) for x in (data_dir / "train.jsonl").read_text().splitlines()[:8]]

    files = root / "files"
    files.mkdir()
    (files / "empty.jsonl").write_text("")
    (files / "train.txt").write_text("dialogue\tsummary\n")
    _jsonl(files / "wrong_columns.jsonl", [{"text": r["dialogue"], "abstract": r["summary"]} for r in rows])
    (files / "latin1.jsonl").write_bytes(
        (json.dumps(rows[0]) + "\n").encode() + b'{"dialogue": "caf\xe9", "summary": "x"}\n'
    )
    _jsonl(files / "all_empty.jsonl", [{"dialogue": "", "summary": "a"}, {"dialogue": "b", "summary": " "}] * 2)
    _jsonl(files / "one_empty.jsonl", [rows[0], {**rows[1], "summary": ""}, *rows[2:]])
    huge = {**rows[2], "dialogue": " ".join(["#Person1#: hello there, how are you today?"] * 5000)}
    _jsonl(files / "messy.jsonl", [rows[0], {**rows[1], "dialogue": "  "}, huge, *rows[3:], {**rows[4], "summary": ""}])

    decoder_only = root / "gpt2-like"
    decoder_only.mkdir()
    (decoder_only / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "is_encoder_decoder": False})
    )
    not_an_adapter = root / "not-an-adapter"
    not_an_adapter.mkdir()
    (not_an_adapter / "adapter_model.safetensors").write_bytes(b"")
    full_output = root / "used-output"
    full_output.mkdir()
    (full_output / "metrics.json").write_text("{}")
    (full_output / ".dialogsum-manifest.json").write_text('{"format": 1, "entries": ["metrics.json"]}')  # a run's
    hf_home = root / "empty-hf-home"  # nothing cached: a hub id must really be fetched
    hf_home.mkdir()

    counter = iter(range(1000))

    def common(**override: str) -> list[str]:
        flags = {
            "model_name_or_path": str(model_dir),
            "train_file": good["train"],
            "validation_file": good["validation"],
            "test_file": good["test"],
            "output_dir": str(root / f"out{next(counter)}"),
            "report_to": "none",
            "max_train_steps": "1",
            "per_device_train_batch_size": "4",
            "do_eval": "false",
            **override,
        }
        return [a for k, v in flags.items() for a in (f"--{k}", v)]

    offline_unset = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return {
        "unknown flag": Case("train_full.py", [*common(), "--bogus", "1"], ["unrecognized arguments: --bogus"], 2),
        "mistyped flag": Case(
            "train_full.py", [*common(), "--learning_rat", "1e-4"], ["unrecognized arguments: --learning_rat"], 2
        ),
        "negative learning rate": Case(
            "train_full.py", common(learning_rate="-0.001"), ["--learning_rate must be in (0, 1)"], 2
        ),
        "lora_r 0": Case("train_lora.py", common(lora_r="0"), ["--lora_r must be > 0, got 0"], 2),
        "batch size 0": Case(
            "train_full.py", common(per_device_train_batch_size="0"), ["--per_device_train_batch_size must be > 0"], 2
        ),
        "not a number": Case("train_full.py", common(num_train_epochs="two"), ["invalid float value: 'two'"], 2),
        "missing file": Case(
            "train_full.py", common(train_file=str(files / "nope.jsonl")), ["data file not found", "nope.jsonl"]
        ),
        "unknown extension": Case(
            "train_full.py", common(train_file=str(files / "train.txt")), ["unsupported data file type .txt"]
        ),
        "empty file": Case("train_full.py", common(train_file=str(files / "empty.jsonl")), ["data file is empty"]),
        "missing columns": Case(
            "train_lora.py",
            common(train_file=str(files / "wrong_columns.jsonl")),
            ["has no column 'dialogue'", "columns: text, abstract", "--text_column"],
        ),
        "non-UTF-8 bytes": Case(
            "train_full.py",
            common(train_file=str(files / "latin1.jsonl")),
            ["is not UTF-8 text (bad byte at line 2)", "re-save it as UTF-8"],
        ),
        "zero rows after filtering": Case(
            "train_full.py",
            common(train_file=str(files / "all_empty.jsonl")),
            ["no usable rows left after dropping 4 empty row(s)"],
        ),
        "empty summary with --strict": Case(
            "train_full.py",
            [*common(train_file=str(files / "one_empty.jsonl")), "--strict"],
            ["row 2 has an empty summary (--strict)"],
        ),
        "model dir missing": Case(
            "train_full.py", common(model_name_or_path=str(root / "no-model")), ["model directory not found"]
        ),
        "model is not seq2seq": Case(
            "train_lora.py",
            common(model_name_or_path=str(decoder_only)),
            ["is not a seq2seq (encoder-decoder) model (GPT2LMHeadModel)"],
        ),
        "adapter without adapter_config.json": Case(
            "evaluate.py",
            [
                "--model_name_or_path",
                str(model_dir),
                "--adapter_path",
                str(not_an_adapter),
                "--test_file",
                good["test"],
                "--output_dir",
                str(root / "eval-out"),
            ],
            ["not a LoRA adapter folder (no adapter_config.json)"],
        ),
        "unreachable hub model": Case(
            "train_full.py",
            common(model_name_or_path="google/flan-t5-base"),
            ["cannot fetch model 'google/flan-t5-base'", "--model_name_or_path /path/to/local/model"],
            env={"HF_HOME": str(hf_home)},
            drop_env=offline_unset,
        ),
        "unreachable hub dataset": Case(
            "train_full.py",
            [a for a in common() if not a.endswith(".jsonl") and not a.endswith("_file")],
            ["cannot fetch dataset 'knkarthick/dialogsum'", "--train_file"],
            env={"HF_HOME": str(hf_home)},
            drop_env=offline_unset,
        ),
        "non-empty output_dir": Case(
            "train_full.py", common(output_dir=str(full_output)), ["is not empty", "--overwrite_output_dir"]
        ),
        "resume from a folder that is not a checkpoint": Case(
            "train_full.py",
            [*common(), "--resume_from_checkpoint", str(full_output)],
            ["is not a complete checkpoint (no trainer_state.json)"],
        ),
        "fp16 with T5": Case(
            "train_full.py",
            common(),
            ["fp16 is not supported for T5", "use bf16"],
            env={"ACCELERATE_MIXED_PRECISION": "fp16"},
        ),
        # not an error: long and empty rows are handled, counted and reported, and training goes on
        "long row and empty rows (trains)": Case(
            "train_full.py",
            common(train_file=str(files / "messy.jsonl"), max_source_length="64"),
            ["skipped 2 row(s) with an empty dialogue or summary", "1 prompt(s) and 0 summary(ies) truncated"],
            exit_code=0,
        ),
    }


def _run_case(case: Case, log_dir: Path, name: str) -> Outcome:
    """Run one case as a real process; its output goes to files (two cases run at once)."""
    env = subprocess_env(OMP_NUM_THREADS="1", **case.env)
    for var in case.drop_env:
        env.pop(var, None)
    slug = "".join(c if c.isalnum() else "_" for c in name)
    out_path, err_path = log_dir / f"{slug}.out", log_dir / f"{slug}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / case.script), *case.args],
            stdout=out,
            stderr=err,
            env=env,
            cwd=str(REPO),
            timeout=HANG_TIMEOUT_S,
        )
    return Outcome(proc.returncode, out_path.read_text(), err_path.read_text())


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, quickstart_assets: tuple[Path, Path]) -> dict[str, Case]:
    """Every case, with its files written."""
    model_dir, data_dir = quickstart_assets
    return _build_cases(tmp_path_factory.mktemp("bad_input"), model_dir, data_dir)


@pytest.fixture(scope="module")
def outcomes(cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Run all cases, two processes at a time (2 cores)."""
    logs = tmp_path_factory.mktemp("bad_input_logs")
    runnable = {n: c for n, c in cases.items() if (REPO / "scripts" / c.script).is_file()}
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run_case, case, logs, name) for name, case in runnable.items()}
        return {name: f.result() for name, f in futures.items()}


CASE_NAMES = [
    "unknown flag",
    "mistyped flag",
    "negative learning rate",
    "lora_r 0",
    "batch size 0",
    "not a number",
    "missing file",
    "unknown extension",
    "empty file",
    "missing columns",
    "non-UTF-8 bytes",
    "zero rows after filtering",
    "empty summary with --strict",
    "model dir missing",
    "model is not seq2seq",
    "adapter without adapter_config.json",
    "unreachable hub model",
    "unreachable hub dataset",
    "non-empty output_dir",
    "resume from a folder that is not a checkpoint",
    "fp16 with T5",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_line(name: str, cases: dict[str, Case], outcomes: dict[str, Outcome]) -> None:
    if name not in outcomes:
        pytest.skip(f"scripts/{cases[name].script} is not in this checkout")
    case, out = cases[name], outcomes[name]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == case.exit_code, out.stderr[-2000:]
    assert len(errors) == 1, out.stderr[-2000:]
    for text in case.expect:
        assert text in errors[0], errors[0]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]


def test_bad_inputs_fail_before_any_model_is_loaded(outcomes: dict[str, Outcome]) -> None:
    """Data, path and precision mistakes are caught before the model: no parameter report was printed."""
    for name in CASE_NAMES:
        if name in outcomes and name != "adapter without adapter_config.json":
            assert "trainable" not in outcomes[name].stderr, name


def test_long_and_empty_rows_are_counted_not_fatal(outcomes: dict[str, Outcome]) -> None:
    out = outcomes["long row and empty rows (trains)"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped 2 row(s) with an empty dialogue or summary (use --strict to refuse)" in out.stderr
    assert "1 prompt(s) and 0 summary(ies) truncated" in out.stderr
