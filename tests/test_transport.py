"""Peers over real sockets: CURVE + ZAP trust, request/reply, errors, liveness, clean shutdown."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch
import zmq

from meshfl.crypto import Identity
from meshfl.errors import ConfigError, NotTrusted, PeerUnavailable, RemoteError, RequestTimeout
from meshfl.testing import PeerMesh
from meshfl.transport import Peer
from meshfl.wire import Message, declare, encode

declare("t.echo", optional={"n": "int"}, tensors=True)
declare("t.boom")


def echo_handler(msg: Message) -> Message | None:
    if msg.type == "t.boom":
        raise ValueError("secret detail that must not leak")
    return msg.reply("t.echo", msg.fields, msg.tensors)


def wait_until(cond, timeout=10.0, step=0.02):
    """Bounded wait on a condition (the transport has no event for every case a test checks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        threading.Event().wait(step)
    return cond()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_request_reply_with_tensors_both_directions(transport):
    with PeerMesh(3, transport=transport, handler=echo_handler) as mesh:
        hub, a, b = mesh.peers
        w = torch.randn(300, 700)  # 840 KB
        big = torch.randn(600_000)  # 2.4 MB: several frames
        r = a.call(hub.peer_id, Message("t.echo", {"n": 1}, {"w": w, "big": big}), timeout=10)
        assert r.fields == {"n": 1} and r.sender == hub.peer_id
        assert torch.equal(r.tensors["w"], w) and torch.equal(r.tensors["big"], big)
        # The hub reaches nodes through its ROUTER although it never dialed them.
        for node in (a, b):
            r = hub.call(node.peer_id, Message("t.echo", {"n": 2}), timeout=10)
            assert r.sender == node.peer_id and r.fields == {"n": 2}


def test_many_concurrent_requests_are_matched_to_their_replies():
    with PeerMesh(2, handler=echo_handler) as mesh:
        hub, node = mesh.peers
        futures = [node.request(hub.peer_id, Message("t.echo", {"n": i}), timeout=20) for i in range(300)]
        assert [f.result().fields["n"] for f in futures] == list(range(300))


def test_untrusted_key_cannot_exchange_a_single_message(tmp_path, caplog):
    received = []

    def handler(msg):
        received.append(msg)
        return None

    hub = Peer(Identity.generate("hub"), listen=f"ipc://{tmp_path}/hub.sock", handler=handler).start()
    stranger = Peer(Identity.generate("stranger")).start()
    try:
        with caplog.at_level(logging.WARNING, logger="meshfl.transport"):
            stranger.trust(hub.identity.card, hub.endpoint)  # the stranger knows the hub...
            assert wait_until(lambda: "key not trusted" in caplog.text)  # ...the hub does not know it
        assert stranger.identity.card.link_key.hex() in caplog.text  # the refusal names the key
        with pytest.raises(PeerUnavailable):
            stranger.send(hub.peer_id, Message("t.echo")).result(timeout=5)
        # Even a raw socket speaking CURVE with an unknown key gets nothing through.
        ident = Identity.generate("raw")
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.curve_secretkey, raw.curve_publickey = ident.link_secret_z85, ident.link_public_z85
        raw.curve_serverkey = hub.identity.link_public_z85
        raw.routing_id = ident.peer_id.encode()
        raw.linger = 0
        raw.connect(hub.endpoint)
        try:  # never block: once the hub has refused the handshake the socket may have no pipe at all
            raw.send_multipart(encode(Message("t.echo", sender=ident.peer_id)), flags=zmq.DONTWAIT)
        except zmq.Again:
            pass
        assert wait_until(lambda: caplog.text.count("key not trusted") >= 2)
        assert received == [] and not hub.online()
        raw.close(0)
    finally:
        stranger.close()
        hub.close()


def test_plain_client_is_refused_by_a_curve_peer(tmp_path, caplog):
    with PeerMesh(2) as mesh:
        hub = mesh.peers[0]
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.linger = 0
        raw.setsockopt(zmq.RCVTIMEO, 300)
        raw.connect(hub.endpoint)
        raw.send_multipart(encode(Message("t.echo", sender="x")))
        with pytest.raises(zmq.Again):
            raw.recv_multipart()
        raw.close()
        assert hub.online() == [mesh.peers[1].peer_id]


def test_a_trusted_peer_cannot_claim_another_peers_id(caplog):
    received = []
    with PeerMesh(3, handler=lambda m: received.append(m)) as mesh:
        hub, honest, liar = mesh.peers
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.linger = 0
        raw.curve_secretkey, raw.curve_publickey = liar.identity.link_secret_z85, liar.identity.link_public_z85
        raw.curve_serverkey = hub.identity.link_public_z85
        raw.routing_id = b"impostor-" + honest.peer_id.encode()
        with caplog.at_level(logging.WARNING, logger="meshfl.transport"):
            raw.connect(hub.endpoint)
            raw.send_multipart(encode(Message("t.echo", sender=honest.peer_id)))
            assert wait_until(lambda: "dropped a message" in caplog.text)
        raw.close()
        assert received == []


def test_revoked_peer_is_cut_off():
    with PeerMesh(2, handler=echo_handler) as mesh:
        hub, node = mesh.peers
        assert node.call(hub.peer_id, Message("t.echo"), timeout=5).type == "t.echo"
        assert hub.revoke(node.peer_id)
        with pytest.raises((RequestTimeout, PeerUnavailable)):
            node.call(hub.peer_id, Message("t.echo"), timeout=1.0)
        with pytest.raises(NotTrusted):
            hub.send(node.peer_id, Message("t.echo")).result(timeout=5)


def test_request_to_a_gone_peer_times_out_with_a_clear_error(tmp_path):
    with PeerMesh(2, handler=echo_handler, dead_after=30) as mesh:
        hub, node = mesh.peers
        silent = threading.Event()
        node._handler = lambda m: silent.wait(5) and None  # alive link, never answers
        with pytest.raises(RequestTimeout) as info:
            hub.call(node.peer_id, Message("t.echo"), timeout=0.5)
        silent.set()
        assert node.name in str(info.value) and "t.echo" in str(info.value)
        node.close(linger=0)
        with pytest.raises((RequestTimeout, PeerUnavailable)) as info:
            hub.call(node.peer_id, Message("t.echo"), timeout=0.5)
        assert node.name in str(info.value)


def test_dead_link_is_noticed_and_redialed(tmp_path):
    endpoint = f"ipc://{tmp_path}/hub.sock"
    hub_id, node_id = Identity.generate("hub"), Identity.generate("node")
    hub = Peer(hub_id, listen=endpoint, handler=echo_handler, heartbeat=0.2, dead_after=1.0).start()
    node = Peer(node_id, heartbeat=0.2, dead_after=1.0).start()
    try:
        hub.trust(node_id.card)
        node.trust(hub_id.card, endpoint)
        assert hub.wait_online([node.peer_id], 5) and node.wait_online([hub.peer_id], 5)
        hub.close(linger=0)
        assert wait_until(lambda: not node.is_online(hub.peer_id), timeout=5)
        hub = Peer(hub_id, listen=endpoint, handler=echo_handler, heartbeat=0.2, dead_after=1.0).start()
        hub.trust(node_id.card)
        assert node.wait_online([hub.peer_id], 10)  # the node redialed on its own
        assert node.call(hub.peer_id, Message("t.echo", {"n": 7}), timeout=5).fields == {"n": 7}
    finally:
        node.close()
        hub.close()


def _raw_socket_of(sender: Peer, hub: Peer) -> zmq.Socket:
    """Close ``sender`` and dial ``hub`` with a raw DEALER holding its trusted keys instead."""
    sender.close(linger=0)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.linger = 0
    raw.setsockopt(zmq.RCVTIMEO, 10_000)
    raw.curve_secretkey, raw.curve_publickey = sender.identity.link_secret_z85, sender.identity.link_public_z85
    raw.curve_serverkey = hub.identity.link_public_z85
    raw.routing_id = sender.peer_id.encode()
    raw.connect(hub.endpoint)
    return raw


def test_malformed_frames_get_error_codes_and_the_peer_keeps_running():
    with PeerMesh(3, handler=echo_handler) as mesh:
        hub, node, sender = mesh.peers
        raw = _raw_socket_of(sender, hub)
        cases = {
            "bad_envelope": [b"\xff garbage"],
            "unknown_type": encode(Message("no.such.type", sender=sender.peer_id)),
            "bad_length": [*encode(Message("t.echo", {}, {"w": torch.ones(10)}, sender=sender.peer_id))[:1], b"short"],
            "too_many_frames": [*encode(Message("t.echo", sender=sender.peer_id)), b"extra"],
            "bad_field": encode(Message("t.echo", {"n": "x"}, sender=sender.peer_id)),
        }
        from meshfl.wire import decode

        for code, frames in cases.items():
            raw.send_multipart(frames)
            reply = decode(raw.recv_multipart())
            assert reply.type == "error" and reply.fields["code"] == code, (code, reply.fields)
            assert reply.fields["message"]
        raw.close()
        # The handler's own failures are error replies too, without leaking internals.
        with pytest.raises(RemoteError) as info:
            node.call(hub.peer_id, Message("t.boom"), timeout=5)
        assert info.value.code == "internal" and "secret detail" not in str(info.value)
        assert node.call(hub.peer_id, Message("t.echo", {"n": 1}), timeout=5).fields == {"n": 1}


def test_a_peer_flooding_junk_cannot_flood_the_log(caplog):
    """20 000 malformed frames from a trusted peer: each still gets its error reply, but the log
    takes the first few warnings and then one count, not a line per frame."""
    with caplog.at_level(logging.WARNING, logger="meshfl.transport"):
        with PeerMesh(2, handler=echo_handler) as mesh:
            hub, sender = mesh.peers
            raw = _raw_socket_of(sender, hub)
            errors = 0
            for i in range(20_000):
                raw.send_multipart([b"\xff junk %d" % i])
                while raw.poll(0):  # drain the error replies as they come
                    errors += raw.recv_multipart()[0].find(b'"bad_envelope"') >= 0
            # Replies come in order: the echo comes after every junk frame was handled. The hub drops
            # what does not fit its queue to us, the echo's answer too: ask again after a quiet spell.
            deadline, echoed = time.monotonic() + 60, False
            while not echoed:
                assert time.monotonic() < deadline, "the hub never answered the echo"
                raw.send_multipart(encode(Message("t.echo", {"n": 7}, sender=sender.peer_id)))
                while not echoed and raw.poll(2000):
                    reply = raw.recv_multipart()
                    echoed = b'"t.echo"' in reply[0]
                    errors += reply[0].find(b'"bad_envelope"') >= 0
            raw.close()
            assert errors > 10_000  # it kept answering (some replies are dropped at the socket's high-water mark)
    lines = [r.getMessage() for r in caplog.records if "bad message" in r.getMessage()]
    assert 2 <= len(lines) <= 7, lines  # 5 as they came, one count at close (or at the minute)
    assert "more bad messages from peer1 are counted" in lines[4]
    counted = sum(int(line.split()[1]) for line in lines if "not logged one by one" in line)
    assert counted + 5 == 20_000


def test_rate_limited_warnings_write_a_count_per_period():
    from meshfl.transport._ratelimit import RateLimitedLog

    lines, now = [], [0.0]

    class Log:
        def warning(self, msg, *args):
            lines.append(msg % args)

    noisy = RateLimitedLog(Log(), burst=3, period=60.0, clock=lambda: now[0])
    for t in range(200):  # one bad message a second for 200 s, from one peer
        now[0] = float(t)
        noisy.warning("a", "bad messages from a", "bad message %d", t)
        noisy.flush()  # as the heartbeat does
        if t == 100:
            noisy.warning("b", "bad messages from b", "bad message from b")  # another key has its own budget
    assert lines[:3] == ["bad message 0", "bad message 1",
                         "bad message 2 (more bad messages from a are counted, one line per 60 s)"]
    counts = [line for line in lines if "not logged" in line]
    assert counts == ["57 more bad messages from a in the last 60 s, not logged one by one",
                      "60 more bad messages from a in the last 60 s, not logged one by one",
                      "60 more bad messages from a in the last 60 s, not logged one by one"]
    assert lines.count("bad message from b") == 1 and len(lines) == 3 + 3 + 1
    now[0] = 400.0
    noisy.flush()  # a's period ended with 20 more counted; then it has been quiet ...
    noisy.flush()
    noisy.warning("a", "bad messages from a", "bad message again")  # ... so it starts afresh
    assert lines[-2:] == ["20 more bad messages from a in the last 60 s, not logged one by one", "bad message again"]


def test_curve_over_inproc_is_refused_and_insecure_inproc_mesh_works():
    with pytest.raises(ConfigError):
        Peer(Identity.generate("x"), listen="inproc://x", curve=True)
    with pytest.raises(ConfigError):
        PeerMesh(2, transport="inproc", curve=True)
    with PeerMesh(3, transport="inproc", curve=False, handler=echo_handler) as mesh:
        r = mesh[1].call(mesh[0].peer_id, Message("t.echo", {"n": 5}, {"w": torch.ones(3)}), timeout=5)
        assert r.fields == {"n": 5}


def test_clean_shutdown_leaves_no_thread_or_file_descriptor():
    def fds():
        return len(os.listdir("/proc/self/fd"))

    def ours():
        return [t for t in threading.enumerate() if t.name.startswith("meshfl-")]

    with PeerMesh(2, handler=echo_handler) as mesh:  # warm-up: lazily created globals
        mesh[1].call(mesh[0].peer_id, Message("t.echo"), timeout=5)
    before = fds()
    for transport in ("ipc", "tcp"):
        with PeerMesh(3, transport=transport, handler=echo_handler) as mesh:
            mesh[1].call(mesh[0].peer_id, Message("t.echo"), timeout=5)
            assert len(ours()) == 6
    assert ours() == []
    assert wait_until(lambda: fds() <= before, timeout=5), (before, fds())


def test_a_node_refused_at_first_gets_in_once_trusted(tmp_path):
    hub = Peer(Identity.generate("hub"), listen=f"ipc://{tmp_path}/hub.sock", handler=echo_handler).start()
    node = Peer(Identity.generate("node")).start()
    try:
        node.trust(hub.identity.card, hub.endpoint)  # dials before the hub knows it: refused
        assert not hub.wait_online([node.peer_id], 0.5)
        hub.trust(node.identity.card)  # the operator trusts it afterwards
        assert node.wait_online([hub.peer_id], 10)
        assert node.call(hub.peer_id, Message("t.echo", {"n": 3}), timeout=5).fields == {"n": 3}
    finally:
        node.close()
        hub.close()


def test_a_node_dialing_another_peers_address_warns_once_per_redial(tmp_path, caplog):
    """A stale endpoint (another peer took the port) fails each CURVE handshake, and libzmq
    retries every 100 ms: the log shows the redials the node schedules, not every retry."""
    hub = Peer(Identity.generate("hub")).start()
    other = Peer(Identity.generate("other"), listen=f"ipc://{tmp_path}/other.sock").start()
    node = Peer(Identity.generate("node")).start()

    def refusals():
        return [r for r in caplog.records if "[node] handshake with hub refused" in r.getMessage()]

    try:
        with caplog.at_level(logging.WARNING, logger="meshfl.transport"):
            node.trust(hub.identity.card, other.endpoint)
            assert wait_until(lambda: refusals(), timeout=10)
            assert not node.wait_online([hub.peer_id], 0.7)
            # one warning per redial, and the redials back off from 1 s (a busy machine only
            # spaces them more); libzmq's own retries in between add none
            times = [r.created for r in refusals()]
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(gap >= 0.9 for gap in gaps), [r.getMessage() for r in refusals()]
    finally:
        node.close()
        other.close()
        hub.close()


def test_listening_on_a_taken_address_fails_at_once(tmp_path):
    hub = Peer(Identity.generate("hub"), listen="tcp://127.0.0.1:0").start()
    try:
        with pytest.raises(ConfigError) as info:
            Peer(Identity.generate("second"), listen=hub.endpoint).start()
        assert "cannot listen" in str(info.value)
    finally:
        hub.close()


def test_peers_work_when_their_file_descriptors_run_past_256():
    # The I/O loop polls a wake-up pipe beside its sockets; fds above 256 are not interned ints,
    # so an identity test on the fd broke every peer created after a few hundred open files.
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
    try:
        with PeerMesh(2, handler=echo_handler) as mesh:
            hub, node = mesh.peers
            assert min(hub._wake_r, node._wake_r) > 256
            assert node.call(hub.peer_id, Message("t.echo", {"n": 7}), timeout=10).fields == {"n": 7}
    finally:
        for fd in held:
            os.close(fd)


def test_a_link_that_comes_up_after_a_failed_handshake_stays_up():
    """A proxy that resets the first connection (its own target not up yet), then the hub: the
    redial the failed handshake scheduled must not tear down the link libzmq re-made itself."""
    import queue
    import socket
    import struct

    resetter = socket.create_server(("127.0.0.1", 0))
    port = resetter.getsockname()[1]
    hub_identity = Identity.generate("hub")
    events: queue.SimpleQueue = queue.SimpleQueue()
    node = Peer(Identity.generate("node"), on_link=lambda peer, up: events.put(up), heartbeat=0.2).start()
    hub = None
    try:
        node.trust(hub_identity.card, f"tcp://127.0.0.1:{port}")
        resetter.settimeout(10)
        conn, _ = resetter.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # an RST mid-handshake: a redial is scheduled 1 s later
        failed_at = time.monotonic()
        resetter.close()
        hub = Peer(hub_identity, listen=f"tcp://127.0.0.1:{port}", handler=echo_handler).start()
        hub.trust(node.identity.card)
        assert events.get(timeout=10) is True  # libzmq reconnected by itself
        with pytest.raises(queue.Empty):  # and nothing takes the link down past the redial time
            events.get(timeout=max(0.5, failed_at + 2.0 - time.monotonic()))
        assert node.call(hub.peer_id, Message("t.echo", {"n": 7}), timeout=10).fields == {"n": 7}
    finally:
        node.close()
        if hub is not None:
            hub.close()


declare("t.note")


def test_an_inline_peer_serves_on_its_io_thread_and_keeps_the_order_of_what_it_sends(tmp_path):
    """A handler run inline (as a host's and a researcher's are) answers like a dispatched one;
    what another thread queued for a peer before the handler's reply reaches that peer first."""
    ran_on, order = [], []

    def hub_handler(msg: Message) -> Message | None:
        ran_on.append(threading.current_thread().name)
        if msg.type == "t.boom":
            raise ValueError("secret detail that must not leak")
        # Another thread queues a note for the sender while this handler holds the I/O thread.
        queued = threading.Thread(target=lambda: hub.send(msg.sender, Message("t.note")))
        queued.start()
        queued.join()
        return msg.reply("t.echo", msg.fields)

    def node_handler(msg: Message) -> None:
        order.append(msg.type)  # inline too: notes and replies are seen in the order they came

    hub = Peer(Identity.generate("hub"), listen=f"ipc://{tmp_path}/hub.sock", handler=hub_handler, inline=True).start()
    node = Peer(Identity.generate("node"), handler=node_handler, inline=True).start()
    try:
        hub.trust(node.identity.card)
        node.trust(hub.identity.card, hub.endpoint)
        assert wait_until(lambda: node.is_online(hub.peer_id))
        for n in range(20):
            future = node.request(hub.peer_id, Message("t.echo", {"n": n}), timeout=10)
            future.add_done_callback(lambda f: order.append("reply"))
            assert future.result().fields == {"n": n}
        assert order == ["t.note", "reply"] * 20
        assert set(ran_on) == {f"meshfl-io-{hub.name}"}
        with pytest.raises(RemoteError) as info:
            node.call(hub.peer_id, Message("t.boom"), timeout=10)
        assert info.value.code == "internal" and "secret" not in str(info.value)
    finally:
        node.close()
        hub.close()
