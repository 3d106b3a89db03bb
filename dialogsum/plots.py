"""The plots of the run report and of the comparison, returned as PNG bytes.

Drawn with matplotlib's object API on the Agg canvas (no display, no global pyplot state); the caller writes the
bytes with :mod:`dialogsum.files`. The ROUGE and resources charts take ``{system name: metrics}``, so the run
report (one run, or one bar group per ROUGE protocol) and ``compare.py`` (several runs) draw the same charts.
Every function returns None when there is nothing to draw.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from dialogsum.formatting import RESOURCE_FIGURES, is_number
from dialogsum.metrics import ROUGE_KEYS, ROUGE_LABELS

_DPI = 110
#: Resource panels: every resource figure but the trainable percentage (the parameter panel shows it).
_RESOURCE_PANELS = tuple(figure for figure in RESOURCE_FIGURES if figure[0] != "trainable_percent")
_PANEL_UNITS = {"checkpoint_size_mb": " (MB)", "peak_memory_mb": " (MB)", "train_runtime_s": " (s)"}


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (imported here: matplotlib takes ~0.5 s to import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png(figure: Any) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the history rows that hold a number under ``key``."""
    rows = [(row["step"], row[key]) for row in history if is_number(row.get("step")) and is_number(row.get(key))]
    return [step for step, _ in rows], [value for _, value in rows]


def _line_panels(panels: list[tuple[str, list[float], list[float], dict[str, Any]]], width: float) -> bytes:
    """One line chart per (title, steps, values, line style) over optimizer steps."""
    figure = _figure(width * len(panels), 3.4)
    for index, (title, steps, values, style) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.5, **style)
        axes.set_title(title)
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        if title == "learning rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return png(figure)


