"""Hosted models: a host with real CURVE over ipc, light clients in this process (meshfl/hosted)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from helpers.hosted import blobs, clients, make_host_home, wait_for
from helpers.plans import AddOnePlan, TinyPlan
from meshfl.crypto import Identity
from meshfl.errors import ConfigError, RemoteError, RequestTimeout
from meshfl.hosted import Backoff, Client, Host
from meshfl.wire import Message, decode, encode


def _close(cs):
    for c in cs:
        c.close()


def _ticket(client, model="m"):
    answer = client.request(model)
    assert not isinstance(answer, Backoff), answer
    return answer.fields


def _diff(host, model="m", fill=0.5, **changes):
    out = {k: torch.full_like(v, fill) for k, v in host.model(model).items()}
    out.update(changes)
    return out


def test_a_cycle_averages_sample_weighted_diffs_into_the_next_version(host, ctx):
    host.add_model("m", AddOnePlan, server={"max_clients": 3, "cycle_length": 30})
    v0 = host.model("m")
    cs = clients(host, 3, AddOnePlan, context=ctx)
    try:
        acks = [c.train_once("m", {"device": "cpu"}) for c in cs]
        assert [a["duplicate"] for a in acks] == [False] * 3
        assert host.wait_version("m", 1, timeout=10)
        v1 = host.model("m")
        for k in v0:  # AddOnePlan adds 1 to every parameter: any weighted mean of the diffs is +1
            torch.testing.assert_close(v1[k], v0[k] + 1)
        [version] = [r for r in host.versions("m") if r["version"] == 1]
        assert version["diffs"] == 3 and version["clients"] == 3
        assert version["samples"] == sum(a["samples"] for a in acks)
        assert version["staleness"] == {"0": 3}
        assert "test_accuracy" in version["metrics"]

        pulls = []
        real_pull = cs[0].pull
        cs[0].pull = lambda *a, **k: pulls.append(a) or real_pull(*a, **k)
        first = _ticket(cs[0])
        assert first["version"] == 1 and not first["current"]  # its cached copy is version 0
        cs[0].pull("m", 1)
        assert _ticket(cs[0])["current"]  # the same ticket; its cache now holds version 1
        assert cs[0].train_once("m")["version"] == 1
        assert len(pulls) == 1  # downloaded once, not again for training
    finally:
        _close(cs)


def test_weights_are_sample_counts(host, ctx):
    host.add_model("m", TinyPlan, server={"max_clients": 2, "cycle_length": 30})
    v0 = host.model("m")
    a, b = clients(host, 2, TinyPlan, context=ctx)
    try:
        ta, tb = _ticket(a), _ticket(b)
        a.push("m", ta["ticket"], 0, _diff(host, fill=1.0), samples=30)
        b.push("m", tb["ticket"], 0, _diff(host, fill=-1.0), samples=10)
        assert host.wait_version("m", 1, timeout=10)
        for k, t in host.model("m").items():
            torch.testing.assert_close(t, v0[k] + (30 * 1.0 - 10 * 1.0) / 40)
    finally:
        _close([a, b])


def test_a_full_cycle_answers_backoff_not_an_error(host, ctx):
    host.add_model("m", TinyPlan, server={"max_clients": 2, "min_clients": 2, "cycle_length": 30})
    cs = clients(host, 3, TinyPlan, context=ctx)
    try:
        first = _ticket(cs[0])
        assert _ticket(cs[0])["ticket"] == first["ticket"]  # asking again is harmless
        _ticket(cs[1])
        full = cs[2].request("m")
        assert isinstance(full, Backoff) and full.reason == "cycle_full" and 0 < full.retry_in <= 30
        cs[0].push("m", first["ticket"], 0, _diff(host), 5)
        sent = cs[0].request("m")
        assert isinstance(sent, Backoff) and sent.reason == "already_sent"
    finally:
        _close(cs)


def _code(exc_info) -> str:
    return exc_info.value.code


def test_bad_diffs_get_coded_errors_and_leave_the_model_untouched(host, ctx):
    host.add_model("m", TinyPlan, server={"max_clients": 3, "cycle_length": 30, "goal": 2})
    v0 = host.model("m")
    c, other, stranger = clients(host, 3, TinyPlan, context=ctx)
    try:
        t = _ticket(c)
        ticket = t["ticket"]
        cases = {
            "bad_shape": _diff(host, weight=torch.zeros(1, 4)),
            "bad_dtype": _diff(host, weight=torch.zeros(2, 4, dtype=torch.float16)),
            "non_finite": _diff(host, bias=torch.tensor([0.0, float("nan")])),
            "oversize": _diff(host, weight=torch.zeros(200, 4)),
        }
        for code, diff in cases.items():
            with pytest.raises(RemoteError) as exc:
                c.push("m", ticket, 0, diff, 5)
            assert _code(exc) == code, code
        missing = _diff(host)
        del missing["bias"]
        with pytest.raises(RemoteError) as exc:
            c.push("m", ticket, 0, missing, 5)
        assert _code(exc) == "bad_diff"
        inf = _diff(host, weight=torch.full((2, 4), float("inf")))
        with pytest.raises(RemoteError) as exc:
            c.push("m", ticket, 0, inf, 5)
        assert _code(exc) == "non_finite"
        with pytest.raises(RemoteError) as exc:
            c.push("m", ticket, 7, _diff(host), 5)
        assert _code(exc) == "unknown_version"
        with pytest.raises(RemoteError) as exc:
            c.push("m", ticket, 0, _diff(host), 0)
        assert _code(exc) == "bad_samples"
        with pytest.raises(RemoteError) as exc:  # never asked to train
            stranger.push("m", "0123456789abcdef", 0, _diff(host), 5)
        assert _code(exc) == "not_accepted"
        with pytest.raises(RemoteError) as exc:
            c.call(Message("hosted.request", {"model": "nope"}))
        assert _code(exc) == "unknown_model"
        assert host.status("m")[0]["open"]["diffs"] == 0

        ack = c.push("m", ticket, 0, _diff(host), 5, diff_id="d1")
        assert ack.fields["duplicate"] is False
        again = c.push("m", ticket, 0, _diff(host), 5, diff_id="d1")  # its ack was lost: sent again
        assert again.fields["duplicate"] is True
        with pytest.raises(RemoteError) as exc:
            c.push("m", ticket, 0, _diff(host, fill=9.0), 5, diff_id="d2")
        assert _code(exc) == "duplicate_diff"
        assert host.status("m")[0]["open"]["diffs"] == 1  # counted once
        assert host.model("m").keys() == v0.keys()
        for k in v0:
            torch.testing.assert_close(host.model("m")[k], v0[k])  # no version yet: untouched
        t2 = _ticket(other)
        other.push("m", t2["ticket"], 0, _diff(host), 5)
        assert host.wait_version("m", 1, timeout=10)
        for k in v0:
            torch.testing.assert_close(host.model("m")[k], v0[k] + 0.5)
        with pytest.raises(RemoteError) as exc:  # a ticket of a cycle that closed
            other.push("m", t2["ticket"], 0, _diff(host), 5, diff_id="late")
        assert _code(exc) == "duplicate_diff"
    finally:
        _close([c, other, stranger])


def test_a_ticket_of_a_closed_cycle_is_stale(host, ctx):
    host.add_model("m", TinyPlan, server={"max_clients": 2, "goal": 1, "cycle_length": 30})
    a, b = clients(host, 2, TinyPlan, context=ctx)
    try:
        ta, tb = _ticket(a), _ticket(b)
        a.push("m", ta["ticket"], 0, _diff(host), 5)
        assert host.wait_version("m", 1, timeout=10)
        with pytest.raises(RemoteError) as exc:
            b.push("m", tb["ticket"], 0, _diff(host), 5)
        assert _code(exc) == "stale_version"
    finally:
        _close([a, b])


def test_the_deadline_frees_the_slots_of_clients_that_vanished(host, ctx):
    host.add_model("m", TinyPlan, server={"max_clients": 2, "min_clients": 2, "cycle_length": 30})
    gone, stays, late = clients(host, 3, TinyPlan, context=ctx)
    try:
        tg, ts = _ticket(gone), _ticket(stays)
        stays.push("m", ts["ticket"], 0, _diff(host), 5)
        assert isinstance(late.request("m"), Backoff)
        with host._lock:  # the deadline comes now rather than in 30 s
            host._live["m"].cycle["deadline"] = time.time()
        wait_for(lambda: host.home.store.read(lambda tx: tx.get("hosted.cycles", "m"))["extended"] >= 1)
        tl = _ticket(late)  # the vanished client's slot is free again
        with pytest.raises(RemoteError) as exc:
            gone.push("m", tg["ticket"], 0, _diff(host), 5)
        assert _code(exc) == "not_accepted"
        late.push("m", tl["ticket"], 0, _diff(host), 5)
        assert host.wait_version("m", 1, timeout=10)
        assert host.versions("m")[-1]["diffs"] == 2  # the diff sent before the extension is kept
    finally:
        _close([gone, stays, late])


def _two_diffs_in_an_open_cycle(tmp_path, ctx):
    """A host (then closed) whose open cycle of three holds the diffs of a (1.0 x 10 samples) and
    b (2.0 x 30); returns its home, its version 0, the three clients and their tickets."""
    home = make_host_home(tmp_path)
    host = Host(home).start()
    host.add_model("m", TinyPlan, server={"max_clients": 3, "cycle_length": 60})
    v0 = host.model("m")
    cs = clients(host, 3, TinyPlan, context=ctx)
    t = [_ticket(c) for c in cs]
    cs[0].push("m", t[0]["ticket"], 0, _diff(host, fill=1.0), 10, diff_id="a")
    cs[1].push("m", t[1]["ticket"], 0, _diff(host, fill=2.0), 30, diff_id="b")
    host.close()
    return home, v0, cs, t


def test_a_restarted_host_keeps_accepted_diffs_and_counts_them_once(tmp_path, ctx):
    home, v0, cs, t = _two_diffs_in_an_open_cycle(tmp_path, ctx)
    host = Host(home).start()
    try:
        assert host.status("m")[0]["open"]["diffs"] == 2
        assert cs[1].push("m", t[1]["ticket"], 0, _diff(host, fill=2.0), 30, diff_id="b").fields["duplicate"]
        cs[2].push("m", t[2]["ticket"], 0, _diff(host, fill=-1.0), 20, diff_id="c")
        assert host.wait_version("m", 1, timeout=10)
        for k, v in host.model("m").items():
            torch.testing.assert_close(v, v0[k] + (10 * 1.0 + 30 * 2.0 - 20 * 1.0) / 60)
        assert [r["version"] for r in host.versions("m")] == [0, 1]
    finally:
        _close(cs)
        host.close()


def test_a_diff_whose_slot_lost_its_bytes_is_dropped_at_restart_and_the_rest_count(tmp_path, ctx, caplog):
    """Slots are not fsynced: an OS crash may lose a diff's bytes. The restarted host must notice
    (its record's CRC) and drop that diff, never fold stale bytes in."""
    home, v0, cs, t = _two_diffs_in_an_open_cycle(tmp_path, ctx)
    slots = home / "hosted" / "m.diffs"
    size = slots.stat().st_size // 2
    with open(slots, "r+b") as f:  # slot 1 (b's) holds other bytes, as after a lost page
        f.seek(size)
        f.write(b"\0" * size)
    host = Host(home).start()
    try:
        assert host.status("m")[0]["open"]["diffs"] == 1
        assert "lost their tensors" in caplog.text
        cs[2].push("m", t[2]["ticket"], 0, _diff(host, fill=-1.0), 20, diff_id="c")
        cs[1].push("m", t[1]["ticket"], 0, _diff(host, fill=2.0), 30, diff_id="b2")  # b sends it again
        assert host.wait_version("m", 1, timeout=10)
        for k, v in host.model("m").items():  # b's diff counted once, from its second sending
            torch.testing.assert_close(v, v0[k] + (10 * 1.0 + 30 * 2.0 - 20 * 1.0) / 60)
    finally:
        _close(cs)
        host.close()


def test_a_failed_group_commit_refuses_the_diff_and_the_model_takes_nothing_until_a_restart(tmp_path, ctx):
    """The sum in memory then holds a diff the store does not: the host must not build on it."""
    home = make_host_home(tmp_path)
    host = Host(home).start()
    host.add_model("m", TinyPlan, server={"max_clients": 3, "cycle_length": 60})
    cs = clients(host, 2, TinyPlan, context=ctx)
    try:
        t = [_ticket(c) for c in cs]
        atomic = host.home.store.atomic

        def failing(fn):  # the disk is full, say, for the committer's transaction
            if threading.current_thread().name.startswith("meshfl-commit"):
                raise OSError("no space left on device")
            return atomic(fn)

        host.home.store.atomic = failing
        with pytest.raises(RemoteError) as exc:
            cs[0].push("m", t[0]["ticket"], 0, _diff(host, fill=1.0), 10, diff_id="a")
        assert _code(exc) == "store_failed"
        host.home.store.atomic = atomic
        with pytest.raises(RemoteError) as exc:  # even with the store back: until a restart
            cs[1].push("m", t[1]["ticket"], 0, _diff(host, fill=2.0), 10, diff_id="b")
        assert _code(exc) == "store_failed"
        host.close()
        host = Host(home).start()  # nothing of a's diff committed: the cycle is empty, a may send it again
        assert host.status("m")[0]["open"]["diffs"] == 0
        assert cs[0].push("m", t[0]["ticket"], 0, _diff(host, fill=1.0), 10, diff_id="a").fields["duplicate"] is False
        assert host.status("m")[0]["open"]["diffs"] == 1
    finally:
        _close(cs)
        host.close()


def test_a_diff_of_large_finite_values_is_not_mistaken_for_a_non_finite_one(host, ctx):
    host.add_model("m", TinyPlan, server={"max_clients": 1, "cycle_length": 30})
    v0 = host.model("m")
    (c,) = clients(host, 1, TinyPlan, context=ctx)
    try:
        big = _diff(host, fill=1e38)  # finite, but its float32 sum overflows
        assert not torch.isfinite(big["weight"].sum())
        assert c.push("m", _ticket(c)["ticket"], 0, big, 1).fields["duplicate"] is False
        assert host.wait_version("m", 1, timeout=10)
        torch.testing.assert_close(host.model("m")["weight"], v0["weight"] + 1e38)
    finally:
        _close([c])


def _discarded(host) -> list[dict]:
    return [r.fields for r in host.home.audit.records() if r.event == "hosted.cycle_discarded"]


def test_an_aggregate_that_overflows_makes_no_version_and_the_next_cycle_starts_on_the_same_one(host, ctx):
    near_max = 3e38  # finite, as is every diff: global + diff is not (float32 tops out at 3.4e38)
    initial = {k: torch.full_like(v, near_max) for k, v in TinyPlan().init_model().state_dict().items()}
    host.add_model("m", TinyPlan, server={"max_clients": 2, "cycle_length": 30}, initial=initial)
    a, b = clients(host, 2, TinyPlan, context=ctx)
    try:
        for c in (a, b):
            c.push("m", _ticket(c)["ticket"], 0, _diff(host, fill=near_max), 10)
        [status] = host.status("m")
        assert status["version"] == 0 and status["cycle"] == 1 and status["open"]["diffs"] == 0
        assert [r["version"] for r in status["versions"]] == [0]
        for k, v in host.model("m").items():
            torch.testing.assert_close(v, initial[k])
        [event] = _discarded(host)
        assert event["reason"] == "non_finite_aggregate" and event["cycle"] == 0 and event["diffs"] == 2
        for c in (a, b):  # the next cycle takes diffs as usual
            c.push("m", _ticket(c)["ticket"], 0, _diff(host, fill=-near_max), 10)
        assert host.wait_version("m", 1, timeout=10)
        for v in host.model("m").values():
            torch.testing.assert_close(v, torch.zeros_like(v))
    finally:
        _close([a, b])


def test_a_buffer_that_overflows_leaves_the_server_momentum_as_it_was(host, ctx):
    server = {"mode": "async", "buffer": 1, "max_clients": 10,
              "aggregator": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.5}}
    host.add_model("m", TinyPlan, server=server)
    v0 = host.model("m")
    a, b, c = clients(host, 3, TinyPlan, context=ctx)
    try:
        a.push("m", _ticket(a)["ticket"], 0, _diff(host, fill=1.0), 10)  # momentum b = 1, the model + 1
        assert host.wait_version("m", 1, timeout=10)
        b.push("m", _ticket(b)["ticket"], 1, _diff(host, fill=3.4e38), 10)  # 10 samples x 3.4e38: inf
        [event] = _discarded(host)
        assert event["reason"] == "non_finite_aggregate" and event["version"] == 1
        assert host.status("m")[0]["version"] == 1
        c.push("m", _ticket(c)["ticket"], 1, _diff(host, fill=2.0), 10)  # momentum 0.5 * 1 + 2: b's left no trace
        assert host.wait_version("m", 2, timeout=10)
        for k, v in host.model("m").items():
            torch.testing.assert_close(v, v0[k] + 1.0 + 2.5)
    finally:
        _close([a, b, c])


