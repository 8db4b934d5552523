"""``Analytics``: federated statistics over the nodes' datasets, for a researcher.

Each call runs one or more *passes*; a pass is one task on every selected node (durable like a
training task: queued, answered through the node's outbox, acknowledged), whose answers are summed
here - in the clear, or under secure aggregation, where only the total is ever unmasked.

    an = Analytics(researcher, tags=["cancer"], secagg=True)
    summary = an.describe(bins=32, covariance=True)     # 2 passes
    summary.columns["radius"].mean, summary.histograms["radius"].counts, summary.covariance
    an.quantiles(["radius"], q=[0.25, 0.5, 0.75])      # 1 + 3 passes, with a stated bound
    an.class_counts("diagnosis", levels=["B", "M"])
"""

from __future__ import annotations

import logging
import math
import os
import queue
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MeshflError
from ..researcher._secure import SecureRound
from ..wire import Message
from . import _combine, _limbs
from ._combine import Answer, ColumnStats, Histogram, Quantile
from ._query import AnalyticsError, Op

log = logging.getLogger("meshfl.analytics")

PURPOSES = ("analytics", "preprocessing")


class AnalysisFailed(MeshflError):
    """A pass could not be completed: too few nodes answered (``details["failed"]`` says why)."""

    code = "analysis_failed"


@dataclass(frozen=True)
class StatsEncoding:
    """The shape of a masked statistics vector: 64-bit words only (see :mod:`._limbs`)."""

    values: int

    @property
    def nbytes(self) -> int:
        return _limbs.nbytes(self.values)

    boundary = 0


@dataclass
class Summary:
    """What :meth:`Analytics.describe` found: per column, and the histograms and covariance asked for."""

    columns: dict[str, ColumnStats]
    histograms: dict[str, Histogram] = field(default_factory=dict)
    covariance: np.ndarray | None = None
    correlation: np.ndarray | None = None
    complete_rows: int | None = None
    nodes: list[str] = field(default_factory=list)
    per_node: dict[str, dict[str, ColumnStats]] = field(default_factory=dict)

    def table(self) -> str:
        """The per-column figures as aligned text."""
        head = ["column", "count", "missing", "mean", "std", "min", "max"]
        rows = [[name, s.count, s.missing, f"{s.mean:.6g}", f"{s.std:.6g}", _extreme(s.min, s),
                 _extreme(s.max, s)] for name, s in self.columns.items()]
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def _extreme(value, stats: ColumnStats) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.6g}" if stats.exact_extremes else f"~{value:.3g}"


