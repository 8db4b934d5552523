"""Line charts as inline SVG, drawn on the server: no script, nothing fetched by the browser."""

from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 28, 34  # margins around the plot area, in pixels


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], *, width: int = 560,
               height: int = 240, emphasis: str | None = None) -> str:
    """An SVG chart of each series' (x, y) points; `emphasis` names a series drawn thicker.

    Non-finite y values are left out. The legend lists the series in the order given.
    """
    series = {name: [(x, y) for x, y in points if math.isfinite(y)] for name, points in series.items()}
    points = [p for pts in series.values() for p in pts]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" '
             f'height="{height + 18 * _legend_rows(series, width)}" role="img" '
             f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<text x="{LEFT}" y="16" class="chart-title">{escape(title)}</text>']
    if not points:
        parts.append(f'<text x="{LEFT}" y="{height // 2}">no values yet</text></svg>')
        return "".join(parts)
    x0, x1 = _span([x for x, _ in points])
    y0, y1 = _span([y for _, y in points])
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + (y1 - y) / (y1 - y0) * plot_h

    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>')
    for y in _ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                     f'class="grid"/><text x="{LEFT - 6}" y="{py(y) + 4:.1f}" '
                     f'text-anchor="end">{_label(y)}</text>')
    for x in _ticks(x0, x1, integers=True):
        parts.append(f'<text x="{px(x):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">'
                     f'{_label(x)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        stroke = 3 if name == emphasis else 1.5
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        if len(pts) > 1:
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" '
                         f'stroke-width="{stroke}"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{stroke + 1}" fill="{color}">'
                         f'<title>{escape(name)}, round {_label(x)}: {y:.6g}</title></circle>')
    parts.extend(_legend(series, width, height))
    parts.append("</svg>")
    return "".join(parts)


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _ticks(lo: float, hi: float, *, integers: bool = False, count: int = 5) -> list[float]:
    """About `count` round values between lo and hi (whole numbers only, if asked)."""
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step = next(m * step for m in (1, 2, 5, 10) if m * step >= raw)
    if integers:
        step = max(1.0, math.ceil(step))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}" if value != int(value) else str(int(value))


def _legend_rows(series: dict, width: int) -> int:
    per_row = max(1, (width - LEFT) // 140)
    return math.ceil(len(series) / per_row) if len(series) > 1 else 0


def _legend(series: dict, width: int, height: int) -> list[str]:
    if len(series) < 2:
        return []
    per_row = max(1, (width - LEFT) // 140)
    out = []
    for i, name in enumerate(series):
        x, y = LEFT + (i % per_row) * 140, height + (i // per_row) * 18
        out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="4" fill="{COLORS[i % len(COLORS)]}"/>'
                   f'<text x="{x + 16}" y="{y - 4}">{escape(name[:18])}</text>')
    return out


BUDGET_COLORS = {"spent": "#d62728", "queued": "#ff7f0e", "left": "#2ca02c"}


def budget_chart(budget: dict, *, width: int = 220) -> str:
    """A dataset's privacy budget as one bar: epsilon spent, set aside for queued tasks (accepted,
    not yet released), left.

    `budget` is what ``meshfl.node._review.policies`` gives (epsilon, delta, spent, reserved,
    left). A budget lowered below what was already spent shows the bar past a mark at the budget.
    """
    epsilon, spent, reserved, left = (budget[k] for k in ("epsilon", "spent", "reserved", "left"))
    segments = {"spent": spent, "queued": reserved, "left": left}
    scale = (width - 2) / max(epsilon, spent + reserved + left)
    title = (f"privacy budget epsilon {epsilon:g} (delta {budget['delta']:g}): {spent:.4g} spent, "
             f"{reserved:.4g} set aside for queued tasks, {left:.4g} left")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="budget" width="{width}" height="52" role="img" '
           f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
           f'<text x="1" y="11">epsilon {epsilon:g} <tspan class="muted">(delta {budget["delta"]:g})</tspan></text>',
           f'<rect x="1" y="16" width="{width - 2}" height="14" class="plot"/>']
    x = 1.0
    for name, value in segments.items():
        if value > 0:
            out.append(f'<rect x="{x:.1f}" y="16" width="{value * scale:.1f}" height="14" '
                       f'fill="{BUDGET_COLORS[name]}"><title>{name}: epsilon {value:.4g}</title></rect>')
            x += value * scale
    if spent > epsilon:  # the budget was lowered below what released results had already spent
        mark = 1 + epsilon * scale
        out.append(f'<line x1="{mark:.1f}" x2="{mark:.1f}" y1="13" y2="33" stroke="#000" stroke-width="2"/>')
    lx = 1
    for name, value in segments.items():
        label = f"{name} {value:.3g}"
        out.append(f'<rect x="{lx}" y="39" width="9" height="9" fill="{BUDGET_COLORS[name]}"/>'
                   f'<text x="{lx + 12}" y="48">{label}</text>')
        lx += 12 + 6 * len(label) + 10  # about 6 px a character at 11 px
    out.append("</svg>")
    return "".join(out)