def test_a_push_into_a_full_buffer_waits_for_the_next_version_instead_of_failing(host, ctx):
    host.add_model("m", TinyPlan, server={"mode": "async", "buffer": 1, "max_staleness": 3, "max_clients": 10})
    a, b = clients(host, 2, TinyPlan, context=ctx)
    try:
        ta, tb = _ticket(a), _ticket(b)
        v0 = host.model("m")
        original = host._commits._run
        entered, release = threading.Event(), threading.Event()

        def slow_commit(batch):  # hold a's record, folded in already, with b's push on its way
            entered.set()
            assert release.wait(10)
            original(batch)

        host._commits._run = slow_commit
        pushed = []
        thread = threading.Thread(target=lambda: pushed.append(a.push("m", ta["ticket"], 0, _diff(host, fill=1.0), 10)))
        thread.start()
        assert entered.wait(10)
        go = b._socket()
        go.send_multipart(encode(Message("hosted.push", {"model": "m", "ticket": tb["ticket"]}, sender=b.peer_id)))
        wait_for(lambda: host._pushes.queued == 1)  # no room until version 1 exists: b waits, unrefused
        assert not go.poll(200)
        release.set()
        thread.join(10)
        assert go.poll(10000) and decode(go.recv_multipart()).type == "hosted.go"
        assert pushed[0].fields["duplicate"] is False and host.wait_version("m", 1, timeout=10)
        assert b.push("m", tb["ticket"], 0, _diff(host, fill=3.0), 10).fields["duplicate"] is False
        assert host.wait_version("m", 2, timeout=10)  # b's diff, one version old, made version 2
        v2 = host.model("m")
        for k in v0:
            torch.testing.assert_close(v2[k], v0[k] + 1.0 + 3.0)
        assert host.versions("m")[-1]["staleness"] == {"1": 1}
    finally:
        _close([a, b])


