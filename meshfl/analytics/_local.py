"""A node's side of analytics: the sufficient statistics of a query over its table, and the
suppression of small cells before anything leaves.

:func:`compute` runs in the node's worker (it reads the data); :func:`suppress` and
:func:`coarsen_extremes` run in the node process on the finished vector, so that what the
operator's rules allow does not depend on code that shares an interpreter with plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._query import MAGNITUDE_BUCKETS, MAGNITUDE_EDGES, AnalyticsError, Op, layout


@dataclass
class Table:
    """A dataset as named columns: ``numeric`` float64 arrays (NaN where missing) and ``text``
    object arrays of str (\"\" where missing); every column has ``rows`` entries."""

    rows: int
    numeric: dict[str, np.ndarray] = field(default_factory=dict)
    text: dict[str, np.ndarray] = field(default_factory=dict)

    def values(self, name: str) -> np.ndarray:
        if name in self.numeric:
            return self.numeric[name]
        if name in self.text:
            return self.text[name]
        raise AnalyticsError(f"no column {name!r} in this dataset", code="unknown_column")

    def number(self, name: str) -> np.ndarray:
        if name in self.numeric:
            return self.numeric[name]
        if name in self.text:
            raise AnalyticsError(f"column {name!r} holds text, not numbers", code="non_numeric_column")
        raise AnalyticsError(f"no column {name!r} in this dataset", code="unknown_column")


def compute(ops: list[Op], table: Table, secure: bool) -> tuple[np.ndarray, list]:
    """The query's answer vector (float64, :func:`~._query.layout`) and, per op, the extra answer
    of ``levels`` ops (``[[level, count], ...]``; None for the others)."""
    spans = layout(ops, secure)
    out = np.zeros(spans[-1][0] + spans[-1][1] if spans else 0)
    extras: list = []
    for op, (offset, size) in zip(ops, spans):
        block = out[offset : offset + size]
        extras.append(_OPS[op.op](op, table, block, secure))
    return out, extras


def _moments(op: Op, table: Table, out: np.ndarray, secure: bool) -> None:
    columns = [table.number(c) for c in op.columns]
    shifts = op.shifts or (0.0,) * len(columns)
    masks = [None] if op.by is None else [_equal(table.values(op.by), g) for g in op.groups]
    step = 2 + 5 * len(columns)
    for g, mask in enumerate(masks):
        block = out[g * step : (g + 1) * step]
        block[0] = table.rows if mask is None else int(np.count_nonzero(mask))
        for j, (values, shift) in enumerate(zip(columns, shifts)):
            v = values if mask is None else values[mask]
            present = ~np.isnan(v)
            kept = v[present] if not present.all() else v
            if shift:
                kept = kept - shift
            cell = block[2 + 5 * j : 7 + 5 * j]
            cell[0] = kept.size
            cell[1] = kept.sum()
            cell[2] = np.dot(kept, kept)
            cell[3] = v.size - kept.size


def _range(op: Op, table: Table, out: np.ndarray, secure: bool) -> None:
    step = 2 * MAGNITUDE_BUCKETS + (0 if secure else 2)
    edges = np.asarray(MAGNITUDE_EDGES)
    for j, name in enumerate(op.columns):
        v = table.number(name)
        v = v[~np.isnan(v)]
        block = out[j * step : (j + 1) * step]
        counts = np.bincount(np.searchsorted(edges, v, side="right"), minlength=MAGNITUDE_BUCKETS)
        block[0 : 2 * MAGNITUDE_BUCKETS : 2] = counts
        if not secure:  # exact here; the node coarsens them unless its operator allows exact extremes
            block[-2:] = (v.min(), v.max()) if v.size else (math.nan, math.nan)


def _histogram(op: Op, table: Table, out: np.ndarray, secure: bool) -> None:
    offset = 0
    for name, edges in zip(op.columns, op.edges):
        v = table.number(name)
        present = ~np.isnan(v)
        size = 1 + 2 * (len(edges) + 1)
        block = out[offset : offset + size]
        offset += size
        block[0] = v.size - int(np.count_nonzero(present))
        block[1::2] = np.bincount(_bins(v[present] if not present.all() else v, np.asarray(edges)),
                                  minlength=len(edges) + 1)


def _bins(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Cell of each value: 0 below the first edge, i for bin i-1 ([edge i-1, edge i), the last
    bin closed as numpy's), len(edges) above. Uniform edges take numpy's fast path (a scaled
    floor, then corrected against the edges, so the cells are exactly those of a search)."""
    n = len(edges)
    widths = np.diff(edges)
    if np.allclose(widths, widths[0], rtol=1e-12, atol=0):
        idx = np.floor((v - edges[0]) * ((n - 1) / (edges[-1] - edges[0]))).astype(np.int64) + 1
        np.clip(idx, 0, n, out=idx)
        inside = (idx >= 1) & (idx <= n - 1)
        lo = np.where(inside, edges[np.clip(idx - 1, 0, n - 1)], -np.inf)
        hi = np.where(inside, edges[np.clip(idx, 0, n - 1)], np.inf)
        idx[inside & (v < lo)] -= 1
        idx[inside & (v >= hi) & (idx < n - 1)] += 1
        idx[(idx == 0) & (v >= edges[0])] = 1
        idx[(idx == n) & (v <= edges[-1])] = n - 1
        idx[(idx == n - 1) & (v > edges[-1])] = n
    else:
        idx = np.searchsorted(edges, v, side="right")
    idx[v == edges[-1]] = n - 1  # the last bin includes its right edge
    return idx


def _cross(op: Op, table: Table, out: np.ndarray, secure: bool) -> None:
    x = np.column_stack([table.number(c) for c in op.columns])
    complete = ~np.isnan(x).any(axis=1)
    if not complete.all():
        x = x[complete]
    if op.shifts is not None and any(op.shifts):
        x -= np.asarray(op.shifts)
    d = x.shape[1]
    out[0] = x.shape[0]
    out[2 : 2 + d] = x.sum(axis=0)
    upper = np.triu_indices(d)
    out[2 + d :] = (x.T @ x)[upper]


def _counts(op: Op, table: Table, out: np.ndarray, secure: bool) -> None:
    values = table.values(op.columns[0])
    matched = np.zeros(values.shape[0], dtype=bool)
    for i, level in enumerate(op.levels):
        hit = _equal(values, level)
        matched |= hit
        out[2 * i] = int(np.count_nonzero(hit))
    present = ~np.isnan(values) if values.dtype.kind == "f" else values != ""
    out[-2] = int(np.count_nonzero(present & ~matched))


def _levels(op: Op, table: Table, out: np.ndarray, secure: bool) -> list:
    values = table.values(op.columns[0])
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values[values != ""]
    found, counts = np.unique(values, return_counts=True)
    return [[_level(v), int(c)] for v, c in zip(found.tolist(), counts.tolist())]


def _equal(values: np.ndarray, level) -> np.ndarray:
    if values.dtype.kind == "f":
        try:
            return values == float(level)
        except (TypeError, ValueError):
            return np.zeros(values.shape[0], dtype=bool)
    return values == str(level)


def _level(value):
    """A level as it travels: numbers that are whole as int, others as they are."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_OPS = {"moments": _moments, "range": _range, "histogram": _histogram, "cross": _cross, "counts": _counts,
        "levels": _levels}


# --------------------------------------------------------------------------- node-side rules
def suppress(ops: list[Op], vector: np.ndarray, secure: bool, minimum: int) -> int:
    """Zero every cell counted from 1 to ``minimum - 1`` records and set its flag; returns how
    many cells were suppressed. A cell is a group, a (group, column) of moments, a bucket, a
    bin, a level, or a cross product's complete rows."""
    if minimum <= 1:
        return 0
    small = 0

    def rule(block: np.ndarray, count_at: int, flag_at: int, clear: slice) -> None:
        nonlocal small
        if 0 < block[count_at] < minimum:
            block[clear] = 0
            block[flag_at] = 1
            small += 1

    for op, (offset, size) in zip(ops, layout(ops, secure)):
        block = vector[offset : offset + size]
        d = len(op.columns)
        if op.op == "moments":
            step = 2 + 5 * d
            for g in range(size // step):
                group = block[g * step : (g + 1) * step]
                rule(group, 0, 1, slice(0, step))
                for j in range(d):
                    cell = group[2 + 5 * j : 7 + 5 * j]
                    rule(cell, 0, 4, slice(0, 4))
        elif op.op == "range":
            step = 2 * MAGNITUDE_BUCKETS + (0 if secure else 2)
            for j in range(d):
                buckets = block[j * step : j * step + 2 * MAGNITUDE_BUCKETS]
                for b in range(MAGNITUDE_BUCKETS):
                    rule(buckets, 2 * b, 2 * b + 1, slice(2 * b, 2 * b + 1))
        elif op.op == "histogram":
            start = 0
            for edges in op.edges:
                cells = block[start + 1 : start + 1 + 2 * (len(edges) + 1)]
                start += 1 + 2 * (len(edges) + 1)
                for b in range(len(edges) + 1):
                    rule(cells, 2 * b, 2 * b + 1, slice(2 * b, 2 * b + 1))
        elif op.op == "cross":
            rule(block, 0, 1, slice(0, size))
        elif op.op == "counts":
            for b in range(size // 2):
                rule(block, 2 * b, 2 * b + 1, slice(2 * b, 2 * b + 1))
    return small


def coarsen_extremes(ops: list[Op], vector: np.ndarray) -> None:
    """Round a plain answer's exact min and max outward to the magnitude grid (its buckets were
    counted, flags included: a suppressed bucket still bounds the extremes)."""
    edges = (-math.inf, *MAGNITUDE_EDGES, math.inf)
    for op, (offset, size) in zip(ops, layout(ops, secure=False)):
        if op.op != "range":
            continue
        step = 2 * MAGNITUDE_BUCKETS + 2
        for j in range(len(op.columns)):
            block = vector[offset + j * step : offset + (j + 1) * step]
            seen = np.flatnonzero((block[0 : 2 * MAGNITUDE_BUCKETS : 2] > 0) | (block[1 : 2 * MAGNITUDE_BUCKETS : 2] > 0))
            block[-2:] = (edges[seen[0]], edges[seen[-1] + 1]) if seen.size else (math.nan, math.nan)


def keep_levels(found: list, minimum: int) -> tuple[list, int]:
    """The levels ``[[level, count], ...]`` seen on at least ``minimum`` records (sorted), and how
    many others there were."""
    kept = [level for level, count in found if count >= max(1, minimum)]
    return sorted(kept, key=lambda v: (isinstance(v, str), v)), len(found) - len(kept)
