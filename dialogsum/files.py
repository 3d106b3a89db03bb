"""Reading and writing local files: one clear error per problem on read, atomic writes. No torch import."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
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
        return _read_csv(text, file)
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


def _read_csv(text: str, file: Path) -> list[Row]:
    """CSV rows as dicts; a row with more or fewer fields than the header is an error naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": keeps newlines inside quoted fields
    header = next(reader, [])
    rows: list[Row] = []
    for record in reader:
        if not record:
            continue  # a blank line
        if len(record) != len(header):
            hint = ""
            if len(header) == 1 and any(sep in header[0] for sep in (";", "\t", "|")):
                hint = " (it looks separated by something other than commas: save it as comma-separated or .jsonl)"
            raise UserError(
                f"{file}: line {reader.line_num} has {len(record)} field(s) but the header has {len(header)}{hint}"
            )
        rows.append(dict(zip(header, record)))
    return rows


def describe_value(value: Any) -> str:
    """What a cell holds, for messages: 'a number (42)', 'a boolean (true)', 'an object', 'a list'."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------------------------- writing
# The one writer of the project: every result file (metrics, predictions, reports, cards, plots, comparison,
# checkpoint metadata) goes through these, so a crash or a full disk never leaves a half-written file under its
# final name.


def _new_file_mode() -> int:
    """Permissions a plain ``open`` would give a new file under the current umask (mkstemp alone gives 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temporary_copy(path: Path, data: bytes, sync: bool) -> str:
    """Write ``data`` to a hidden temporary file beside ``path``; return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            if sync:
                stream.flush()
                os.fsync(stream.fileno())
        os.chmod(tmp, _new_file_mode())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_bytes(path: str | Path, data: bytes, sync: bool = False) -> Path:
    """Write ``data`` atomically: a temporary file beside ``path``, renamed into place (fsynced if ``sync``)."""
    return write_files({Path(path).name: data}, Path(path).parent, sync=sync)[0]


def write_files(files: Mapping[str, bytes], directory: str | Path, sync: bool = False) -> list[Path]:
    """Write several files into ``directory``: all are written under temporary names first, then renamed.

    A failure while writing (e.g. a full disk) leaves every earlier version of these files as it was.
    """
    folder = Path(directory)
    temporary: dict[str, str] = {}
    try:
        for name, data in files.items():
            temporary[name] = _temporary_copy(folder / name, data, sync)
        for name, tmp in temporary.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in temporary.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [folder / name for name in files]


def write_text(path: str | Path, text: str, sync: bool = False) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"), sync=sync)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN/inf, which JSON cannot hold) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """Indented JSON (UTF-8 kept readable); NaN/inf become ``null`` so the file stays valid JSON."""
    return json.dumps(json_safe(data), indent=2, ensure_ascii=False) + "\n"


def write_json(path: str | Path, data: Any, sync: bool = False) -> Path:
    """Write ``data`` as indented JSON atomically."""
    return write_text(path, json_text(data), sync=sync)


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object per line."""
    return "".join(json.dumps(json_safe(row), ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write JSON lines atomically."""
    return write_text(path, jsonl_text(rows))