def test_a_server_optimizer_steps_on_the_average(host, ctx):
    host.add_model("m", TinyPlan, server={"max_clients": 1, "aggregator": {"name": "fedopt", "server_lr": 0.5}})
    v0 = host.model("m")
    [c] = clients(host, 1, TinyPlan, context=ctx)
    try:
        c.push("m", _ticket(c)["ticket"], 0, _diff(host, fill=1.0), 5)
        assert host.wait_version("m", 1, timeout=10)
        for k, v in host.model("m").items():
            torch.testing.assert_close(v, v0[k] + 0.5)
    finally:
        c.close()


def test_an_unenrolled_or_revoked_key_gets_nothing(host, ctx):
    host.add_model("m", TinyPlan)
    [outsider] = clients(host, 1, TinyPlan, context=ctx, enroll=False, timeout=1.0)
    [member] = clients(host, 1, TinyPlan, context=ctx, timeout=1.0)
    try:
        with pytest.raises(RequestTimeout):
            outsider.request("m")
        assert not isinstance(member.request("m"), Backoff)
        assert host.revoke_client(member.peer_id)
        with pytest.raises(RequestTimeout):
            member.request("m")
    finally:
        _close([outsider, member])


def test_a_client_runs_only_a_plan_it_approved(host, ctx):
    host.add_model("m", TinyPlan)
    [c] = clients(host, 1, AddOnePlan, context=ctx)  # it approved another plan
    try:
        with pytest.raises(Exception) as exc:
            c.train_once("m")
        assert exc.value.code == "plan_not_approved"
    finally:
        c.close()


