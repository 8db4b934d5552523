"""Analytics queries: what a researcher may ask, checked; and the layout of the answer.

A query is a list of *ops*. Each op's answer is a fixed run of float64 entries, all of them sums
over records (counts, sums, sums of squares and cross products, bin counts), so the answers of
several nodes add up entry by entry - in the clear, or masked under secure aggregation, which
sums exactly these vectors. Both sides compute the same :func:`layout` from the query alone.

========== ============================== =================================================
op         fields                         per column (per group, per bin) entries
========== ============================== =================================================
moments    columns, shifts?, by?, groups?  per group: rows, flag; per column: count, sum,
                                          sum of squares (of value - shift), missing, flag
range      columns                        per column: one (count, flag) per bucket of the
                                          public magnitude grid; plain answers also carry
                                          min, max (exact if the node allows it)
histogram  columns, edges (per column)    per column: missing, then (count, flag) for
                                          below, each bin, above
cross      columns, shifts?               rows with no missing value, flag, sums (d),
                                          cross products (upper triangle, d(d+1)/2), of
                                          value - shift
counts     column, levels                 (count, flag) per level, then for any other value
levels     column                         (plain only) no entries: the levels seen on at
                                          least the minimum of records, in the answer's fields
========== ============================== =================================================

Shifts (one per column, default 0) keep sums of squares exact where the mean is far from 0: a
second pass shifted by the first pass's means sums small numbers, whose squares lose nothing.

A *flag* entry is 1 when the node suppressed that cell (fewer records than its minimum): the
cell's other entries are then 0, and the sum of flags says how many nodes suppressed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import MeshflError

OPS = ("moments", "range", "histogram", "cross", "counts", "levels")
MAX_OPS = 16
MAX_COLUMNS = 512
MAX_LEVELS = 4096


def _magnitude_grid() -> tuple[float, ...]:
    """Public bucket edges for coarse extremes: 0 and +-{1, 2, 5} x 10^e, e = -20..20."""
    positive = [m * 10.0 ** e for e in range(-20, 21) for m in (1, 2, 5)]
    return tuple(sorted([-p for p in positive] + [0.0] + positive))


#: Edges of the range op's buckets; bucket i is [edge i-1, edge i), bucket 0 below the first.
MAGNITUDE_EDGES = _magnitude_grid()
MAGNITUDE_BUCKETS = len(MAGNITUDE_EDGES) + 1


class AnalyticsError(MeshflError):
    """A query that cannot be answered. Codes: ``bad_query``, ``unknown_column``,
    ``non_numeric_column``, ``bad_bins``, ``too_many_bins``, ``stats_range``."""

    code = "bad_query"


@dataclass(frozen=True)
class Op:
    op: str
    columns: tuple[str, ...] = ()
    by: str | None = None
    groups: tuple | None = None
    edges: tuple[tuple[float, ...], ...] = ()
    levels: tuple | None = None
    shifts: tuple[float, ...] | None = None

    def to_wire(self) -> dict:
        out: dict[str, Any] = {"op": self.op}
        if self.op in ("counts", "levels"):
            out["column"] = self.columns[0]
        else:
            out["columns"] = list(self.columns)
        if self.by is not None:
            out["by"] = self.by
        if self.groups is not None:
            out["groups"] = list(self.groups)
        if self.edges:
            out["edges"] = [list(e) for e in self.edges]
        if self.levels is not None:
            out["levels"] = list(self.levels)
        if self.shifts is not None:
            out["shifts"] = list(self.shifts)
        return out


def parse(query: Any, max_bins: int) -> list[Op]:
    """The checked ops of a wire query ``{"ops": [...]}``; :class:`AnalyticsError` if malformed."""
    if not isinstance(query, dict) or not isinstance(query.get("ops"), list) or not query["ops"]:
        raise AnalyticsError('a query is {"ops": [op, ...]} with at least one op')
    if len(query["ops"]) > MAX_OPS:
        raise AnalyticsError(f"a query has at most {MAX_OPS} ops")
    return [_parse_op(op, max_bins) for op in query["ops"]]


def _parse_op(raw: Any, max_bins: int) -> Op:
    if not isinstance(raw, dict) or raw.get("op") not in OPS:
        raise AnalyticsError(f"an op is a dict whose 'op' is one of {', '.join(OPS)}")
    kind = raw["op"]
    allowed = {"moments": {"columns", "by", "groups", "shifts"}, "range": {"columns"},
               "histogram": {"columns", "edges"}, "cross": {"columns", "shifts"}, "counts": {"column", "levels"},
               "levels": {"column"}}[kind]
    extra = set(raw) - allowed - {"op"}
    if extra:
        raise AnalyticsError(f"{kind} takes {', '.join(sorted(allowed))}, not {', '.join(sorted(extra))}")
    if kind in ("counts", "levels"):
        columns = (_name(raw.get("column")),)
    else:  # a histogram may bin one column several times (quantiles zoom into several windows)
        columns = _names(raw.get("columns"), unique=kind != "histogram")
    if kind == "histogram":
        edges = raw.get("edges")
        if not isinstance(edges, list) or len(edges) != len(columns):
            raise AnalyticsError("histogram needs one list of bin edges per column", code="bad_bins")
        checked = tuple(_edges(e, max_bins) for e in edges)
        if sum(len(e) - 1 for e in checked) > max_bins:
            raise AnalyticsError(f"this node answers at most {max_bins} bins per query", code="too_many_bins")
        return Op(kind, columns, edges=checked)
    if kind == "counts":
        levels = raw.get("levels")
        if not isinstance(levels, list) or not levels or len(levels) > MAX_LEVELS \
                or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in levels):
            raise AnalyticsError(f"counts needs a list of 1 to {MAX_LEVELS} levels (str or numbers)")
        return Op(kind, columns, levels=tuple(levels))
    shifts = None
    if raw.get("shifts") is not None:
        shifts = raw["shifts"]
        if not isinstance(shifts, list) or len(shifts) != len(columns) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in shifts):
            raise AnalyticsError("shifts are one finite number per column")
        shifts = tuple(float(v) for v in shifts)
    if kind == "moments":
        by, groups = raw.get("by"), raw.get("groups")
        if by is None and groups is not None:
            raise AnalyticsError("moments' groups need by=COLUMN")
        if by is not None:
            by = _name(by)
            if not isinstance(groups, list) or not groups or len(groups) > MAX_LEVELS:
                raise AnalyticsError("moments by a column needs its groups: a list of its levels")
            return Op(kind, columns, by=by, groups=tuple(groups), shifts=shifts)
    if kind == "cross" and len(columns) > 64:
        raise AnalyticsError("cross products take at most 64 columns")
    return Op(kind, columns, shifts=shifts)


def _name(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > 200:
        raise AnalyticsError("a column is named by a non-empty string (or an array column's index)")
    return value


def _names(values: Any, unique: bool = True) -> tuple[str, ...]:
    if not isinstance(values, list) or not values or len(values) > MAX_COLUMNS:
        raise AnalyticsError(f"columns is a list of 1 to {MAX_COLUMNS} column names")
    names = tuple(_name(v) for v in values)
    if unique and len(set(names)) != len(names):
        raise AnalyticsError("a column is named twice")
    return names


def _edges(values: Any, max_bins: int) -> tuple[float, ...]:
    if not isinstance(values, list) or len(values) < 2:
        raise AnalyticsError("bin edges are a list of at least 2 numbers (1 bin)", code="bad_bins")
    if len(values) - 1 > max_bins:
        raise AnalyticsError(f"this node answers at most {max_bins} bins per query", code="too_many_bins")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise AnalyticsError("bin edges are finite numbers", code="bad_bins")
    edges = tuple(float(v) for v in values)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise AnalyticsError("bin edges must increase", code="bad_bins")
    return edges


def op_size(op: Op, secure: bool) -> int:
    """Entries of ``op``'s answer."""
    d = len(op.columns)
    if op.op == "moments":
        return (len(op.groups) if op.groups is not None else 1) * (2 + 5 * d)
    if op.op == "range":
        return d * (2 * MAGNITUDE_BUCKETS + (0 if secure else 2))
    if op.op == "histogram":
        return sum(1 + 2 * (len(e) + 1) for e in op.edges)
    if op.op == "cross":
        return 2 + d + d * (d + 1) // 2
    if op.op == "counts":
        return 2 * (len(op.levels) + 1)
    return 0  # levels: the answer's fields


