"""The one reader (dialogsum/files.py): whatever a user hands it, rows or one UserError; whatever the project
wrote, read back as it was. In-process and fast; the property tests generate the inputs (hypothesis)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dialogsum.errors import UserError
from dialogsum.files import (
    jsonl_text,
    read_json_object,
    read_jsonl,
    read_rows,
    read_text,
    write_json,
    write_jsonl,
    write_text,
)

#: Few examples each: the properties run in a few seconds (the suite's budget), and each run explores anew.
PROPERTY = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

#: Characters that str.splitlines breaks at but JSON keeps inside strings (a JSON Lines file splits on \n only).
LINE_BREAKERS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e\r"

#: JSON values of any shape (what a JSON file may hold).
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz", ".csv.gz")


def _rows_or_one_error(path: Path) -> list[dict] | None:
    """read_rows' result: a list of dicts, or None after a one-line UserError; anything else fails the test."""
    try:
        rows = read_rows(path)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return None
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    return rows


# ------------------------------------------------------------------------------------------- properties


@PROPERTY
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES), gz=st.booleans())
def test_any_bytes_give_rows_or_one_error(data: bytes, suffix: str, gz: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(gzip.compress(data) if gz else data)
        _rows_or_one_error(path)


@PROPERTY
@given(text=st.text(max_size=300), suffix=st.sampled_from(SUFFIXES))
def test_any_unicode_gives_rows_or_one_error(text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        raw = text.encode("utf-8", "surrogatepass")  # lone surrogates too: not UTF-8, refused in one line
        path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
        _rows_or_one_error(path)


@PROPERTY
@given(values=st.lists(JSON_VALUES, max_size=5), as_list=st.booleans())
def test_any_json_shape_gives_rows_or_one_error(values: list, as_list: bool) -> None:
    """JSON of any shape (objects, lists, scalars, nested) as .json and as .jsonl."""
    with tempfile.TemporaryDirectory() as folder:
        text = json.dumps(values) if as_list else "".join(json.dumps(v) + "\n" for v in values)
        for suffix in (".json", ".jsonl"):
            path = Path(folder) / f"data{suffix}"
            path.write_text(text, encoding="utf-8")
            rows = _rows_or_one_error(path)
            if rows is not None and values and all(isinstance(v, dict) for v in values):
                assert rows == values


TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]))  # any character, lone surrogates aside