def test_bad_server_configs_are_refused(host):
    for server, code in (({"mode": "sideways"}, "bad_config"), ({"min_clients": 5, "max_clients": 2}, "bad_config"),
                         ({"aggregator": "krum"}, "bad_config"), ({"mode": "async", "secure_aggregation": True},
                                                                  "secagg_async")):
        with pytest.raises(ConfigError) as exc:
            host.add_model("m", TinyPlan, server=server)
        assert exc.value.code == code
    host.add_model("m", TinyPlan)
    with pytest.raises(Exception) as exc:
        host.add_model("m", TinyPlan)
    assert exc.value.code == "model_exists"


def test_fedbuff_buffers_diffs_and_discounts_stale_ones(host, ctx):
    host.add_model("m", TinyPlan, server={"mode": "async", "buffer": 2, "max_staleness": 1, "max_clients": 10})
    v0 = host.model("m")
    a, b, c, d, e = clients(host, 5, TinyPlan, context=ctx)
    try:
        ta, tb, tc, te = _ticket(a), _ticket(b), _ticket(c), _ticket(e)
        assert ta["version"] == tc["version"] == 0
        a.push("m", ta["ticket"], 0, _diff(host, fill=1.0), 10)
        b.push("m", tb["ticket"], 0, _diff(host, fill=3.0), 10)
        assert host.wait_version("m", 1, timeout=10)
        v1 = host.model("m")
        for k in v0:
            torch.testing.assert_close(v1[k], v0[k] + 2.0)
        td = _ticket(d)
        assert td["version"] == 1
        c.push("m", tc["ticket"], 0, _diff(host, fill=1.0), 10)  # one version old: weighs 10 / sqrt(2)
        d.push("m", td["ticket"], 1, _diff(host, fill=-1.0), 10)
        assert host.wait_version("m", 2, timeout=10)
        w = 10 / 2 ** 0.5
        for k, v in host.model("m").items():
            torch.testing.assert_close(v, v1[k] + (w * 1.0 - 10 * 1.0) / (w + 10))
        assert host.versions("m")[-1]["staleness"] == {"0": 1, "1": 1}
        with pytest.raises(RemoteError) as exc:  # two versions old, max_staleness is 1
            e.push("m", te["ticket"], 0, _diff(host), 10)
        assert _code(exc) == "stale_version"
        fresh = _ticket(e)  # asking again gives a ticket on the current version
        assert fresh["version"] == 2 and fresh["ticket"] != te["ticket"]
    finally:
        _close([a, b, c, d, e])


