"""The researcher's side: from summed answer vectors to statistics.

Everything here is arithmetic on totals: means from sums and counts, variances and covariances
from shifted sums of squares and cross products (see :mod:`._query` on shifts), extremes from
the magnitude buckets, quantiles from cumulative bin counts. A suppressed cell (its flag summed
over the nodes that suppressed it) is left out of the totals and reported, never hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._query import MAGNITUDE_BUCKETS, MAGNITUDE_EDGES, Op, layout


@dataclass
class Answer:
    """One pass's answers: the total over the nodes, and each node's own in plain mode."""

    ops: list[Op]
    secure: bool
    total: np.ndarray
    per_node: dict[str, np.ndarray] = field(default_factory=dict)
    node_fields: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, dict] = field(default_factory=dict)

    def block(self, index: int, vector: np.ndarray | None = None) -> np.ndarray:
        offset, size = layout(self.ops, self.secure)[index]
        return (self.total if vector is None else vector)[offset : offset + size]


@dataclass(frozen=True)
class ColumnStats:
    count: int
    missing: int
    sum: float
    mean: float
    variance: float  # sample variance (ddof = 1)
    std: float
    suppressed: int = 0  # nodes that suppressed this cell (their records are not in it)
    min: float | None = None
    max: float | None = None
    exact_extremes: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def column_stats(cell: np.ndarray, shift: float) -> ColumnStats:
    """A moments cell (count, sum, sum of squares of value - shift, missing, flag)."""
    n, s1, s2, missing, flag = (float(v) for v in cell)
    mean = shift + s1 / n if n else math.nan
    var = (s2 - s1 * s1 / n) / (n - 1) if n > 1 else math.nan
    var = max(var, 0.0) if not math.isnan(var) else var
    return ColumnStats(int(n), int(missing), s1 + shift * n, mean, var, math.sqrt(var) if var == var else math.nan,
                       int(flag))


def moments(op: Op, block: np.ndarray) -> dict:
    """{column: ColumnStats}, or {group: {"rows", "suppressed", "columns": {column: ColumnStats}}}."""
    d = len(op.columns)
    step = 2 + 5 * d
    shifts = op.shifts or (0.0,) * d

    def group(g: int) -> dict:
        part = block[g * step : (g + 1) * step]
        return {c: column_stats(part[2 + 5 * j : 7 + 5 * j], shifts[j]) for j, c in enumerate(op.columns)}

    if op.groups is None:
        return group(0)
    return {level: {"rows": int(block[g * step]), "suppressed": int(block[g * step + 1]), "columns": group(g)}
            for g, level in enumerate(op.groups)}


def extremes(op: Op, answer: Answer, index: int) -> dict[str, tuple[float, float, bool]]:
    """{column: (min, max, exact)}: under secure aggregation from the summed buckets (coarse,
    rounded outward to the magnitude grid), in plain mode the least of the nodes' mins and the
    greatest of their maxes (exact only if every node gave exact ones)."""
    out = {}
    step = 2 * MAGNITUDE_BUCKETS + (0 if answer.secure else 2)
    edges = (-math.inf, *MAGNITUDE_EDGES, math.inf)
    for j, name in enumerate(op.columns):
        if answer.secure:
            cells = answer.block(index)[j * step : j * step + 2 * MAGNITUDE_BUCKETS]
            seen = np.flatnonzero((cells[0::2] > 0) | (cells[1::2] > 0))
            out[name] = (edges[seen[0]], edges[seen[-1] + 1], False) if seen.size else (math.nan, math.nan, False)
            continue
        lows, highs, exact = [], [], True
        for node, vector in answer.per_node.items():
            lo, hi = answer.block(index, vector)[(j + 1) * step - 2 : (j + 1) * step]
            if not math.isnan(lo):
                lows.append(float(lo))
                highs.append(float(hi))
                exact = exact and bool(answer.node_fields[node].get("exact_extremes"))
        out[name] = (min(lows), max(highs), exact) if lows else (math.nan, math.nan, False)
    return out


@dataclass(frozen=True)
class Histogram:
    edges: list[float]
    counts: list[int]  # per bin, suppressed bins left out (see suppressed)
    suppressed: list[int]  # per bin: how many nodes suppressed it
    below: int
    above: int
    missing: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def histograms(op: Op, block: np.ndarray) -> list[Histogram]:
    """One :class:`Histogram` per (column, edges) of the op, in its order."""
    out, start = [], 0
    for edges in op.edges:
        cells = len(edges) + 1
        part = block[start : start + 1 + 2 * cells]
        start += 1 + 2 * cells
        counts, flags = part[1::2].astype(np.int64), part[2::2].astype(np.int64)
        out.append(Histogram(list(edges), counts[1:-1].tolist(), flags[1:-1].tolist(), int(counts[0]),
                             int(counts[-1]), int(part[0])))
    return out


@dataclass(frozen=True)
class Quantile:
    q: float
    value: float  # the middle of [low, high]
    low: float  # numpy's quantile (linear interpolation) lies in [low, high]
    high: float

    @property
    def bound(self) -> float:
        """The most ``value`` can be off: half the interval."""
        return (self.high - self.low) / 2


def locate(hist: Histogram, n: int, q: float, minimum: int) -> tuple[float, float]:
    """The interval of edges in which numpy's ``q``-quantile of the ``n`` values lies, from the bin
    counts (a suppressed bin holds between 1 and ``minimum - 1`` values per node that suppressed it)."""
    h = (n - 1) * q
    ranks = (math.floor(h), math.ceil(h))
    counts = np.asarray([hist.below] + hist.counts + [hist.above], dtype=float)
    slack = np.asarray([0] + hist.suppressed + [0], dtype=float) * max(minimum - 1, 0)
    known, possible = np.cumsum(counts), np.cumsum(counts + slack)
    edges = [-math.inf] + hist.edges + [math.inf]
    first = int(np.searchsorted(possible, ranks[0], side="right"))  # the earliest cell rank 0 can be in
    last = int(np.searchsorted(known, ranks[1], side="right"))  # the latest cell rank 1 can be in
    last = min(last, len(edges) - 2)
    return edges[first], edges[last + 1]


def held(hist: Histogram, lo: float, hi: float, minimum: int) -> int:
    """How many values may lie in [lo, hi] (bins that meet it, suppressed ones at their most)."""
    total = 0
    for a, b, count, flags in zip(hist.edges, hist.edges[1:], hist.counts, hist.suppressed):
        if b >= lo and a <= hi:
            total += count + flags * max(minimum - 1, 0)
    return total


def covariance(op: Op, block: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(complete rows, means, covariance matrix (ddof = 1)) of a cross op; NaN if suppressed."""
    d = len(op.columns)
    n = float(block[0])
    sums = block[2 : 2 + d]
    cross = np.zeros((d, d))
    cross[np.triu_indices(d)] = block[2 + d :]
    cross = cross + np.triu(cross, 1).T
    shifts = np.asarray(op.shifts or (0.0,) * d)
    if n < 2:
        return int(n), np.full(d, math.nan), np.full((d, d), math.nan)
    cov = (cross - np.outer(sums, sums) / n) / (n - 1)
    return int(n), shifts + sums / n, cov


def counts(op: Op, block: np.ndarray) -> tuple[dict, dict, int]:
    """({level: count}, {level: nodes that suppressed it}, count of other values)."""
    values, flags = block[0::2].astype(np.int64), block[1::2].astype(np.int64)
    return (dict(zip(op.levels, values[:-1].tolist())), dict(zip(op.levels, flags[:-1].tolist())),
            int(values[-1]))
