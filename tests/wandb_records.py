"""Read an offline W&B run file (``offline-run-*/run-*.wandb``) back into plain Python values.

wandb 0.31 writes its records with the Go core and no longer ships a Python reader, so this test helper
decodes the file itself. The format is a LevelDB log (https://github.com/google/leveldb/blob/main/doc/log_format.md):
a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each chunk
``crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | data``, type FULL=1, FIRST=2, MIDDLE=3, LAST=4; a
block tail too short for a chunk header is zero padding. The CRC is zlib's crc32 of the type byte and the data.
Each reassembled payload is one ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a ``.wandb`` file, in write order (checks the header and every chunk's CRC)."""
    data = Path(path).read_bytes()
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B run file (header {ident!r}, {magic:#x}, {version})")
    records: list[wandb_internal_pb2.Record] = []
    pos, pending = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:
            pos += left_in_block
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        payload = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        if kind == 0 and length == 0:
            continue  # zero padding
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        if kind == _FIRST:
            pending = payload
            continue
        if kind == _MIDDLE:
            pending += payload
            continue
        if kind == _LAST:
            payload, pending = pending + payload, b""
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class WandbRun:
    """The parts of an offline run the tests look at, decoded from JSON."""

    run_id: str = ""
    name: str = ""
    project: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: one dict per ``run.log`` call (keys as logged, plus ``_step``), in order
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the final summary (last value of every key)
    summary: dict[str, Any] = field(default_factory=dict)
    #: names and types of the artifacts the run logged
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    #: the files of each logged artifact, by artifact name
    artifact_files: dict[str, list[str]] = field(default_factory=dict)
    exited: bool = False


def load_run(path: str | Path, until_exit: bool = False, timeout: float = 120.0) -> WandbRun:
    """Decode a ``run-*.wandb`` file into a :class:`WandbRun`.

    W&B's core process writes the file on its own schedule: ``wandb.finish`` (and even the end of the Python
    process) can return before the last records reach the disk, more so on a busy machine. ``until_exit`` reads
    again until the run's exit record is there (at most ``timeout`` seconds: a safety net, not a speed check).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(path)
        except (ValueError, struct.error):  # a chunk still being written
            if not until_exit or time.monotonic() > deadline:
                raise
            records = []
        if not until_exit or time.monotonic() > deadline or any(r.HasField("exit") for r in records):
            break
        time.sleep(0.1)
    run = WandbRun()
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.project = record.run.run_id, record.run.display_name, record.run.project
            run.group, run.tags = record.run.run_group, list(record.run.tags)
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item), None)
        elif kind == "artifact":
            name = record.artifact.name
            run.artifacts.append((name, record.artifact.type))
            run.artifact_files[name] = [entry.path for entry in record.artifact.manifest.contents]
        elif kind == "exit":
            run.exited = True
    return run


def find_run_file(root: str | Path) -> Path:
    """The single ``offline-run-*/run-*.wandb`` file under ``root``."""
    files = sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline W&B run under {root}, found {[str(f) for f in files]}")
    return files[0]