def test_fedbuff_trains_end_to_end_with_light_clients(host, ctx):
    host.add_model("m", TinyPlan, server={"mode": "async", "buffer": 3, "max_staleness": 4},
                   training_args={"epochs": 2, "lr": 0.05})
    cs = clients(host, 6, TinyPlan, context=ctx)
    try:
        for _ in range(2):
            for c in cs:
                assert not isinstance(c.train_once("m"), Backoff)
        assert host.wait_version("m", 4, timeout=10)
        history = host.versions("m")
        assert sum(r["diffs"] for r in history) == 12
        assert history[-1]["metrics"]["test_accuracy"] > 0.5
    finally:
        _close(cs)


def test_enrollment_tokens_are_limited_revocable_and_audited(tmp_path, ctx):
    from meshfl.crypto import Identity
    from meshfl.hosted import enroll
    from meshfl.hosted._enroll import create_token, revoke_token, tokens

    host = Host(make_host_home(tmp_path), enroll_listen=f"ipc://{tmp_path}/enroll.sock").start()
    try:
        host.add_model("m", TinyPlan)
        token = create_token(host.home, uses=2, label="ward 3")
        ids = [Identity.generate(f"d{i}") for i in range(4)]
        ep = host.enroll_server.endpoint
        assert enroll(ep, host.card, token, ids[0], context=ctx)["new"]
        with pytest.raises(RemoteError) as exc:  # someone else's card, over its own key
            _enroll_as(ctx, ep, host.card, token, ids[1], ids[2].card)
        assert exc.value.code == "bad_card"
        assert enroll(ep, host.card, token, ids[1], context=ctx)["new"]
        with pytest.raises(RemoteError) as exc:
            enroll(ep, host.card, token, ids[2], context=ctx)
        assert exc.value.code == "token_used_up"
        with pytest.raises(RemoteError) as exc:
            enroll(ep, host.card, token.split(".")[0] + ".00", ids[2], context=ctx)
        assert exc.value.code == "bad_token"
        other = create_token(host.home, uses=5)
        assert revoke_token(host.home, other.split(".")[0])
        with pytest.raises(RemoteError) as exc:
            enroll(ep, host.card, other, ids[3], context=ctx)
        assert exc.value.code == "token_revoked"
        [used, revoked] = sorted(tokens(host.home), key=lambda t: t["revoked"])
        assert used["uses"] == 2 and used["uses_left"] == 0 and revoked["revoked"]
        kinds = [r.event for r in host.home.audit.records()]
        assert kinds.count("hosted.token.create") == 2 and "hosted.token.revoke" in kinds
        assert kinds.count("hosted.enroll") == 2
        member = Client(host.endpoint, host.card, identity=ids[0], data=blobs(30, 0), plans=[TinyPlan], context=ctx)
        outsider = Client(host.endpoint, host.card, identity=ids[2], data=blobs(30, 0), plans=[TinyPlan],
                          context=ctx, timeout=1.0)
        try:
            assert not isinstance(member.train_once("m"), Backoff)
            with pytest.raises(RequestTimeout):
                outsider.request("m")
        finally:
            _close([member, outsider])
        host.revoke_client(ids[0].peer_id)
        with pytest.raises(RemoteError) as exc:  # a revoked key does not let itself back in
            enroll(ep, host.card, create_token(host.home), ids[0], context=ctx)
        assert exc.value.code == "key_revoked"
    finally:
        host.close()