def layout(ops: list[Op], secure: bool) -> list[tuple[int, int]]:
    """(offset, size) of each op's answer in the result vector."""
    out, offset = [], 0
    for op in ops:
        size = op_size(op, secure)
        out.append((offset, size))
        offset += size
    return out


def nbytes(ops: list[Op], secure: bool) -> int:
    """Bytes of the answer on the wire: float64 values, or their fixed-point words when masked."""
    from ._limbs import LIMBS

    return 8 * (LIMBS if secure else 1) * sum(op_size(op, secure) for op in ops)


def columns_of(ops: list[Op]) -> list[str]:
    """Every column the query reads (for the audit record and the checks)."""
    seen: dict[str, None] = {}
    for op in ops:
        for c in op.columns + ((op.by,) if op.by else ()):
            seen[c] = None
    return list(seen)


def summary(ops: list[Op]) -> list[str]:
    """What the query asks, in words short enough for an audit record."""
    out = []
    for op in ops:
        what = f"{op.op}({', '.join(op.columns)}"
        if op.by:
            what += f" by {op.by}"
        if op.edges:
            what += f"; {sum(len(e) - 1 for e in op.edges)} bins"
        out.append(what + ")")
    return out


def check_columns(ops: list[Op], record: dict) -> None:
    """Refuse, before anything runs, a query naming a column the dataset lacks, or reading a text
    column as numbers (``record``: the dataset's registry record)."""
    columns = record.get("columns")
    dtypes = record.get("dtypes") or {}
    if columns is None and record.get("format") in ("npy", "npz", "torch") and len(record.get("shape") or []) == 2:
        columns = [str(i) for i in range(record["shape"][1])]
        dtypes = dict.fromkeys(columns, "float")
    if not columns:
        raise AnalyticsError(f"dataset {record['name']} ({record.get('format')}) is not a table of columns",
                             code="non_numeric_column")
    for op in ops:
        text_ok = op.op in ("counts", "levels")
        for name in op.columns + ((op.by,) if op.by else ()):
            if name not in columns:
                raise AnalyticsError(f"dataset {record['name']} has no column {name!r} (it has: "
                                     f"{', '.join(columns[:20])}{' ...' if len(columns) > 20 else ''})",
                                     code="unknown_column", details={"column": name})
            if dtypes.get(name) == "str" and not text_ok and name != op.by:
                raise AnalyticsError(f"column {name!r} of dataset {record['name']} holds text: {op.op} needs numbers",
                                     code="non_numeric_column", details={"column": name})