class Analytics:
    """Statistics over the datasets carrying ``tags`` on the online nodes (or ``nodes``).

    ``secagg``: True, or ``{"threshold": t}`` - only totals are unmasked (per-node figures need
    plain mode); ``min_nodes``: a pass with fewer answers fails; ``purpose``: "analytics", or
    "preprocessing" for the statistics an experiment's preprocessing needs (the nodes' policies
    may allow one and not the other).
    """

    def __init__(self, researcher, tags: list[str], *, secagg: bool | dict = False, nodes: list[str] | None = None,
                 min_nodes: int = 1, timeout: float = 300.0, purpose: str = "analytics") -> None:
        if purpose not in PURPOSES:
            raise AnalyticsError(f"purpose is one of {', '.join(PURPOSES)}")
        self.researcher, self.tags = researcher, list(tags)
        self.secagg = None if secagg is False else ({} if secagg is True else dict(secagg))
        self.node_filter = list(nodes) if nodes else None
        self.min_nodes, self.timeout, self.purpose = int(min_nodes), float(timeout), purpose
        self.id = f"an-{os.urandom(4).hex()}"
        self.passes = 0
        self.datasets: dict[str, dict] = {}  # node -> the dataset record it answers from

    # ------------------------------------------------------------------ statistics
    def describe(self, columns: list | None = None, *, bins: int | None = None, covariance: bool = False,
                 by: str | None = None, groups: list | None = None) -> Summary | dict:
        """Count, missing, mean, (sample) variance, std, min and max per column; with ``bins``, a
        histogram of that many equal bins over each column's range; with ``covariance``, the
        covariance and correlation matrices (over rows with no missing value). Two passes: the
        second is shifted by the first's means, so variances stay exact far from 0. With ``by``
        (a column) and its ``groups``, the figures per group instead: {group: {column: stats}}."""
        columns = self._columns(columns)
        ops = [Op("moments", tuple(columns), by=by, groups=tuple(groups) if groups else None)]
        if by is None:
            ops.append(Op("range", tuple(columns)))
        if covariance:
            ops.append(Op("cross", tuple(columns)))
        first = self.run(ops)
        means = _means(_combine.moments(ops[0], first.block(0)), columns, by)
        second_ops = [Op("moments", tuple(columns), by=by, groups=ops[0].groups, shifts=tuple(means))]
        ranges = _combine.extremes(ops[1], first, 1) if by is None else {}
        if bins:
            second_ops.append(Op("histogram", tuple(columns), edges=tuple(_equal_bins(ranges[c], bins, c) for c in columns)))
        if covariance:
            second_ops.append(Op("cross", tuple(columns), shifts=tuple(means)))
        second = self.run(second_ops)
        stats = _combine.moments(second_ops[0], second.block(0))
        if by is not None:
            return stats
        stats = {c: _with_extremes(s, ranges[c]) for c, s in stats.items()}
        summary = Summary(stats, nodes=self._names(second))
        if bins:
            summary.histograms = dict(zip(columns, _combine.histograms(second_ops[1], second.block(1))))
        if covariance:
            n, _, cov = _combine.covariance(second_ops[-1], second.block(len(second_ops) - 1))
            summary.covariance, summary.complete_rows = cov, n
            summary.correlation = _correlation(cov)
        for node, vector in second.per_node.items():
            summary.per_node[self.researcher.node_name(node)] = _combine.moments(second_ops[0],
                                                                              second.block(0, vector))
        return summary

    def histogram(self, columns: list, bins: int | list | dict = 10) -> dict[str, Histogram]:
        """Bin counts per column: ``bins`` equal bins over each column's range (found by a first
        pass), or the edges to use (a list for all, or {column: edges})."""
        columns = self._columns(columns)
        if isinstance(bins, int):
            ranges = _combine.extremes(Op("range", tuple(columns)), self.run([Op("range", tuple(columns))]), 0)
            edges = tuple(_equal_bins(ranges[c], bins, c) for c in columns)
        else:
            edges = tuple(tuple(bins[c] if isinstance(bins, dict) else bins) for c in columns)
        op = Op("histogram", tuple(columns), edges=edges)
        return dict(zip(columns, _combine.histograms(op, self.run([op]).block(0))))

    def quantiles(self, columns: list, q=(0.25, 0.5, 0.75), *, bins: int = 1000,
                  passes: int = 3) -> dict[str, list[Quantile]]:
        """Quantiles by federated counting: a range pass, then ``passes`` histograms, each zoomed
        into the interval the last one left for each quantile. Each result is the interval numpy's
        (linear-interpolation) quantile of all the records lies in, and its middle. A pass uses up
        to ``bins`` bins per quantile, but no more than keeps about twice the nodes' smallest
        released cell per node in each (finer bins would be suppressed and teach nothing), so the
        interval narrows until it holds a few cells' worth of each node's records: what the nodes'
        rules allow."""
        columns = self._columns(columns)
        q = [float(v) for v in q]
        first = self.run([Op("range", tuple(columns)), Op("moments", tuple(columns))])
        ranges = _combine.extremes(Op("range", tuple(columns)), first, 0)
        n = {c: s.count for c, s in _combine.moments(Op("moments", tuple(columns)), first.block(1)).items()}
        minimum = self.min_cell()
        nodes = max(1, len(first.node_fields))
        windows = {c: [(ranges[c][0], ranges[c][1], n[c])] * len(q) for c in columns}
        for _ in range(max(1, passes)):
            names = [c for c in columns for _ in q]
            edges = [_edges_between(lo, hi, max(2, min(bins, held // (2 * minimum * nodes))), c)
                     for c in columns for lo, hi, held in windows[c]]
            op = Op("histogram", tuple(names), edges=tuple(edges))
            hists = _combine.histograms(op, self.run([op]).block(0))
            k = 0
            for c in columns:
                found = []
                for i, qi in enumerate(q):
                    lo, hi = _combine.locate(hists[k + i], n[c], qi, minimum)
                    old_lo, old_hi, _ = windows[c][i]
                    lo, hi = max(lo, old_lo), min(hi, old_hi)  # every value lies in the range
                    found.append((lo, hi, _combine.held(hists[k + i], lo, hi, minimum)))
                windows[c] = found
                k += len(q)
        return {c: [Quantile(qi, (lo + hi) / 2, lo, hi) for qi, (lo, hi, _) in zip(q, windows[c])] for c in columns}

    def min_cell(self) -> int:
        """The largest of the selected nodes' smallest released cell (their policies say it)."""
        self._select()
        return max([int((r.get("policy") or {}).get("min_cell") or 1) for r in self.datasets.values()] or [1])

    def covariance(self, columns: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(covariance, correlation) of the columns over rows with no missing value."""
        summary = self.describe(columns, covariance=True)
        return summary.covariance, summary.correlation

    def class_counts(self, column: str, levels: list | None = None) -> dict:
        """Records per level of ``column`` ({level: count}, suppressed levels as None), plus
        ``"<other>"``. Without ``levels`` they are found first (:meth:`levels`, plain mode only)."""
        levels = list(levels) if levels is not None else self.levels(column)
        op = Op("counts", (str(column),), levels=tuple(levels))
        found, flags, other = _combine.counts(op, self.run([op]).block(0))
        out = {level: (None if flags[level] and not found[level] else found[level]) for level in levels}
        out["<other>"] = other
        return out

    def levels(self, column: str) -> list:
        """The levels of ``column`` seen on at least each node's minimum of records (their union;
        plain mode only: under secure aggregation give the candidate levels instead)."""
        if self.secagg is not None:
            raise AnalyticsError("finding a column's levels reveals each node's own: it runs in plain mode only; "
                                 "pass the candidate levels under secure aggregation", code="bad_query")
        answer = self.run([Op("levels", (str(column),))])
        union: dict = {}
        for fields in answer.node_fields.values():
            kept, _dropped = fields["levels"][0]  # one [kept, how many dropped] per levels op
            for level in kept:
                union[level] = None
        return sorted(union, key=lambda v: (isinstance(v, str), v))

    def columns(self) -> list[str]:
        """Numeric columns every selected node's dataset has."""
        return self._columns(None)

    # ------------------------------------------------------------------ one pass
    def run(self, ops: list[Op]) -> Answer:
        """One pass of ``ops`` over the selected nodes: the summed answer."""
        nodes = self._select()
        if len(nodes) < self.min_nodes:
            raise AnalysisFailed(f"{len(nodes)} nodes hold data tagged {self.tags}, need {self.min_nodes}")
        self.passes += 1
        pass_id = f"{self.id}.p{self.passes}"
        tasks = {f"{pass_id}.{node}": node for node in nodes}
        secure = None
        values = sum(_size(op, self.secagg is not None) for op in ops)
        failed: dict[str, dict] = {}
        if self.secagg is not None:
            secure = SecureRound(self.researcher, pass_id, nodes, StatsEncoding(values), self.secagg)
            secure.start()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.researcher._route(tasks, inbox)
        deferred: dict[str, str] = {}
        try:
            fields = {"analysis": self.id, "purpose": self.purpose, "dataset_tags": self.tags,
                      "query": {"ops": [op.to_wire() for op in ops]}}
            if secure is not None:
                fields["secagg"] = {"session": pass_id}
            deadline = time.monotonic() + self.timeout

            def send(tid: str) -> None:  # again after a reconnect: a node answers a repeated task id once
                timeout = max(1.0, deadline - time.monotonic())
                fut = self.researcher.request(tasks[tid], Message("analytics", {**fields, "task_id": tid}), timeout)
                fut.add_done_callback(lambda f: inbox.put(("answer", tid, f)))

            for tid in tasks:
                send(tid)
            if secure is not None:
                secure.exchange_keys(failed)
            vectors, node_fields = self._collect(tasks, inbox, failed, deadline, secure, deferred, send)
        finally:
            self.researcher._route(tasks, None)
        needed = max(self.min_nodes, secure.threshold if secure else 0)
        if len(node_fields) < needed:
            for node, tid in deferred.items():
                self.researcher.send(node, Message("result.ack", {"task_id": tid}))
            reasons = "; ".join(f"{self.researcher.node_name(n)}: [{e.get('code')}] {e.get('message')}"
                                for n, e in failed.items())
            raise AnalysisFailed(f"{len(node_fields)} of {len(nodes)} nodes answered, {needed} needed; {reasons}",
                                 details={"failed": {self.researcher.node_name(n): e for n, e in failed.items()}})
        if secure is not None:
            total = secure.finish(sorted(node_fields), failed, deferred)
            total = _limbs.decode(total.view(np.uint64))
        else:
            total = _limbs.exact_sum(list(vectors.values()))
        if failed:
            log.warning("analysis %s: %s", pass_id, "; ".join(f"{self.researcher.node_name(n)}: {e.get('code')}"
                                                                  for n, e in failed.items()))
        return Answer(ops, secure is not None, total, vectors, node_fields, failed)

    def _collect(self, tasks: dict, inbox, failed: dict, deadline: float, secure, deferred: dict, send):
        waiting = dict(tasks)
        accepted: set[str] = set()
        vectors, node_fields = {}, {}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                online = set(self.researcher.nodes())
                for tid, node in list(waiting.items()):
                    if node not in online:
                        del waiting[tid]
                continue
            if isinstance(msg, tuple) and msg[0] == "link":  # a node (re)connected: its request may be lost
                for tid, node in list(waiting.items()):
                    if node == msg[1] and tid not in accepted:
                        send(tid)
                continue
            if isinstance(msg, tuple):
                _, tid, fut = msg
                error = fut.exception()
                if error is None:
                    accepted.add(tid)
                elif tid in waiting and tid not in accepted:
                    failed.setdefault(waiting.pop(tid), error.to_wire() if isinstance(error, MeshflError)
                                      else {"code": "internal", "message": str(error)})
                continue
            tid = msg.fields["task_id"]
            node = waiting.pop(tid, None)
            if node is None:
                continue
            if not msg.fields["ok"]:
                failed.setdefault(node, msg.fields.get("error", {"code": "failed", "message": "no detail"}))
                self.researcher.send(node, Message("result.ack", {"task_id": tid}))
                continue
            try:
                if secure is not None:
                    secure.sum.add(msg.tensors)
                    deferred[node] = tid
                else:
                    vectors[node] = msg.tensors["values"].numpy().astype(np.float64, copy=True)
                    self.researcher.send(node, Message("result.ack", {"task_id": tid}))
                node_fields[node] = dict(msg.fields)
            except (MeshflError, KeyError) as exc:
                failed[node] = {"code": "bad_answer", "message": str(exc)}
                self.researcher.send(node, Message("result.ack", {"task_id": tid}))
        return vectors, node_fields

    # ------------------------------------------------------------------ helpers
    def _select(self) -> list[str]:
        online = self.researcher.nodes()
        unknown = [n for n in online if n not in self.datasets]
        if unknown:
            for node, records in self.researcher.search(self.tags, nodes=unknown).items():
                if records:
                    self.datasets[node] = records[0]
        nodes = sorted(n for n in online if n in self.datasets)
        return [n for n in nodes if n in self.node_filter] if self.node_filter is not None else nodes

    def _columns(self, columns: list | None) -> list[str]:
        if columns is not None:
            return [str(c) for c in columns]
        self._select()
        common = None
        for record in self.datasets.values():
            dtypes = record.get("dtypes") or {}
            numeric = [c for c in record.get("columns") or [] if dtypes.get(c) in ("int", "float")
                       and c != record.get("target")]
            common = numeric if common is None else [c for c in common if c in numeric]
        if not common:
            raise AnalyticsError("no numeric column is common to the selected datasets; name the columns")
        return common

    def _names(self, answer: Answer) -> list[str]:
        return sorted(self.researcher.node_name(n) for n in answer.node_fields)


def _size(op: Op, secure: bool) -> int:
    from ._query import op_size

    return op_size(op, secure)


def _means(stats: dict, columns: list[str], by: str | None) -> list[float]:
    if by is None:
        return [0.0 if math.isnan(stats[c].mean) else stats[c].mean for c in columns]
    totals = {c: [0.0, 0] for c in columns}
    for group in stats.values():
        for c, s in group["columns"].items():
            totals[c][0] += s.sum
            totals[c][1] += s.count
    return [t[0] / t[1] if t[1] else 0.0 for t in (totals[c] for c in columns)]


def _with_extremes(stats: ColumnStats, extremes: tuple) -> ColumnStats:
    lo, hi, exact = extremes
    return ColumnStats(**{**stats.to_dict(), "min": lo, "max": hi, "exact_extremes": exact})


def _equal_bins(extremes: tuple, bins: int, column: str) -> tuple[float, ...]:
    lo, hi, _ = extremes
    return _edges_between(lo, hi, bins, column)


def _edges_between(lo: float, hi: float, bins: int, column: str) -> tuple[float, ...]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise AnalyticsError(f"column {column!r} has no finite range to bin (no values, or values beyond 5e20)",
                             code="bad_bins")
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-9, 1e-12)
    return tuple(np.linspace(lo, hi, int(bins) + 1).tolist())


def _correlation(cov: np.ndarray) -> np.ndarray:
    std = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.outer(std, std)


__all__ = ["AnalysisFailed", "Analytics", "StatsEncoding", "Summary", "torch"]
