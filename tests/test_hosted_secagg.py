"""Secure cycles of hosted models: the host sums masked vectors and learns only their mean."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers.hosted import clients, make_host_home
from helpers.plans import TinyPlan
from meshfl.errors import ConfigError
from meshfl.hosted import Host
from meshfl.secagg import VECTOR

SECURE = {"secure_aggregation": True, "cycle_length": 3.0, "setup_timeout": 2.0}
ARGS = {"epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 7}


def _in_threads(cs, model="m"):
    """Every client's turn at once (a secure cycle waits for its roster): results or exceptions."""
    out: list = [None] * len(cs)

    def run(i):
        try:
            out[i] = cs[i].train_once(model)
        except Exception as exc:  # noqa: BLE001  (the test looks at it)
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return out


def _close(cs):
    for c in cs:
        c.close()


def _expected(cs, survivors, model="m"):
    """The plain sample-weighted mean of these clients' diffs on the version they trained."""
    total, weight = None, 0
    for c in (cs[i] for i in survivors):
        diff, samples, _ = c.train(c._cache[model], ARGS, model)
        total = {k: v * samples for k, v in diff.items()} if total is None else \
            {k: total[k] + v * samples for k, v in diff.items()}
        weight += samples
    return {k: v / weight for k, v in total.items()}


def test_a_secure_cycle_publishes_the_plain_sample_weighted_mean(host, ctx):
    host.add_model("m", TinyPlan, server={**SECURE, "max_clients": 3, "min_clients": 3}, training_args=ARGS)
    v0 = host.model("m")
    seen = []
    real = host._on_diff
    host._on_diff = lambda msg: seen.append({k: msg.tensors[k].clone() for k in msg.tensors}) or real(msg)
    cs = clients(host, 3, TinyPlan, context=ctx)
    try:
        results = _in_threads(cs)
        assert all(isinstance(r, dict) and r["secure"] for r in results), results
        assert host.wait_version("m", 1, timeout=10)
        v1 = host.model("m")
        expected = _expected(cs, range(3))
        for k in v0:
            torch.testing.assert_close(v1[k], v0[k] + expected[k], atol=1e-5, rtol=0)
        [rec] = [r for r in host.versions("m") if r["version"] == 1]
        assert rec["clients"] == 3 and rec["secure"]["dropped"] == 0 and rec["secure"]["threshold"] == 2
        assert rec["samples"] == sum(r["samples"] for r in results)
        assert "test_accuracy" in rec["metrics"]
        # what reached the host: one masked int32 vector per client, never the diff
        assert len(seen) == 3 and all(set(t) == {VECTOR} and t[VECTOR].dtype == torch.int32 for t in seen)
        plain = torch.cat([v.reshape(-1) for v in expected.values()])
        for t in seen:
            assert not torch.equal(t[VECTOR][: plain.numel()].float(), plain)
        assert len({bytes(t[VECTOR].numpy()) for t in seen}) == 3
        status = host.status("m")[0]
        assert status["cycle"] == 1 and status["open"]["phase"] == "accepting"
    finally:
        _close(cs)


class _Vanishing:
    """Makes a client vanish after the key exchange: it trains but never pushes."""

    def __init__(self, client):
        def train(*a, **k):
            raise RuntimeError("vanished")

        client.train = train


def test_a_member_that_drops_after_the_key_exchange_is_recovered(host, ctx):
    # 4 of at most 5 come: the roster is fixed at the set-up deadline (min_clients 4)
    host.add_model("m", TinyPlan, server={**SECURE, "max_clients": 5, "min_clients": 4}, training_args=ARGS)
    v0 = host.model("m")
    cs = clients(host, 4, TinyPlan, context=ctx)
    try:
        real_train = cs[3].train
        _Vanishing(cs[3])
        results = _in_threads(cs)
        assert isinstance(results[3], RuntimeError)
        assert all(isinstance(r, dict) for r in results[:3]), results
        assert host.wait_version("m", 1, timeout=10)
        cs[3].train = real_train
        v1 = host.model("m")
        expected = _expected(cs, range(3))
        for k in v0:
            torch.testing.assert_close(v1[k], v0[k] + expected[k], atol=1e-5, rtol=0)
        [rec] = [r for r in host.versions("m") if r["version"] == 1]
        assert rec["secure"] == {**rec["secure"], "members": 4, "dropped": 1, "threshold": 3} and rec["clients"] == 3
    finally:
        _close(cs)


def test_too_many_dropouts_fail_the_cycle_cleanly(host, ctx):
    host.add_model("m", TinyPlan, server={**SECURE, "max_clients": 4, "min_clients": 4}, training_args=ARGS)
    v0 = host.model("m")
    cs = clients(host, 4, TinyPlan, context=ctx)
    try:
        for c in cs[2:]:
            _Vanishing(c)
        results = _in_threads(cs)
        assert [getattr(r, "code", None) for r in results[:2]] == ["secagg_not_enough"] * 2, results
        status = host.status("m")[0]
        assert status["version"] == 0 and status["cycle"] == 1 and status["open"]["phase"] == "accepting"
        assert status["secure"]["last_failure"]["code"] == "secagg_not_enough"
        for k, v in host.model("m").items():
            assert torch.equal(v, v0[k])
        assert [r["version"] for r in host.versions("m")] == [0]
    finally:
        _close(cs)


