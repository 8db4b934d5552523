"""Federated analytics on a live mesh: every statistic against numpy on the pooled data, in plain
mode and under secure aggregation (with a node dropping out), small cells suppressed, bad queries
refused with a code while the node goes on."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from meshfl.analytics import AnalysisFailed, Analytics, Op
from meshfl.errors import MeshflError
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(240)
ROWS = (400, 300, 250, 350)
MIN_CELL = 10


def _write(path, rng, rows, rare: bool):
    """Columns: a (mean 1e4: variances must stay exact), b, c (10 % missing), label (0/1, and a
    handful of 2s on one node only: a cell below the minimum), site (text)."""
    a = 1e4 + 3 * rng.normal(size=rows)
    b = rng.normal(size=rows) * 5 - 2
    c = rng.exponential(2.0, size=rows)
    c[rng.random(rows) < 0.1] = np.nan
    label = rng.integers(0, 2, size=rows)
    if rare:
        label[:4] = 2
    site = rng.choice(["north", "south"], size=rows)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["a", "b", "c", "label", "site"])
        for row in zip(a, b, c, label, site):
            out.writerow([repr(float(row[0])), repr(float(row[1])), "" if np.isnan(row[2]) else repr(float(row[2])),
                          int(row[3]), row[4]])
    return np.column_stack([a, b, c]), label, site


@pytest.fixture(scope="module")
def mesh():
    rng = np.random.default_rng(7)
    with FederatedMesh(4, node_config={"minimum_samples": MIN_CELL, "analytics_max_bins": 5000}) as m:
        m.data = []
        for i, (node, rows) in enumerate(zip(m.nodes, ROWS)):
            path = node.home.path / "cohort.csv"
            m.data.append(_write(path, rng, rows, rare=i == 2))
            node.datasets.add("cohort", ["cohort"], "csv", path, target="label")
        yield m


def _pooled(mesh, nodes=None):
    parts = [d for i, d in enumerate(mesh.data) if nodes is None or i in nodes]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _rel(got, want):
    return np.max(np.abs(np.asarray(got, dtype=float) - want) / np.maximum(np.abs(want), 1e-300))


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_every_statistic_matches_numpy_on_the_pooled_data(mesh, secagg):
    x, _ = _pooled(mesh)
    an = Analytics(mesh.researcher, ["cohort"], secagg=secagg, min_nodes=4)
    summary = an.describe(["a", "b", "c"], bins=16, covariance=True)
    for j, name in enumerate("abc"):
        v = x[:, j][~np.isnan(x[:, j])]
        s = summary.columns[name]
        assert s.count == v.size and s.missing == x.shape[0] - v.size
        assert _rel(s.sum, v.sum()) <= 1e-9 and _rel(s.mean, v.mean()) <= 1e-9
        assert _rel(s.variance, v.var(ddof=1)) <= 1e-9 and _rel(s.std, v.std(ddof=1)) <= 1e-9
        assert s.min <= v.min() and s.max >= v.max()  # coarse extremes: rounded outward
        h = summary.histograms[name]
        counts, _ = np.histogram(v, bins=h.edges)
        released = [n for n, flag in zip(counts, h.suppressed) if not flag]
        assert [n for n, flag in zip(h.counts, h.suppressed) if not flag] == released
        for n, flag, truth in zip(h.counts, h.suppressed, counts):  # a node's small part of a bin is left out
            assert truth - flag * (MIN_CELL - 1) <= n <= truth and (flag or n == truth)
    complete = x[~np.isnan(x).any(axis=1)]
    assert summary.complete_rows == complete.shape[0]
    assert _rel(summary.covariance, np.cov(complete.T)) <= 1e-9
    assert _rel(summary.correlation, np.corrcoef(complete.T)) <= 1e-9
    assert summary.per_node == {} if secagg else set(summary.per_node) == {n.name for n in mesh.nodes}


def test_plain_mode_gives_per_node_figures_and_exact_extremes_where_allowed(mesh):
    for node in mesh.nodes:
        node.gate.policies.set("cohort", exact_extremes=True)
    try:
        summary = Analytics(mesh.researcher, ["cohort"]).describe(["b"])
    finally:
        for node in mesh.nodes:
            node.gate.policies.reset("cohort")
    x, _ = _pooled(mesh)
    assert summary.columns["b"].min == x[:, 1].min() and summary.columns["b"].exact_extremes
    own = mesh.data[0][0][:, 1]
    assert abs(summary.per_node["node0"]["b"].mean - own.mean()) <= 1e-12 * abs(own.mean())


def test_quantiles_lie_within_their_stated_interval(mesh):
    x, _ = _pooled(mesh)
    found = Analytics(mesh.researcher, ["cohort"], secagg=True).quantiles(["b", "c"], q=[0.25, 0.5, 0.75])
    for j, name in ((1, "b"), (2, "c")):
        v = x[:, j][~np.isnan(x[:, j])]
        for quantile in found[name]:
            truth = np.quantile(v, quantile.q)
            assert quantile.low <= truth <= quantile.high
            assert quantile.bound <= 0.1 * v.std()  # a few cells' worth of each node's records
            assert abs(quantile.value - truth) <= quantile.bound


def test_class_counts_and_small_cells_are_suppressed_and_marked(mesh):
    _, labels = _pooled(mesh)
    counts = Analytics(mesh.researcher, ["cohort"]).class_counts("label", levels=[0, 1, 2])
    assert counts[0] == int((labels == 0).sum()) and counts[1] == int((labels == 1).sum())
    assert counts[2] is None  # 4 records on one node only: below the minimum, suppressed
    assert Analytics(mesh.researcher, ["cohort"]).levels("label") == [0, 1]  # the rare level is not revealed
    groups = Analytics(mesh.researcher, ["cohort"]).describe(["b"], by="label", groups=[0, 1, 2])
    assert groups[2]["suppressed"] == 1 and groups[2]["columns"]["b"].count == 0
    x, labels = _pooled(mesh)
    assert abs(groups[0]["columns"]["b"].mean - x[labels == 0, 1].mean()) <= 1e-9 * abs(x[labels == 0, 1].mean())
    released = [r for r in mesh.nodes[2].audit.records() if r.event == "result.released"][-1]
    assert released.fields["columns"] == ["b", "label"] and released.fields["suppressed"] >= 1
    assert released.fields["query"] == ["moments(b by label)"]


def test_secure_totals_survive_a_node_dropping_out(mesh, monkeypatch):
    victim = mesh.nodes[3]

    def fail(*args, **kwargs):
        raise MeshflError("the node went down after the key exchange", code="worker_died")

    monkeypatch.setattr(victim, "_stats_result", fail)  # it had its round keys, then sent nothing
    summary = Analytics(mesh.researcher, ["cohort"], secagg={"threshold": 3}).describe(["a", "b"])
    x, _ = _pooled(mesh, nodes=[0, 1, 2])
    assert summary.nodes == ["node0", "node1", "node2"]
    assert summary.columns["a"].count == x.shape[0]
    assert _rel(summary.columns["b"].mean, x[:, 1].mean()) <= 1e-9
    assert _rel(summary.columns["a"].variance, x[:, 0].var(ddof=1)) <= 1e-9


def _refused(mesh, ops, code):
    with pytest.raises(AnalysisFailed) as caught:
        Analytics(mesh.researcher, ["cohort"], min_nodes=4).run(ops)
    assert {e["code"] for e in caught.value.details["failed"].values()} == {code}


def test_bad_queries_get_a_code_and_the_node_goes_on(mesh, tmp_path):
    _refused(mesh, [Op("moments", ("nope",))], "unknown_column")
    _refused(mesh, [Op("moments", ("site",))], "non_numeric_column")
    _refused(mesh, [Op("histogram", ("b",), edges=((1.0,),))], "bad_bins")
    _refused(mesh, [Op("histogram", ("b",), edges=(tuple(range(6000)),))], "too_many_bins")
    for node in mesh.nodes:
        node.gate.policies.set("cohort", kinds=["training"])
    try:
        _refused(mesh, [Op("moments", ("b",))], "policy_denied")
    finally:
        for node in mesh.nodes:
            node.gate.policies.reset("cohort")
    assert Analytics(mesh.researcher, ["cohort"], min_nodes=4).describe(["b"]).columns["b"].count == sum(ROWS)


def test_a_dataset_whose_file_vanished_fails_only_its_task(tmp_path):
    with FederatedMesh(1, node_config={"minimum_samples": MIN_CELL}) as mesh:
        node = mesh.nodes[0]
        path = node.home.path / "gone.csv"
        _write(path, np.random.default_rng(0), 50, rare=False)
        node.datasets.add("gone", ["gone"], "csv", path, target="label")
        path.unlink()
        with pytest.raises(AnalysisFailed) as caught:
            Analytics(mesh.researcher, ["gone"]).describe(["a"])
        (error,) = caught.value.details["failed"].values()
        assert error["code"] == "dataset_missing" and str(path) not in error["message"]
        assert mesh.researcher.ping(mesh.researcher.nodes()[0])["name"] == "node0"  # the node goes on


def test_a_node_with_analytics_switched_off_refuses(tmp_path):
    with FederatedMesh(1, node_config={"minimum_samples": MIN_CELL, "analytics": False}) as mesh:
        node = mesh.nodes[0]
        _write(node.home.path / "d.csv", np.random.default_rng(0), 50, rare=False)
        node.datasets.add("d", ["d"], "csv", node.home.path / "d.csv", target="label")
        with pytest.raises(AnalysisFailed) as caught:
            Analytics(mesh.researcher, ["d"]).describe(["a"])
        (error,) = caught.value.details["failed"].values()
        assert error["code"] == "policy_denied" and "switched them off" in error["message"]