def _enroll_as(ctx, endpoint, host_card, token, keys, card):
    """Send ``card`` for enrollment over a link made with another identity's ``keys``."""
    from meshfl.hosted._enroll import ENROLL_LIMITS
    from meshfl.wire import decode, encode

    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey, sock.curve_publickey = keys.link_secret_z85, keys.link_public_z85
    sock.curve_serverkey = host_card.link_key_z85
    sock.connect(endpoint)
    try:
        sock.send_multipart(encode(Message("hosted.enroll", {"token": token, "card": card.to_text()})))
        assert sock.poll(10000)
        reply = decode(sock.recv_multipart(), ENROLL_LIMITS)
    finally:
        sock.close(0)
    raise RemoteError.from_wire(reply.fields)


def test_a_client_killed_before_its_ack_resends_and_is_counted_once(host, ctx):
    from meshfl.wire import encode

    host.add_model("m", TinyPlan, server={"max_clients": 2})
    [c] = clients(host, 1, TinyPlan, context=ctx)
    try:
        t = _ticket(c)
        msg = Message("hosted.diff", {"model": "m", "ticket": t["ticket"], "diff_id": "x1", "version": 0,
                                      "samples": 5, "metrics": {}}, _diff(host), sender=c.peer_id)
        sock = c._socket()
        sock.send_multipart(encode(msg))
        c._hang_up()  # gone before the ack came back
        wait_for(lambda: host.status("m")[0]["open"]["diffs"] == 1)
        again = Client(host.endpoint, host.card, identity=c.identity, data=blobs(20, 1), plans=[TinyPlan],
                       context=ctx)  # the same device, restarted
        try:
            assert again.push("m", t["ticket"], 0, _diff(host), 5, diff_id="x1").fields["duplicate"]
            assert isinstance(again.request("m"), Backoff)
        finally:
            again.close()
        assert host.status("m")[0]["open"]["diffs"] == 1
    finally:
        c.close()


