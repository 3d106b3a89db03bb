"""Reading and writing local files: one clear error per problem on read, atomic writes. No torch import."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dialogsum.errors import UserError
from dialogsum.formatting import shorten

#: Table formats read as rows. Text formats may also come gzip-compressed (``train.jsonl.gz``).
TABLE_FORMATS = (".jsonl", ".json", ".csv", ".parquet")
COMPRESSED_FORMATS = (".jsonl.gz", ".json.gz", ".csv.gz")
SUPPORTED_EXTENSIONS = (*TABLE_FORMATS, *COMPRESSED_FORMATS)

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
# A JSON escape of a lone UTF-16 surrogate (\ud800): json.loads accepts it, but the string is not text (it
# cannot be encoded, tokenized or written back)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

Row = dict[str, Any]


def decode_utf8(raw: bytes, source: str) -> str:
    """Bytes as UTF-8 text (a BOM is dropped); a bad byte is a :class:`UserError` naming its line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{source} is not UTF-8 text (bad byte at line {line}); re-save it as UTF-8") from exc


# --------------------------------------------------------------------------------------------- reading
# The one reader of the project: data files, summarize inputs, configs and every file a run wrote (metrics,
# predictions, log history, checkpoint state) come through here. A regular file, a pipe (a FIFO, or a shell's
# <(zcat x.jsonl.gz), which is /dev/fd/N) or gzip-compressed text is read; anything else is refused with the
# reason; every problem is one UserError.


def table_format(path: str | Path) -> str | None:
    """The table format a file name says (``.jsonl``, ``.json``, ``.csv``, ``.parquet``; ``x.jsonl.gz`` is
    ``.jsonl``), or None when the name says none of them."""
    name = Path(path).name.lower()
    for suffix in (*COMPRESSED_FORMATS, *TABLE_FORMATS):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix.removesuffix(".gz")
    return None


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


#: The longest file name and path most filesystems allow (Linux NAME_MAX and PATH_MAX, in bytes).
NAME_MAX, PATH_MAX = 255, 4096


def name_length_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot exist on a usual filesystem (a name over 255 bytes, a path over 4096), or None."""
    text = os.fsencode(str(path))
    longest = max((len(part) for part in text.split(b"/")), default=0)
    if longest > NAME_MAX:
        return f"a name in it is {longest} bytes long, more than the {NAME_MAX} a filesystem allows"
    if len(text) >= PATH_MAX:
        return f"it is {len(text)} bytes long, more than the {PATH_MAX - 1} a filesystem allows"
    return None


def input_kind(path: str | Path, what: str = "data file") -> str:
    """``'file'`` or ``'stream'`` (a FIFO or pipe: read once, as it comes) for a path that can be read;
    otherwise a :class:`UserError` with the reason (not found, a folder, a device, a name too long...)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise UserError(f"{what} not found: {path}") from exc
    except (OSError, ValueError) as exc:  # ENAMETOOLONG, ENOTDIR, EACCES, ELOOP; ValueError: a NUL in the name
        reason = _os_reason(exc) if isinstance(exc, OSError) else "the name holds a NUL character"
        raise UserError(f"cannot read {what} {shorten(path)}: {reason}") from exc
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "stream"
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} is a directory, expected a file: {path}")
    kind = "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "a socket"
    raise UserError(f"{what} {path} is {kind}, not a file or a pipe")


def read_input(path: str | Path, what: str = "data file") -> bytes:
    """The bytes of a regular file or a pipe, gunzipped when compressed (by content, or refused when named
    ``.gz`` but not gzip); a :class:`UserError` with the reason when it cannot be read."""
    input_kind(path, what)
    try:
        with open(path, "rb") as stream:  # a pipe is read to its end once; nothing seeks
            raw = stream.read()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {_os_reason(exc)}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{what} {path} is not a valid gzip file ({exc or 'cut short'})") from exc
    if str(path).lower().endswith(".gz") and raw:
        raise UserError(f"{what} {path} is named .gz but is not gzip-compressed")
    return raw


