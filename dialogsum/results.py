"""Which weights a run's results belong to: a cheap fingerprint of the weights, stamped on every result file.

``metrics.json`` holds ``weights: {step, fingerprint, source}``, every line of ``predictions.jsonl`` the
fingerprint (``weights``), and the report shows both. A folder's results are current when the fingerprint they
carry is that of the weights saved beside them (:func:`check_results_belong`); compare.py refuses any others, so
the results of earlier weights (a run continued with ``--do_eval false``, killed between saving the weights and
writing its results) are never scored as those of the final model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dialogsum.errors import UserError

#: The weight files at the top of a model or adapter folder.
WEIGHT_FILE = re.compile(
    r"^(model\.safetensors|model-\d+-of-\d+\.safetensors|adapter_model\.safetensors|pytorch_model.*\.bin"
    r"|adapter_model\.bin)$"
)
#: Bytes read per weight file: the size and this many evenly spaced blocks (the whole file when smaller).
_BLOCKS, _BLOCK = 32, 64 * 1024


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files at the top of ``folder`` (sorted; none for a missing folder or a hub id)."""
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if WEIGHT_FILE.match(p.name) and p.is_file())


def weights_fingerprint(folder: str | Path) -> str | None:
    """A cheap fingerprint of the weights in ``folder``: sha256 over each weight file's name, size and 32 evenly
    spaced 64 KiB blocks (2 MiB read for any size; every block changes when training changes the weights).
    None when the folder holds no weights."""
    files = weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as stream:
            if size <= _BLOCKS * _BLOCK:
                digest.update(stream.read())
                continue
            for i in range(_BLOCKS):
                stream.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                digest.update(stream.read(_BLOCK))
    return digest.hexdigest()[:16]


def weights_record(folder: str | Path | None, step: int | None, source: str | None = None) -> dict[str, Any]:
    """What ``metrics.json`` says of the weights its results belong to: the optimizer ``step`` (None for weights
    not trained by this run), the fingerprint of the weights in ``folder``, and where they are (``source``)."""
    return {
        "step": step,
        "fingerprint": weights_fingerprint(folder) if folder is not None else None,
        "source": source if source is not None else (str(folder) if folder is not None else None),
    }


def stamp_predictions(predictions: Sequence[Mapping[str, Any]], record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The prediction rows, each carrying the fingerprint of the weights that generated it (``weights``)."""
    return [{**row, "weights": record.get("fingerprint")} for row in predictions]


def describe(record: Mapping[str, Any] | None) -> str:
    """``step 40, weights 1a2b3c4d5e6f7a8b`` for reports and messages."""
    if not record:
        return "unknown weights"
    step = record.get("step")
    fingerprint = record.get("fingerprint") or "not fingerprinted"
    return f"step {step}, weights {fingerprint}" if step is not None else f"weights {fingerprint}"


def check_results_belong(
    folder: str | Path, metrics: Mapping[str, Any], predictions: Sequence[Mapping[str, Any]]
) -> None:
    """Refuse results that do not belong to the weights beside them, with one line.

    * the folder holds weights: ``metrics.json`` must carry their fingerprint;
    * every prediction line must carry the fingerprint of ``metrics.json``.
    Results of a folder without weights (an evaluation of a hub model, or written by hand) that say nothing of
    their weights are accepted as they are.
    """
    path = Path(folder)
    record = metrics.get("weights") if isinstance(metrics.get("weights"), Mapping) else None
    current = weights_fingerprint(path)
    rerun = "evaluate the final weights again (scripts/evaluate.py) or compare another folder"
    if current is not None:
        if record is None:
            raise UserError(
                f"{path}: metrics.json does not say which weights it belongs to (written by an earlier version?) "
                f"and the folder holds weights; {rerun}"
            )
        if record.get("fingerprint") != current:
            raise UserError(
                f"{path}: metrics.json belongs to {describe(record)}, not to the weights now in the folder "
                f"({current}): its results are stale; {rerun}"
            )
    if record is None:
        return
    for number, row in enumerate(predictions, start=1):
        if row.get("weights") != record.get("fingerprint"):
            raise UserError(
                f"{path}: predictions.jsonl line {number} was generated by weights {row.get('weights')}, "
                f"metrics.json belongs to {describe(record)}: the predictions are stale; {rerun}"
            )
