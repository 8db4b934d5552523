"""An experiment's history as one figure (matplotlib, the ``[plot]`` extra).

Small multiples - one panel per metric, shared rounds on x - and every line labelled at its end
(the global model's in bold black, each node's in its colour), nudged apart where they would
overlap, so no legend is needed. With more than ``MAX_LABELLED`` nodes their lines turn grey and
unlabelled behind the global line. A last panel counts the nodes per round when some failed or
dropped. Only ``matplotlib.figure.Figure`` is used, never pyplot: nothing global changes in the
caller's process (a notebook keeps its backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import MeshflError, MissingDependency
from ._history import COUNTS, global_metrics, node_metrics

MAX_LABELLED = 12  # nodes whose lines get a colour and a label of their own
FONT = 8.0  # points, the end labels
_NAN = float("nan")


def require_matplotlib() -> None:
    """Raise :class:`MissingDependency` (``pip install meshfl[plot]``) where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency("matplotlib", "plot") from None


def plot_history(history: list[dict], path: Path, *, metrics: Iterable[str] | None = None,
                 baselines: Mapping[str, Mapping[str, float]] | None = None, title: str = "") -> Path:
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    entries = sorted((e for e in history if isinstance(e, dict) and "round" in e), key=lambda e: e["round"])
    if not entries:
        raise MeshflError("nothing to plot: the history has no rounds yet", code="empty_history")
    rounds = [int(e["round"]) for e in entries]
    series = _series(entries)
    names = [m for m in series if m not in COUNTS] if metrics is None else list(metrics)
    unknown = [m for m in names if m not in series]
    if unknown or not names:
        raise MeshflError(f"no metric {unknown[0] if unknown else ''!r} in this history; it has: "
                          f"{', '.join(series) or 'none'}", code="unknown_metric")
    trouble = any(e.get("failed") or e.get("dropped") for e in entries)
    panels = names + (["nodes per round"] if trouble else [])
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.1 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    nodes = sorted({n for data in series.values() for n in data["nodes"]})
    colors = _colors(fig, nodes)
    labels = {}
    for ax, name in zip(axes, panels):
        if name == "nodes per round":
            _participation(ax, entries, rounds)
        else:
            labels[ax] = _metric(ax, name, series[name], rounds, colors, baselines or {})
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round", fontsize=9)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.draw_without_rendering()  # lay out once: the axes' sizes place the end labels
    for ax, ends in labels.items():
        _label_ends(ax, ends, rounds)
    fig.savefig(path, dpi=150)
    return path


def _series(entries: list[dict]) -> dict[str, dict]:
    """{metric: {"global": [value per round], "nodes": {node: [value per round]}}}, NaN where absent."""
    out: dict[str, dict] = {}
    n = len(entries)
    for i, entry in enumerate(entries):
        for k, v in global_metrics(entry).items():
            out.setdefault(k, {"global": None, "nodes": {}})
            if out[k]["global"] is None:
                out[k]["global"] = [_NAN] * n
            out[k]["global"][i] = v
        for node, values in node_metrics(entry).items():
            for k, v in values.items():
                out.setdefault(k, {"global": None, "nodes": {}})["nodes"].setdefault(node, [_NAN] * n)[i] = v
    return out


def _colors(fig, nodes: list[str]) -> dict[str, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(nodes) <= 10 else "tab20"]
    return {node: cmap(i % cmap.N) for i, node in enumerate(nodes)}


def _last(xs: list[int], ys: list[float]) -> tuple[int, float] | None:
    for x, y in zip(reversed(xs), reversed(ys)):
        if not math.isnan(y):
            return x, y
    return None


