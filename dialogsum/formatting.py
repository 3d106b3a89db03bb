"""How the project shows its figures: one text format per kind of number, and Markdown tables.

Every report (run report, model card, comparison, W&B/TensorBoard text, benchmark and GPU-check tables) formats
through these, so a figure reads the same wherever it appears. Sizes are in MB = 10^6 bytes (GB = 10^9), the
unit of every ``*_mb`` key the project writes. No heavy imports.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

#: Shown where a figure is missing (None, NaN, not a number).
MISSING = "–"


def is_number(value: Any) -> bool:
    """A finite int or float (``bool`` is not a figure)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant figures (a measured time or rate keeps its precision however
    small it is, where rounding to fixed decimals turns 0.04 s into a 10% error)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def points(score: Any) -> str:
    """A 0..1 score as points with two decimals (``0.4731`` -> ``47.31``)."""
    return f"{100 * score:.2f}" if is_number(score) else MISSING


def signed(value: float, digits: int = 2) -> str:
    """A difference with its sign (``+41.67``, ``-0.50``)."""
    return f"{value:+.{digits}f}"


def count(value: Any) -> str:
    """A whole number with thousands separators (``3,538,944``)."""
    return f"{int(value):,}" if is_number(value) else MISSING


def percent(value: Any) -> str:
    """A value already in percent (``1.4093`` -> ``1.41%``)."""
    return f"{value:.2f}%" if is_number(value) else MISSING


def megabytes(value: Any) -> str:
    """A size in MB (10^6 bytes): ``13.5 MB``, or ``9.80 GB`` from 1000 MB on."""
    if not is_number(value):
        return MISSING
    return f"{value / 1000:,.2f} GB" if value >= 1000 else f"{value:,.1f} MB"


def duration(seconds: Any) -> str:
    """``42.0 s``, ``2 min 05 s`` or ``1 h 30 min``."""
    if not is_number(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def rate(value: Any) -> str:
    """A throughput rounded to whole units (``1,130``)."""
    return f"{value:,.0f}" if is_number(value) else MISSING


def plain(value: Any) -> str:
    """Any setting as text: lists joined with commas, None as :data:`MISSING`."""
    if value is None:
        return MISSING
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or MISSING
    return str(value)


def printable(text: Any) -> str:
    """``text`` with each character that does not print (a newline, a tab, a control character) written as its
    escape, so that a message naming a user's value stays one line and shows what was typed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def one_line(text: Any) -> str:
    """``text`` with every run of white space (newlines included) folded into one space."""
    return " ".join(str(text).split())


def shorten(text: Any, limit: int = 60) -> str:
    """``text`` for a message: cut in the middle past ``limit`` characters (a 300-character name stays readable)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def cell(text: Any, limit: int = 400) -> str:
    """``text`` fit for one Markdown table cell: one line, ``|`` escaped, cut to ``limit`` characters."""
    flat = re.sub(r"\s+", " ", str(text)).replace("|", "\\|").strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], limit: int = 400) -> str:
    """A Markdown table; every cell goes through :func:`cell`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c, limit) for c in row) + " |" for row in rows]
    return "\n".join(lines)


#: The resource figures of a run (``metrics.json`` keys), with their label and their format. The run report,
#: the comparison and the resources plot all show these.
RESOURCE_FIGURES: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("trainable_params", "trainable parameters", count),
    ("trainable_percent", "trainable %", percent),
    ("checkpoint_size_mb", "checkpoint size", megabytes),
    ("peak_memory_mb", "peak memory", megabytes),
    ("train_runtime_s", "training time", duration),
    ("train_tokens_per_s", "real tokens/s", rate),
)