def test_a_flood_of_requests_gets_backoff_and_the_host_stays_responsive(host, ctx):
    from meshfl.wire import decode, encode

    host.add_model("m", TinyPlan, server={"max_clients": 1, "cycle_length": 60})
    member, *flood = clients(host, 21, TinyPlan, context=ctx)
    try:
        _ticket(member)
        for c in flood:
            sock = c._socket()
            for _ in range(10):
                sock.send_multipart(encode(Message("hosted.request", {"model": "m"}, sender=c.peer_id)))
        assert host.status("m")[0]["open"]["accepted"] == 1
        assert isinstance(member.request("m"), Message)  # answered at once, flood or not
        reasons = set()
        for c in flood:
            for _ in range(10):
                assert c._sock.poll(10000)
                reasons.add(decode(c._sock.recv_multipart()).fields.get("reason"))
        assert reasons == {"cycle_full"}
    finally:
        _close([member, *flood])


def test_transfers_beyond_the_limit_wait_their_turn(tmp_path, ctx):
    from meshfl.wire import decode, encode

    host = Host(make_host_home(tmp_path), max_transfers=1).start()
    try:
        host.add_model("m", TinyPlan)
        a, b = clients(host, 2, TinyPlan, context=ctx)
        try:
            assert a.call(Message("hosted.pull", {"model": "m", "version": 0})).type == "hosted.model"
            sock = b._socket()  # a's transfer has not ended: b's pull waits in the queue
            sock.send_multipart(encode(Message("hosted.pull", {"model": "m", "version": 0}, sender=b.peer_id)))
            wait_for(lambda: host._pulls.queued == 1)
            a._send(Message("hosted.pulled", {"model": "m"}))
            assert sock.poll(10000)
            assert decode(sock.recv_multipart()).type == "hosted.model"
            assert host._pulls.in_flight == 1 and host._pulls.queued == 0
            assert b.train_once("m")["duplicate"] is False  # b holds the slot: its own push goes on
            assert a.train_once("m")["duplicate"] is False
        finally:
            _close([a, b])
    finally:
        host.close()