def read_text(path: str | Path, what: str = "file") -> str:
    """A file's (or pipe's) UTF-8 text, with one clear error when it cannot be read or decoded."""
    return decode_utf8(read_input(path, what), str(path))


def _no_lone_surrogates(value: Any, source: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UserError(
                f"{source} holds an unpaired UTF-16 surrogate escape (\\u{ord(value[exc.start]):04x}), which is not "
                "text; remove it or write the character itself"
            ) from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_lone_surrogates(key, source)
            _no_lone_surrogates(item, source)
    elif isinstance(value, list):
        for item in value:
            _no_lone_surrogates(item, source)


def parse_json(text: str, source: str, one_line: bool = False) -> Any:
    """JSON text parsed; invalid, too deeply nested or otherwise unreadable JSON is one :class:`UserError`
    (``one_line``: the text is one line of a file, named in ``source``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = "" if one_line else f" at line {exc.lineno}"
        raise UserError(f"{source} is not valid JSON ({exc.msg}{where})") from exc
    except RecursionError as exc:  # json's parser counts its depth against the recursion limit (~1000)
        raise UserError(f"{source} is not usable JSON: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{source} is not usable JSON ({str(exc).splitlines()[0][:200]})") from exc
    if _SURROGATE_ESCAPE.search(text):
        try:
            _no_lone_surrogates(data, source)
        except RecursionError as exc:
            raise UserError(f"{source} is not usable JSON: nested too deeply") from exc
    return data


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file (or pipe) parsed, one :class:`UserError` for any problem."""
    return parse_json(read_text(path, what), str(path))


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON file that must hold an object (a config, a trainer state, metrics.json): anything else, a list
    or a number, is one :class:`UserError` naming what it holds."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object, but holds {describe_value(data)}")
    return data


