"""Hosted models larger than one chunk: pulled and pushed chunk by chunk (meshfl/hosted/_chunks.py),
with a host whose message limit is well below the model's size."""

from __future__ import annotations


import pytest
import torch

from helpers.hosted import clients, make_host_home, wait_for
from helpers.plans import AddOnePlan
from meshfl.errors import RemoteError, RequestTimeout
from meshfl.hosted import Backoff, Host
from meshfl.protocol import chunk_plan, layout_of
from meshfl.wire import Message

WIDE = {"width": 150_000}  # AddOnePlan: 1.05 M float32, about 4.2 MB
LIMIT = 512 << 10  # the host's max_message_bytes: an eighth of the model
CHUNK = 128 << 10  # 33 chunks a transfer: more than a window in flight


@pytest.fixture
def host(tmp_path):
    h = Host(make_host_home(tmp_path), max_message_bytes=LIMIT, chunk_bytes=CHUNK).start()
    h.add_model("m", AddOnePlan, model_args=WIDE, server={"max_clients": 2, "cycle_length": 60})
    yield h
    h.close()


def _ticket(client):
    answer = client.request("m")
    assert not isinstance(answer, Backoff), answer
    return answer.fields


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_a_model_of_many_chunks_trains_through_a_cycle_with_light_clients(host, ctx):
    v0 = host.model("m")
    assert _nbytes(v0) > 8 * LIMIT
    cs = clients(host, 2, AddOnePlan, context=ctx)
    try:
        t = _ticket(cs[0])
        entry = cs[0].pull("m", 0)
        for k in v0:  # every chunk in its place
            torch.testing.assert_close(entry["tensors"][k], v0[k])
        whole = {k: torch.ones_like(v) for k, v in v0.items()}
        with pytest.raises(RemoteError) as exc:  # the same diff in one message: over the host's limit
            cs[0].call(Message("hosted.diff", {"model": "m", "ticket": t["ticket"], "diff_id": "x", "version": 0,
                                               "samples": 5}, whole))
        assert exc.value.code == "oversize"
        assert host.status("m")[0]["open"]["diffs"] == 0
        for c in cs:
            assert c.train_once("m")["duplicate"] is False
        assert host.wait_version("m", 1, timeout=20)
        [record] = [r for r in host.versions("m") if r["version"] == 1]
        assert record["diffs"] == 2 and record["clients"] == 2
        for k, v in host.model("m", 1).items():  # AddOnePlan: +1 on every parameter
            torch.testing.assert_close(v, v0[k] + 1)
        assert cs[0].pull("m", 1)["version"] == 1
        wait_for(lambda: host._pulls.in_flight == host._pushes.in_flight == 0 and not host._uploads)  # every slot, buffer given back
    finally:
        for c in cs:
            c.close()


def test_duplicated_and_replayed_chunks_change_nothing(host, ctx):
    v0 = host.model("m")
    c, other = clients(host, 2, AddOnePlan, context=ctx)
    try:
        ticket = _ticket(c)["ticket"]
        layout = layout_of(v0)
        chunks = chunk_plan(layout, CHUNK)
        diff = {k: torch.full_like(v, 0.25) for k, v in v0.items()}
        flat = {k: t.reshape(-1) for k, t in diff.items()}

        def put(diff_id, index, data=None):
            if data is None:
                name, start, count = chunks[index]
                data = flat[name][start : start + count]
            return c.call(Message("hosted.put", {"model": "m", "diff_id": diff_id, "index": index}, {"data": data}))

        def code(call):
            with pytest.raises(RemoteError) as exc:
                call()
            return exc.value.code

        assert code(lambda: put("d1", 0)) == "no_upload"  # no slot, no upload: nothing written
        go = c.call(Message("hosted.push", {"model": "m", "ticket": ticket, "diff_id": "d1", "layout": layout}))
        assert go.fields["chunk_bytes"] == CHUNK
        for i in range(len(chunks)):
            put("d1", i)
        fields = {"model": "m", "ticket": ticket, "diff_id": "d1", "version": 0, "samples": 5,
                  "chunks": len(chunks)}
        put("d1", 3)  # a duplicated chunk
        assert code(lambda: put("old", 3, torch.full((chunks[3][2],), 9.0))) == "no_upload"  # another diff's
        assert code(lambda: put("d1", 3, torch.zeros(7))) == "bad_chunk"  # does not fit its place
        assert code(lambda: put("d1", len(chunks), torch.zeros(7))) == "bad_chunk"  # no such chunk
        assert c.call(Message("hosted.diff", fields)).fields["duplicate"] is False
        assert code(lambda: put("d1", 3, torch.full((chunks[3][2],), 9.0))) == "no_upload"  # a replay after the ack
        assert c.call(Message("hosted.push", {"model": "m", "ticket": ticket, "diff_id": "d1",
                                              "layout": layout})).fields["duplicate"]  # acknowledged at once
        t2 = _ticket(other)
        other.pull("m", 0)
        other.push("m", t2["ticket"], 0, diff, 5)
        assert host.wait_version("m", 1, timeout=20)
        for k, v in host.model("m", 1).items():
            torch.testing.assert_close(v, v0[k] + 0.25)
    finally:
        c.close()
        other.close()


