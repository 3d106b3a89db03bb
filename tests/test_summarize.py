"""summarize.py end to end on a tiny model: stdin, text file, jsonl and csv tables, adapters, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_TIMEOUT_S, REPO, run_script, subprocess_env

from dialogsum.config import DataArguments, LoraArguments
from dialogsum.errors import UserError
from dialogsum.inference import parse_summarize_args, read_dialogues, run_summarize

SCRIPT = REPO / "scripts" / "summarize.py"
FLAGS = ["--max_new_tokens", "24", "--per_device_eval_batch_size", "3", "--max_source_length", "96"]


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def model(trained_tiny_model: Path) -> Path:
    return trained_tiny_model


@pytest.fixture(scope="module")
def dialogues(quickstart_assets: tuple[Path, Path]) -> list[dict]:
    rows = (quickstart_assets[1] / "test.jsonl").read_text().splitlines()
    return [json.loads(line) for line in rows[:5]]


def summarize(model: Path, *args: str) -> list[dict]:
    return run_summarize(parse_summarize_args(["--model_name_or_path", str(model), *FLAGS, *args]))


def test_jsonl_table_to_output_file(model: Path, dialogues: list[dict], tmp_path: Path) -> None:
    source = tmp_path / "dialogues.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in dialogues))
    target = tmp_path / "summaries.jsonl"
    records = summarize(model, "--input_file", str(source), "--output_file", str(target))
    written = [json.loads(line) for line in target.read_text().splitlines()]
    assert written == records
    assert [r["id"] for r in written] == [row["fname"] for row in dialogues]
    assert all(set(r) == {"id", "summary"} for r in written)
    # The trained tiny model writes template words: most summaries share words with the reference.
    overlapping = [
        r for r, row in zip(written, dialogues, strict=True) if set(r["summary"].split()) & set(row["summary"].split())
    ]
    assert len(overlapping) >= 3
    # Batching does not change the result: one dialogue at a time gives the same summaries.
    one_by_one = summarize(model, "--input_file", str(source), "--per_device_eval_batch_size", "1")
    assert one_by_one == records


def test_csv_with_other_columns_and_row_ids(model: Path, dialogues: list[dict], tmp_path: Path, capsys) -> None:
    source = tmp_path / "chats.csv"
    with source.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["conversation"])
        writer.writeheader()
        writer.writerows({"conversation": row["dialogue"]} for row in dialogues[:3])
    records = summarize(model, "--input_file", str(source), "--text_column", "conversation")
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == records and [r["id"] for r in records] == ["0", "1", "2"]
    from_jsonl = summarize(model, "--input_file", str(_jsonl(tmp_path, dialogues[:3])))
    capsys.readouterr()
    assert [r["summary"] for r in records] == [r["summary"] for r in from_jsonl]  # newlines kept in CSV cells


def _jsonl(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_text_file_and_stdin(model: Path, dialogues: list[dict], tmp_path: Path) -> None:
    text = tmp_path / "meeting.txt"
    text.write_text(dialogues[0]["dialogue"] + "\n")
    from_file = summarize(model, "--input_file", str(text))
    assert [r["id"] for r in from_file] == ["meeting"]

    # Through the real script: stdout holds nothing but the JSON line.
    result = _run_with_stdin(model, dialogues[0]["dialogue"])
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"id": "stdin", "summary": from_file[0]["summary"]}
    ]


def _run_with_stdin(model: Path, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--model_name_or_path", str(model), *FLAGS],
        input=text,
        capture_output=True,
        text=True,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        timeout=HANG_TIMEOUT_S,
        check=False,
    )


def test_with_a_lora_adapter(model: Path, dialogues: list[dict], tmp_path: Path) -> None:
    from dialogsum.modeling import apply_lora, load_model

    adapter = tmp_path / "adapter"
    peft_model = apply_lora(load_model(str(model)), LoraArguments(lora_r=4, lora_alpha=8))
    peft_model.save_pretrained(str(adapter))  # B = 0: the adapter starts as the identity
    source = _jsonl(tmp_path, dialogues[:3])
    plain = summarize(model, "--input_file", str(source))
    with_adapter = run_summarize(
        parse_summarize_args(["--adapter_path", str(adapter), *FLAGS, "--input_file", str(source)])
    )
    assert with_adapter == plain


def test_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataArguments()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("#Person1#: Ol\xe1!".encode("latin-1"))
    no_column = tmp_path / "no_column.jsonl"
    no_column.write_text(json.dumps({"text": "hello"}) + "\n")
    blank_row = tmp_path / "blank_row.jsonl"
    blank_row.write_text(json.dumps({"dialogue": "hi"}) + "\n" + json.dumps({"dialogue": " "}) + "\n")
    empty_table = tmp_path / "empty.jsonl"
    empty_table.write_text("")
    cases = [
        (str(tmp_path / "missing.txt"), "--input_file not found"),
        (str(tmp_path), "is a directory"),
        (str(empty), "is empty: no dialogue to summarize"),
        (str(latin), "is not UTF-8 text (bad byte at line 1)"),
        (str(no_column), "has no column 'dialogue' (columns: text); set --text_column"),
        (str(blank_row), "row 2 has an empty 'dialogue'"),
        (str(empty_table), "data file is empty"),
    ]
    for path, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_dialogues(path, data)


def test_script_rejects_empty_stdin(model: Path) -> None:
    result = _run_with_stdin(model, "   \n")
    assert result.returncode == 1 and result.stdout == ""
    message = "error: no dialogue on standard input (pipe one in, or pass --input_file)"
    assert result.stderr.strip().splitlines() == [message]


def test_script_rejects_unreadable_file(model: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked.txt"
    locked.write_text("#Person1#: Hi.")
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        pytest.skip("file permissions are not enforced for this user (root)")
    target = tmp_path / "out.jsonl"
    command = [
        sys.executable,
        str(SCRIPT),
        "--model_name_or_path",
        str(model),
        "--input_file",
        str(locked),
        "--output_file",
        str(target),
    ]
    result = run_script(command, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 1 and "not readable" in result.stderr and not target.exists()