def json_object_or_none(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file read best-effort (a hint, not an input): None when it is missing, unreadable or not
    an object."""
    try:
        return read_json_object(path)
    except UserError:
        return None


def parse_jsonl(text: str, source: str, cut_end_ok: bool = False) -> list[Row]:
    """JSON lines into a list of objects (blank lines skipped); a bad line is an error naming it.

    Lines end at ``\n`` only (``\r\n`` too): JSON strings may hold U+2028, U+0085 and the other characters that
    ``str.splitlines`` also breaks at. ``cut_end_ok``: a last line without its ``\n`` that does not parse is left
    out (a log a killed process was appending to), not an error.
    """
    rows: list[Row] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip(" \t\r"):
            continue
        try:
            row = parse_json(line, f"{source}: line {number}", one_line=True)
        except UserError:
            if cut_end_ok and number == len(lines):
                break
            raise
        if not isinstance(row, dict):
            raise UserError(f"{source}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_jsonl(path: str | Path, what: str = "file") -> list[Row]:
    """A JSON-lines file (or pipe) as a list of objects; one :class:`UserError` for any problem."""
    return parse_jsonl(read_text(path, what), str(path))


def _sniff_format(raw: bytes) -> str | None:
    """The table format of bytes without a file name (a pipe): parquet by its magic, JSON by its first
    character, CSV when the first line holds a comma."""
    if raw[:4] == _PARQUET_MAGIC:
        return ".parquet"
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"{":
        return ".jsonl"
    if head == b"[":
        return ".json"
    if b"," in raw.split(b"\n", 1)[0]:
        return ".csv"
    return None


def check_table_input(path: str | Path, what: str = "data file") -> None:
    """Cheap early check (nothing read, so a pipe stays unread): the path can be read, and a regular file's
    name says a table format."""
    if input_kind(path, what) == "file" and table_format(path) is None:
        name = Path(path)
        suffix = "".join(name.suffixes[-2:]) if name.suffix.lower() == ".gz" else name.suffix or "(none)"
        raise UserError(f"unsupported {what} type {suffix} for {path}; use one of {', '.join(SUPPORTED_EXTENSIONS)}")


def read_rows(path: str | Path, what: str = "data file") -> list[Row]:
    """Read a table (.jsonl/.json/.csv/.parquet, the text ones also .gz; a file or a pipe) into a list of dicts,
    with one clear :class:`UserError` per problem."""
    check_table_input(path, what)
    raw = read_input(path, what)
    if not raw.strip():
        raise UserError(f"{what} is empty: {path}")
    fmt = table_format(path) or _sniff_format(raw)
    if fmt is None:
        raise UserError(
            f"cannot tell the format of {what} {path} (a pipe has no file extension and this is not JSON, JSON "
            "lines, CSV or parquet)"
        )
    return parse_rows(raw, fmt, str(path))


def parse_rows(raw: bytes, fmt: str, source: str) -> list[Row]:
    """Rows of a table's bytes in format ``fmt`` (``.jsonl``, ``.json``, ``.csv`` or ``.parquet``)."""
    if fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(pa.BufferReader(raw)).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
            reason = (str(exc) or type(exc).__name__).splitlines()[0]
            raise UserError(f"cannot read parquet file {source}: {reason}") from exc
    text = decode_utf8(raw, source)
    if fmt == ".csv":
        return _read_csv(text, source)
    if fmt == ".json":
        try:
            data = parse_json(text, source)
        except UserError:
            data = None  # a .json file may also be JSON lines
        if data is not None:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{source}: expected a JSON list of objects (or JSON lines)")
            return data
    return parse_jsonl(text, source)


def _read_csv(text: str, source: str) -> list[Row]:
    """CSV rows as dicts; a row with more or fewer fields than the header is an error naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": keeps newlines inside quoted fields
    rows: list[Row] = []
    try:
        header = next(reader, [])
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise UserError(f"{source}: the header names column(s) {', '.join(map(repr, repeated))} more than once")
        for record in reader:
            if not record:
                continue  # a blank line
            if len(record) != len(header):
                hint = ""
                if len(header) == 1 and any(sep in header[0] for sep in (";", "\t", "|")):
                    hint = " (it looks separated by something other than commas: save it as comma-separated or .jsonl)"
                raise UserError(
                    f"{source}: line {reader.line_num} has {len(record)} field(s) but the header has "
                    f"{len(header)}{hint}"
                )
            rows.append(dict(zip(header, record)))
    except csv.Error as exc:  # a field over csv.field_size_limit(), a quote left open at the end...
        raise UserError(f"{source}: line {reader.line_num} is not valid CSV ({exc}); save it as .jsonl") from exc
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


def _kind(mode: int) -> str | None:
    """What a non-regular file is ('a character device', 'a FIFO', ...); None for a regular file."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def check_regular_target(path: str | Path, flag: str | None = None) -> None:
    """Refuse to write ``path`` when it exists and is not a regular file (a device, a FIFO, a socket, a folder,
    or a link to one): the writer replaces regular files only, so ``/dev/stdout`` or a pipe is never swapped for a
    file. A link to a regular file, or a missing path, is fine."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing (or a dangling link): created as a regular file
    kind = _kind(mode)
    if kind is None:
        return
    link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
    name = f"{flag} {path}" if flag else str(path)
    raise UserError(f"{name} is {kind}{link}, not a regular file: only regular files are written (standard output: -)")


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
    for name in files:
        check_regular_target(folder / name)
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


def discard(paths: Iterable[Path], trash: Path) -> None:
    """Delete files and folders without ever leaving one half-deleted under its own name: each is first moved
    into ``trash`` (one atomic rename each; ``trash`` is created, beside them on the same filesystem), then
    ``trash`` is removed. A kill part-way leaves only ``trash``, which its owner recognises and deletes later.
    A rename that fails raises ``OSError`` with nothing deleted yet."""
    import shutil

    trash.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)