def test_a_request_brings_a_stale_model_with_its_ticket_and_holds_a_pull_slot_only_then(tmp_path, ctx):
    host = Host(make_host_home(tmp_path), max_transfers=1).start()
    try:
        host.add_model("m", TinyPlan, server={"max_clients": 1, "cycle_length": 60})
        a, b = clients(host, 2, TinyPlan, context=ctx)
        try:
            t = a.request("m", pull=True)
            assert t.fields["inline"] and not t.fields["current"]  # the version came with the ticket
            torch.testing.assert_close(a._cache["m"]["tensors"], host.model("m"))
            wait_for(lambda: host._pulls.in_flight == 0)  # a's hosted.pulled gave the slot back
            assert isinstance(b.request("m", pull=True), Backoff)  # the cycle is full: no slot taken
            assert host._pulls.in_flight == 0
            again = a.request("m", pull=True)  # its cache is current now: a plain acceptance
            assert again.fields["current"] and not again.fields.get("inline") and not again.tensors
            assert a.push("m", t.fields["ticket"], 0, _diff(host), 5).fields["duplicate"] is False
            assert host.wait_version("m", 1, timeout=10)
        finally:
            _close([a, b])
    finally:
        host.close()


def test_a_researcher_hosts_a_model_beside_its_experiments(tmp_path, ctx):
    from meshfl.researcher import Researcher

    with Researcher(make_host_home(tmp_path)) as researcher:
        host = researcher.host("m", TinyPlan, listen=f"ipc://{tmp_path}/hosted.sock", server={"max_clients": 1})
        try:
            [c] = clients(host, 1, TinyPlan, context=ctx)
            try:
                assert c.train_once("m")["duplicate"] is False
                assert host.wait_version("m", 1, timeout=10)
            finally:
                c.close()
        finally:
            host.close()
        assert not researcher.home.store.closed  # the host left the researcher's home open


_PUSH_THEN_HANG = """
import sys, time, torch
from meshfl.crypto import Identity, PeerCard
from meshfl.hosted import Client
from meshfl.wire import Message, encode
endpoint, card, home, ticket = sys.argv[1:5]
c = Client(endpoint, PeerCard.from_text(card), identity=Identity.load(home), trust_host_plans=True)
entry = c.pull("m", 0)
c.call(Message("hosted.push", {"model": "m", "ticket": ticket}))  # its transfer slot
diff = {k: torch.full_like(v, 0.5) for k, v in entry["tensors"].items()}
c._socket().send_multipart(encode(Message("hosted.diff", {"model": "m", "ticket": ticket, "diff_id": "d1",
    "version": 0, "samples": 5, "metrics": {}}, diff, sender=c.peer_id)))
print("pushed", flush=True)
time.sleep(600)  # SIGKILLed here, before it reads the host's ack
"""


def test_a_client_process_sigkilled_after_pushing_is_counted_once_when_it_comes_back(host, ctx, tmp_path):
    import signal
    import subprocess
    import sys

    host.add_model("m", TinyPlan, server={"max_clients": 2})
    device = tmp_path / "device"
    identity = Identity.create(device, "device")
    host.enroll([identity.card])
    first = Client(host.endpoint, host.card, identity=identity, plans=[TinyPlan], context=ctx)
    try:
        ticket = _ticket(first)["ticket"]
    finally:
        first.close()
    child = subprocess.Popen([sys.executable, "-c", _PUSH_THEN_HANG, host.endpoint, host.card.to_text(), str(device),
                              ticket], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "pushed"
        wait_for(lambda: host.status("m")[0]["open"]["diffs"] == 1)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The device restarts with its key and sends the same diff again: acknowledged, counted once.
    again = Client(host.endpoint, host.card, identity=Identity.load(device), plans=[TinyPlan], context=ctx)
    try:
        again.pull("m", 0)
        diff = {k: torch.full_like(v, 0.5) for k, v in host.model("m").items()}
        assert again.push("m", ticket, 0, diff, 5, diff_id="d1").fields["duplicate"]
    finally:
        again.close()
    assert host.status("m")[0]["open"]["diffs"] == 1