@PROPERTY
@given(rows=st.lists(st.dictionaries(TEXT, TEXT | st.lists(TEXT, max_size=3), max_size=4), min_size=1, max_size=5))
def test_text_with_any_characters_survives_the_write_read_round_trip(rows: list[dict]) -> None:
    """What the project writes (predictions.jsonl, metrics.json, any text) reads back identical."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        assert read_jsonl(write_jsonl(out / "predictions.jsonl", rows)) == rows
        assert read_rows(out / "predictions.jsonl") == rows
        assert read_json_object(write_json(out / "metrics.json", {"rows": rows})) == {"rows": rows}
        text = "".join(str(v) for row in rows for v in row.values())
        assert read_text(write_text(out / "report.md", text)) == text.removeprefix("\ufeff")


# ------------------------------------------------------------------------------------------- JSON lines


def test_jsonl_splits_on_newline_only(tmp_path: Path) -> None:
    rows = [{"id": str(i), "prediction": f"a{c}b", "dialogue": f"#P1#: x{c}y"} for i, c in enumerate(LINE_BREAKERS)]
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    assert len(path.read_bytes().split(b"\n")) == len(rows) + 1
    assert read_jsonl(path) == rows
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(jsonl_text(rows).replace("\n", "\r\n").encode())
    assert read_rows(crlf) == rows


def test_projects_own_predictions_read_back_by_compare(tmp_path: Path) -> None:
    from dialogsum.comparison import _load_predictions

    rows = [
        {"id": "a", "dialogue": "x\u2028y", "references": ["r\u0085s"], "prediction": "p\u2029q"},
        {"id": "b", "dialogue": "z\x1cw", "references": ["t"], "prediction": "u\rv"},
    ]
    ids, dialogues, references, predictions = _load_predictions(write_jsonl(tmp_path / "predictions.jsonl", rows))
    assert ids == ["a", "b"] and dialogues == ["x\u2028y", "z\x1cw"] and predictions == ["p\u2029q", "u\rv"]
    assert references == [["r\u0085s"], ["t"]]


# ------------------------------------------------------------------------------------- streams and gzip


def _feed(path: str, data: bytes) -> threading.Thread:
    def write() -> None:
        with open(path, "wb") as stream:
            stream.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


ROWS = [{"dialogue": "#P1#: hi\u2028there", "summary": "a greeting"}, {"dialogue": "#P2#: bye", "summary": "leaving"}]


@pytest.mark.parametrize("name", ["train.jsonl", "train"])
def test_a_fifo_is_read_as_a_stream(tmp_path: Path, name: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    from dialogsum.config import DataArguments
    from dialogsum.data import check_data_sources

    check_data_sources(DataArguments(train_file=str(fifo)), ["train"])  # checks, leaves the pipe unread
    writer = _feed(str(fifo), jsonl_text(ROWS).encode())
    assert read_rows(fifo) == ROWS  # a name without a format: the content says JSON lines
    writer.join(5)


@pytest.mark.parametrize("content", ["jsonl", "csv", "gzip"])
def test_dev_fd_of_a_process_substitution(content: str) -> None:
    """``--train_file <(zcat train.jsonl.gz)`` gives /dev/fd/N, a pipe without a file extension."""
    data = {
        "jsonl": jsonl_text(ROWS).encode(),
        "csv": b"dialogue,summary\n" + b"".join(f'"{r["dialogue"]}",{r["summary"]}\n'.encode() for r in ROWS),
        "gzip": gzip.compress(jsonl_text(ROWS).encode()),
    }[content]
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, data), os.close(write_end)), daemon=True)
    writer.start()
    try:
        assert read_rows(f"/dev/fd/{read_end}") == ROWS
    finally:
        writer.join(5)
        os.close(read_end)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".csv.gz"])
def test_gzip_compressed_tables(tmp_path: Path, suffix: str) -> None:
    if suffix == ".csv.gz":
        text = "dialogue,summary\n" + "".join(f'"{r["dialogue"]}",{r["summary"]}\n' for r in ROWS)
    else:
        text = json.dumps(ROWS) if suffix == ".json.gz" else jsonl_text(ROWS)
    path = tmp_path / f"train{suffix}"
    path.write_bytes(gzip.compress(text.encode()))
    assert read_rows(path) == ROWS


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: Path("/dev/null"), "data file /dev/null is a character device, not a file or a pipe"),
        (lambda d: d / "missing.jsonl", "data file not found: "),
        (lambda d: d, "data file is a directory, expected a file"),
        (lambda d: d / ("x" * 300 + ".jsonl"), "File name too long"),
        (lambda d: d / "fake.jsonl.gz", "is named .gz but is not gzip-compressed"),
        (lambda d: d / "cut.jsonl.gz", "is not a valid gzip file"),
        (lambda d: d / "plain.txt", "unsupported data file type .txt"),
    ],
)
def test_unreadable_inputs_say_why(tmp_path: Path, make, message: str) -> None:
    (tmp_path / "fake.jsonl.gz").write_text(jsonl_text(ROWS))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl_text(ROWS).encode())[:20])
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(UserError) as caught:
        read_rows(make(tmp_path))
    assert message in str(caught.value)


# ----------------------------------------------------------------------------------- pathological input


def test_a_csv_field_over_the_csv_limit_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text(f'dialogue,summary\n"{"x" * (csv.field_size_limit() + 1)}",s\n')
    with pytest.raises(UserError, match=r"train.csv: line \d+ is not valid CSV \(field larger than field limit"):
        read_rows(path)


def test_a_repeated_csv_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("dialogue,summary,dialogue\na,b,c\n")
    with pytest.raises(UserError, match="names column\\(s\\) 'dialogue' more than once"):
        read_rows(path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_is_one_line(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"train{suffix}"
    path.write_text('{"dialogue": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(UserError, match="is not usable JSON: nested too deeply"):
        read_rows(path)


def test_huge_integer_and_lone_surrogate_are_one_line(tmp_path: Path) -> None:
    big, lone = tmp_path / "big.jsonl", tmp_path / "lone.jsonl"
    big.write_text('{"dialogue": ' + "9" * 5000 + "}\n")
    lone.write_text('{"dialogue": "a\\ud800b", "summary": "s"}\n')
    with pytest.raises(UserError, match="big.jsonl: line 1 is not usable JSON"):
        read_rows(big)
    with pytest.raises(UserError, match=r"unpaired UTF-16 surrogate escape \(\\ud800\)"):
        read_rows(lone)


@pytest.mark.parametrize("text", ["[1, 2]", '"text"', "3", "null"])
def test_a_config_or_state_of_the_wrong_json_type(tmp_path: Path, text: str) -> None:
    from dialogsum.checkpointing import STATE_FILE, read_state
    from dialogsum.comparison import _load_metrics
    from dialogsum.modeling import check_model_source

    (tmp_path / STATE_FILE).write_text(text)
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "metrics.json").write_text(text)
    with pytest.raises(UserError, match=f"{STATE_FILE} must hold a JSON object, but holds"):
        read_state(tmp_path)
    with pytest.raises(UserError, match="config.json must hold a JSON object"):
        check_model_source(str(tmp_path))
    with pytest.raises(UserError, match="metrics.json must hold a JSON object"):
        _load_metrics(tmp_path / "metrics.json")


def test_a_log_cut_mid_line_keeps_its_whole_lines(tmp_path: Path) -> None:
    from dialogsum.files import parse_jsonl

    text = jsonl_text([{"step": 1}, {"step": 2}]) + '{"step": 3, "lo'
    assert parse_jsonl(text, "log", cut_end_ok=True) == [{"step": 1}, {"step": 2}]
    with pytest.raises(UserError, match="log: line 3 is not valid JSON"):
        parse_jsonl(text, "log")
    with pytest.raises(UserError, match="log: line 2 is not valid JSON"):  # only the unfinished last line may go
        parse_jsonl('{"step": 1}\n{"st\n{"step": 3}\n', "log", cut_end_ok=True)


@PROPERTY
@given(
    data=st.one_of(st.binary(max_size=300), st.lists(JSON_VALUES, max_size=4).map(lambda v: jsonl_text_of(v))),
    suffix=st.sampled_from([*SUFFIXES, ".txt", ""]),
)
def test_summarize_and_compare_inputs_of_any_shape(data: bytes, suffix: str) -> None:
    """summarize.py's --input_file and compare.py's predictions.jsonl: their values, or one UserError line."""
    from dialogsum.comparison import _load_predictions
    from dialogsum.config import DataArguments
    from dialogsum.inference import read_dialogues

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"input{suffix}"
        path.write_bytes(data)
        for read in (lambda: read_dialogues(str(path), DataArguments()), lambda: _load_predictions(path)):
            try:
                read()
            except UserError as exc:
                assert str(exc) and "\n" not in str(exc), repr(str(exc))


def jsonl_text_of(values: list) -> bytes:
    """JSON values as JSON lines (objects or not), for the property tests."""
    return "".join(json.dumps(v) + "\n" for v in values).encode()