def test_secure_configs_are_checked(host):
    for server, code in (({"mode": "async", "secure_aggregation": True}, "secagg_async"),
                         ({"secure_aggregation": True, "max_clients": 101}, "secagg_limit"),
                         ({"secure_aggregation": True, "min_clients": 1}, "secagg_limit")):
        with pytest.raises(ConfigError) as exc:
            host.add_model("m", TinyPlan, server=server)
        assert exc.value.code == code


def test_a_joined_node_daemon_takes_part_in_a_secure_cycle(tmp_path, host, ctx):
    from helpers.data import write_blobs_csv
    from helpers.plans import AddOnePlan
    from meshfl.home import Home
    from meshfl.node import Node
    from meshfl.node._datasets import DatasetRegistry
    from meshfl.node._joins import Joins
    from meshfl.node._plans import PlanRegistry, plan_hash
    from meshfl.plans import plan_source

    host.add_model("m", AddOnePlan, server={**SECURE, "max_clients": 3, "min_clients": 3, "setup_timeout": 10.0})
    v0 = host.model("m")
    with Home.init(tmp_path / "node", "node", "node", heartbeat=0.3, dead_after=3.0) as h:
        h.trust(host.card, host.endpoint)
        host.enroll([h.identity.card])
        DatasetRegistry(h.store, h.audit).add("blobs", ["blobs"], "csv", write_blobs_csv(tmp_path / "b.csv"),
                                              target="target")
        Joins(h.store, h.audit).join(host.card.peer_id, "host", "m", "blobs")
        plans = PlanRegistry(h.store, h.audit)
        plans.submit(plan_source(AddOnePlan), "AddOnePlan")
        plans.approve(plan_hash(plan_source(AddOnePlan)))
    cs = clients(host, 2, AddOnePlan, context=ctx, timeout=20.0)
    try:
        with Node(tmp_path / "node") as node:
            results = _in_threads(cs)
            assert all(isinstance(r, dict) for r in results), results
            assert host.wait_version("m", 1, timeout=20)
            [rec] = [r for r in host.versions("m") if r["version"] == 1]
            assert rec["clients"] == 3 and rec["secure"]["members"] == 3
            for k, t in host.model("m", 1).items():  # AddOnePlan: +1 on every parameter, whoever trained
                torch.testing.assert_close(t, v0[k] + 1, atol=1e-5, rtol=0)
            deadline = time.monotonic() + 15
            while not [r for r in node.audit.records() if r.event == "secagg.revealed"]:  # after its ack
                assert time.monotonic() < deadline, "the node did not reveal"
                time.sleep(0.05)
            [setup] = [r.fields for r in node.audit.records() if r.event == "secagg.setup"]
            assert setup["participants"] == 3 and setup["threshold"] == 2
    finally:
        _close(cs)


def test_a_host_restarted_mid_cycle_abandons_it_and_applies_nothing(tmp_path, ctx):
    from meshfl.cli._host import stored_status

    home = make_host_home(tmp_path)
    host = Host(home).start()
    try:
        host.add_model("m", TinyPlan, server={**SECURE, "max_clients": 3, "min_clients": 3, "cycle_length": 30.0},
                       training_args=ARGS)
        cs = clients(host, 3, TinyPlan, context=ctx)
        try:
            for c in cs:
                _Vanishing(c)  # each trains after the key exchange, then its process "dies"
            assert all(isinstance(r, RuntimeError) for r in _in_threads(cs))
        finally:
            _close(cs)
        assert host.status("m")[0]["open"]["phase"] == "training"
        assert stored_status(host.home, "m")[0]["open"]["phase"] == "training"  # what `meshfl host status` shows
    finally:
        host.close()
    host = Host(home).start()
    try:
        status = host.status("m")[0]
        assert status["version"] == 0 and status["cycle"] == 1 and status["open"]["phase"] == "accepting"
        assert [r["version"] for r in host.versions("m")] == [0]
        assert [r.fields["cycle"] for r in host.home.audit.records() if r.event == "hosted.cycle_abandoned"] == [0]
    finally:
        host.close()


def test_a_wrong_masked_vector_or_a_second_one_is_refused_and_adds_nothing(host, ctx):
    from meshfl.errors import RemoteError

    host.add_model("m", TinyPlan, server={**SECURE, "max_clients": 2, "min_clients": 2}, training_args=ARGS)
    v0 = host.model("m")
    cs = clients(host, 2, TinyPlan, context=ctx)
    codes = []
    real_push = cs[0].push

    def push(model, ticket, version, diff, samples, **kw):
        for bad in ({VECTOR: diff[VECTOR][:-2]}, {k: v.float() for k, v in diff.items()}):
            try:
                real_push(model, ticket, version, bad, samples, diff_id="bad")
            except RemoteError as exc:
                codes.append(exc.code)
        ack = real_push(model, ticket, version, diff, samples, diff_id="good")
        again = real_push(model, ticket, version, diff, samples, diff_id="good")  # a re-send: counted once
        codes.append(again.fields["duplicate"])
        try:
            real_push(model, ticket, version, diff, samples, diff_id="other")
        except RemoteError as exc:
            codes.append(exc.code)
        return ack

    cs[0].push = push
    try:
        results = _in_threads(cs)
        assert all(isinstance(r, dict) for r in results), results
        assert codes == ["secagg_protocol", "secagg_protocol", True, "duplicate_diff"]
        assert host.wait_version("m", 1, timeout=10)
        expected = _expected(cs, range(2))
        for k, t in host.model("m").items():
            torch.testing.assert_close(t, v0[k] + expected[k], atol=1e-5, rtol=0)
    finally:
        _close(cs)