def plot_training_curves(history: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Training loss, learning rate and (when logged) gradient norm over optimizer steps."""
    panels = []
    for key, title in (
        ("loss", "training loss"),
        ("learning_rate", "learning rate"),
        ("grad_norm", "gradient norm (before clipping)"),
    ):
        steps, values = _series(history, key)
        if steps:
            panels.append((title, steps, values, {}))
    if not panels or panels[0][0] != "training loss":
        return None
    return _line_panels(panels, 4.2)


def plot_throughput(history: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Real tokens/s and peak memory over optimizer steps."""
    panels = []
    for key, title, colour in (
        ("tokens_per_s", "real tokens / s", "tab:green"),
        ("peak_memory_mb", "peak memory (MB)", "tab:purple"),
    ):
        steps, values = _series(history, key)
        if steps:
            panels.append((title, steps, values, {"color": colour}))
    return _line_panels(panels, 4.4) if panels else None


def plot_eval_curves(history: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Validation loss and, when generated during training, validation ROUGE (F1 x 100) over steps."""
    loss = _series(history, "eval_loss")
    rouge = {key: _series(history, f"eval_{key}") for key in ROUGE_KEYS}
    rouge = {key: series for key, series in rouge.items() if series[0]}
    panels = bool(loss[0]) + bool(rouge)
    if not panels:
        return None
    figure = _figure(4.4 * panels, 3.4)
    index = 1
    if loss[0]:
        axes = figure.add_subplot(1, panels, index)
        axes.plot(*loss, marker="o", markersize=4, color="tab:orange")
        axes.set_title("validation loss")
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        index += 1
    if rouge:
        axes = figure.add_subplot(1, panels, index)
        for key, (steps, values) in rouge.items():
            axes.plot(steps, [100 * v for v in values], marker="o", markersize=4, label=ROUGE_LABELS[key])
        axes.set_title("validation ROUGE")
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("F1 × 100")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return png(figure)


def plot_rouge(
    systems: Mapping[str, Mapping[str, Any]],
    intervals: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    title: str = "ROUGE",
) -> bytes | None:
    """Grouped bars: one group per ROUGE metric, one bar per system (F1 x 100, value on top).

    ``systems`` maps a name to its scores (0..1, keys of :data:`ROUGE_KEYS`); ``intervals`` optionally maps it
    to ``(low, high)`` per metric, drawn as error bars.
    """
    names = [name for name, scores in systems.items() if any(is_number(scores.get(k)) for k in ROUGE_KEYS)]
    if not names:
        return None
    figure = _figure(max(6.0, 0.55 * len(ROUGE_KEYS) * len(names) + 2), 4.0)
    axes = figure.subplots()
    width = 0.8 / len(names)
    top = 1.0
    for index, name in enumerate(names):
        means = [100 * systems[name][k] if is_number(systems[name].get(k)) else 0.0 for k in ROUGE_KEYS]
        error = None
        if intervals and name in intervals:
            low = [m - 100 * intervals[name][k][0] for m, k in zip(means, ROUGE_KEYS, strict=True)]
            high = [100 * intervals[name][k][1] - m for m, k in zip(means, ROUGE_KEYS, strict=True)]
            error = [low, high]
            top = max(top, *(m + h for m, h in zip(means, high, strict=True)))
        top = max(top, *means)
        positions = [i + (index - (len(names) - 1) / 2) * width for i in range(len(ROUGE_KEYS))]
        bars = axes.bar(positions, means, width * 0.95, yerr=error, capsize=3, label=name, color=f"C{index}")
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    axes.set_xticks(range(len(ROUGE_KEYS)), [ROUGE_LABELS[k] for k in ROUGE_KEYS])
    axes.set_ylim(0, top * 1.15)
    axes.set_ylabel("F1 × 100")
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    if len(names) > 1:
        figure.legend(loc="outside lower center", ncols=len(names))
    return png(figure)


def plot_resources(systems: Mapping[str, Mapping[str, Any]]) -> bytes | None:
    """One bar panel per resource figure (:data:`~dialogsum.formatting.RESOURCE_FIGURES`), one bar per system.

    Bars are labelled in the figure's own format (``14.2 MB``, ``1 h 30 min``); a panel whose values span more
    than 20x gets a log scale. Systems with no resource figure (e.g. a zero-shot evaluation) are left out, and
    colours follow each system's position in ``systems``, as in :func:`plot_rouge`. With a single system the
    parameter panel shows its trainable against its total parameters.
    """
    colours = {name: f"C{i}" for i, name in enumerate(systems)}
    shown = {n: m for n, m in systems.items() if any(is_number(m.get(key)) for key, _, _ in _RESOURCE_PANELS)}
    panels = [p for p in _RESOURCE_PANELS if any(is_number(m.get(p[0])) for m in shown.values())]
    if not panels:
        return None
    figure = _figure(max(4.0, 3.0 * len(panels)), 3.4)
    for axes, (key, label, show) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        names = list(shown)
        values = [shown[n].get(key) if is_number(shown[n].get(key)) else None for n in names]
        bar_colours = [colours[n] for n in names]
        only = next(iter(shown.values())) if len(shown) == 1 else None
        if key == "trainable_params" and only is not None and is_number(only.get("total_params")):
            names, values, bar_colours = ["trainable", "total"], [only[key], only["total_params"]], ["C0", "C1"]
        heights = [float("nan") if v is None else v for v in values]
        bars = axes.bar(range(len(names)), heights, width=0.6, color=bar_colours)
        known = [v for v in values if v]
        if known and max(known) / min(known) > 20:
            axes.set_yscale("log")
        axes.bar_label(bars, labels=[show(v) if v is not None else "" for v in values], fontsize=7)
        axes.set_xticks(range(len(names)), names, rotation=20 if len(names) > 2 else 0)
        axes.set_title(label + _PANEL_UNITS.get(key, ""), fontsize=10)
        axes.margins(y=0.18)
        axes.tick_params(axis="x", labelsize=8)
        axes.grid(axis="y", alpha=0.3)
    return png(figure)