def test_a_chunked_diff_with_a_missing_chunk_is_incomplete_and_can_be_pushed_again(host, ctx):
    v0 = host.model("m")
    [c] = clients(host, 1, AddOnePlan, context=ctx)
    try:
        ticket = _ticket(c)["ticket"]
        layout = layout_of(v0)
        chunks = chunk_plan(layout, CHUNK)
        c.call(Message("hosted.push", {"model": "m", "ticket": ticket, "diff_id": "d1", "layout": layout}))
        fields = {"model": "m", "ticket": ticket, "diff_id": "d1", "version": 0, "samples": 5, "chunks": len(chunks)}
        with pytest.raises(RemoteError) as exc:  # no chunk came (all of them lost)
            c.call(Message("hosted.diff", fields))
        assert exc.value.code == "incomplete_diff"
        assert host.status("m")[0]["open"]["diffs"] == 0 and host._pulls.in_flight == host._pushes.in_flight == 0
        diff = {k: torch.full_like(v, 0.5) for k, v in v0.items()}
        assert c.push("m", ticket, 0, diff, 5, diff_id="d1").fields["duplicate"] is False
        assert host.status("m")[0]["open"]["diffs"] == 1
    finally:
        c.close()


def test_bad_chunked_diffs_keep_their_codes_and_leave_the_model_untouched(host, ctx):
    v0 = host.model("m")
    [c] = clients(host, 1, AddOnePlan, context=ctx)
    try:
        ticket = _ticket(c)["ticket"]
        name = next(k for k, v in v0.items() if v.numel() > 100_000)
        good = {k: torch.full_like(v, 0.5) for k, v in v0.items()}
        nan = {**good, name: good[name].clone()}
        nan[name].view(-1)[-1] = float("nan")  # in the last chunk of a large tensor
        cases = {"bad_shape": {**good, name: torch.zeros(3, 5)},
                 "bad_dtype": {**good, name: good[name].half()},
                 "bad_diff": {k: v for k, v in good.items() if k != name},
                 "oversize": {**good, "extra": torch.zeros(10)},
                 "non_finite": nan}
        for want, diff in cases.items():
            with pytest.raises(RemoteError) as exc:
                c.push("m", ticket, 0, diff, 5)
            assert exc.value.code == want, want
        assert host.status("m")[0]["open"]["diffs"] == 0
        assert c.push("m", ticket, 0, good, 5).fields["duplicate"] is False  # the buffer that held the NaN, reused
        assert host.status("m")[0]["open"]["diffs"] == 1
        for k, v in host.model("m").items():
            torch.testing.assert_close(v, v0[k])  # no version yet: untouched
    finally:
        c.close()


def test_a_client_that_vanishes_mid_upload_frees_its_slot_at_the_transfer_timeout(tmp_path, ctx):
    with Host(make_host_home(tmp_path), max_message_bytes=LIMIT, chunk_bytes=CHUNK, max_transfers=1,
              transfer_timeout=0.5) as host:
        host.add_model("m", AddOnePlan, model_args=WIDE, server={"max_clients": 2})
        v0 = host.model("m")
        gone, other = clients(host, 2, AddOnePlan, context=ctx)
        try:
            layout = layout_of(v0)
            name, start, count = chunk_plan(layout, CHUNK)[0]
            gone.call(Message("hosted.push", {"model": "m", "ticket": _ticket(gone)["ticket"], "diff_id": "g",
                                              "layout": layout}))
            gone.call(Message("hosted.put", {"model": "m", "diff_id": "g", "index": 0},
                              {"data": torch.zeros(count)}))
            gone.close()  # vanished with one chunk of 33 sent
            t = _ticket(other)
            diff = {k: torch.full_like(v, 0.5) for k, v in v0.items()}
            assert other.push("m", t["ticket"], 0, diff, 5).fields["duplicate"] is False  # waited for the slot
            assert host.status("m")[0]["open"]["diffs"] == 1 and "g" not in {u.diff_id for u in host._uploads.values()}
        finally:
            other.close()


def test_a_host_restarted_mid_upload_refuses_the_rest_and_the_push_is_made_again(tmp_path, ctx):
    home = make_host_home(tmp_path)
    host = Host(home, max_message_bytes=LIMIT, chunk_bytes=CHUNK).start()
    host.add_model("m", AddOnePlan, model_args=WIDE, server={"max_clients": 1})
    v0 = host.model("m")
    [c] = clients(host, 1, AddOnePlan, context=ctx)
    try:
        ticket = _ticket(c)["ticket"]
        layout = layout_of(v0)
        diff = {k: torch.full_like(v, 0.5) for k, v in v0.items()}
        name, start, count = chunk_plan(layout, CHUNK)[0]
        first = diff[name].reshape(-1)[start : start + count]
        c.call(Message("hosted.push", {"model": "m", "ticket": ticket, "diff_id": "d", "layout": layout}))
        c.call(Message("hosted.put", {"model": "m", "diff_id": "d", "index": 0}, {"data": first}))
        host.close()  # gone with one chunk of 33 in its upload buffer
        host = Host(home, max_message_bytes=LIMIT, chunk_bytes=CHUNK).start()
        wait_for(lambda: _put_code(c, first) == "no_upload")  # the rest of that upload is refused
        assert c.push("m", ticket, 0, diff, 5, diff_id="d").fields["duplicate"] is False  # pushed whole again
        assert host.wait_version("m", 1, timeout=20)
        [record] = [r for r in host.versions("m") if r["version"] == 1]
        assert record["diffs"] == 1
        for k, v in host.model("m", 1).items():
            torch.testing.assert_close(v, v0[k] + 0.5)
    finally:
        c.close()
        host.close()


def _put_code(client, data):
    """The host's answer to a chunk of upload ``d`` (None while it does not answer yet)."""
    try:
        client.call(Message("hosted.put", {"model": "m", "diff_id": "d", "index": 0}, {"data": data}), timeout=1.0)
    except RemoteError as exc:
        return exc.code
    except RequestTimeout:
        return None
    return "ok"