def _metric(ax, name: str, data: dict, rounds: list[int], colors: dict, baselines: Mapping) -> list[tuple]:
    """Draw one metric's lines; returns the end labels to place: (x, y, text, colour, bold)."""
    ends = []
    many = len(data["nodes"]) > MAX_LABELLED
    marker = "o" if len(rounds) <= 40 else None
    for node in sorted(data["nodes"]):
        ys = data["nodes"][node]
        color = "#b8b8b8" if many else colors[node]
        ax.plot(rounds, ys, color=color, linewidth=1.1, marker=marker, markersize=2.5, alpha=0.9)
        end = _last(rounds, ys)
        if end and not many:
            ends.append((*end, node, color, False))
    if data["global"] is not None:
        ax.plot(rounds, data["global"], color="black", linewidth=2.2, marker=marker, markersize=3, zorder=3)
        end = _last(rounds, data["global"])
        if end:
            ends.append((*end, "global", "black", True))
    for label, values in baselines.items():
        if name in values:
            ax.hlines(float(values[name]), rounds[0], rounds[-1], color="#555555", linestyle="--", linewidth=1.0)
            ends.append((rounds[-1], float(values[name]), label, "#555555", False))
    ax.set_title(f"{name}  ({len(data['nodes'])} nodes in grey)" if many else name, fontsize=10)
    return ends


def _participation(ax, entries: list[dict], rounds: list[int]) -> None:
    took = [len(e.get("nodes") or ()) for e in entries]
    failed = [len(e.get("failed") or ()) for e in entries]
    dropped = [len(e.get("dropped") or ()) for e in entries]
    ax.bar(rounds, took, color="#4c9a6a", label="contributed")
    ax.bar(rounds, failed, bottom=took, color="#c44e52", label="failed")
    ax.bar(rounds, dropped, bottom=[a + b for a, b in zip(took, failed)], color="#dd8452", label="dropped")
    from matplotlib.ticker import MaxNLocator

    ax.set_title("nodes per round", fontsize=10)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(t + f + d for t, f, d in zip(took, failed, dropped)) * 1.3)  # room for the key
    ax.legend(fontsize=FONT, frameon=False, loc="upper center", ncol=3)


def _label_ends(ax, ends: list[tuple], rounds: list[int]) -> None:
    """Write each line's name just right of its end, nudged apart vertically so none overlap;
    the x range grows to the right to make room inside the panel."""
    if not ends:
        return
    box = ax.get_window_extent()
    to_pt = 72.0 / ax.figure.dpi
    width_pt, height_pt = box.width * to_pt, box.height * to_pt
    widest = max(len(text) for *_, text, _, _ in ends) * FONT * 0.62 + 8
    lo_x, hi_x = rounds[0], rounds[-1]
    span = max(hi_x - lo_x, 1)
    share = min(widest / max(width_pt, 1.0), 0.6)  # of the panel's width, for the labels
    left = lo_x - 0.04 * span
    ax.set_xlim(left, left + span * 1.08 / (1 - share))
    ax.set_xticks([t for t in ax.get_xticks() if lo_x <= t <= hi_x])  # no rounds that never were
    lo, hi = ax.get_ylim()
    frac = [((y - lo) / (hi - lo) if hi > lo else 0.5) for _, y, *_ in ends]
    gap = FONT * 1.25 / max(height_pt, 1.0)
    order = sorted(range(len(ends)), key=lambda i: frac[i])
    placed = {}
    previous = gap / 2 - gap  # the lowest label stays inside the panel too
    for i in order:  # push up what would overlap the label below ...
        placed[i] = max(frac[i], previous + gap)
        previous = placed[i]
    top = 1.0 - gap / 2
    for i in reversed(order):  # ... then down what left the panel at the top
        placed[i] = min(placed[i], top)
        top = placed[i] - gap
    for i, (x, y, text, color, bold) in enumerate(ends):
        shift = (placed[i] - frac[i]) * height_pt
        leader = {"arrowstyle": "-", "color": color, "linewidth": 0.6, "alpha": 0.7, "shrinkA": 0, "shrinkB": 2}
        ax.annotate(text, (x, y), xytext=(7, shift), textcoords="offset points", va="center", ha="left",
                    fontsize=FONT, color=color, fontweight="bold" if bold else "normal", annotation_clip=False,
                    arrowprops=leader if abs(shift) > FONT else None)  # moved far: a thin line back to its end
