"""Reading local text and table files with one clear error per problem. No torch import: cheap for CLIs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from dialogsum.errors import UserError

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

Row = dict[str, Any]


def decode_utf8(raw: bytes, source: str) -> str:
    """Bytes as UTF-8 text (a BOM is dropped); a bad byte is a :class:`UserError` naming its line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{source} is not UTF-8 text (bad byte at line {line}); re-save it as UTF-8") from exc


def read_text(path: str | Path) -> str:
    """A file's UTF-8 text, with one clear error when it cannot be read or decoded."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_utf8(raw, str(path))


def parse_jsonl(text: str, source: str) -> list[Row]:
    """JSON lines into a list of objects (blank lines skipped); a bad line is an error naming it."""
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: line {number} is not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise UserError(f"{source}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_rows(path: str | Path) -> list[Row]:
    """Read a local .jsonl/.json/.csv/.parquet file into a list of dicts, with one clear error per problem."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"data file not found: {file}")
    if file.is_dir():
        raise UserError(f"data file is a directory, expected a file: {file}")
    suffix = file.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise UserError(
            f"unsupported data file type {suffix or '(none)'} for {file}; use one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if file.stat().st_size == 0:
        raise UserError(f"data file is empty: {file}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(file).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
            raise UserError(f"cannot read parquet file {file}: {str(exc).splitlines()[0]}") from exc
    text = decode_utf8(file.read_bytes(), str(file))
    if suffix == ".csv":
        return [dict(r) for r in csv.DictReader(io.StringIO(text, newline=""))]  # keeps newlines in quoted fields
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # a .json file may also be JSON lines
        if data is not None:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{file}: expected a JSON list of objects (or JSON lines)")
            return data
    return parse_jsonl(text, str(file))
