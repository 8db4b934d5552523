"""The node-to-node overlay over real CURVE peers: sealed, signed, relayed blind, replay-proof."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from meshfl.crypto import open_sealed
from meshfl.errors import CryptoError
from meshfl.overlay import Overlay, OverlayRejected, bundle, header_bytes, unbundle
from meshfl.testing import PeerMesh
from meshfl.wire import Message

SECRET = "the-secret-payload-7f3a"


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        threading.Event().wait(0.01)
    return cond()


class Inbox:
    """What one peer's overlay accepted and rejected."""

    def __init__(self) -> None:
        self.accepted: list[tuple[str, dict]] = []
        self.rejected: list[tuple[str, str]] = []

    def overlay(self, peer, **kw) -> Overlay:
        return Overlay(peer, lambda src, p: self.accepted.append((src, p)),
                       on_reject=lambda src, code, _msg: self.rejected.append((src, code)), **kw)


def _attach(mesh):
    """An overlay and an inbox on every peer of the mesh."""
    inboxes = [Inbox() for _ in mesh.peers]
    return [box.overlay(p) for box, p in zip(inboxes, mesh.peers)], inboxes


def _spy(hub, forward):
    """Route the hub's overlay traffic through ``forward(msg)`` (a relay that may misbehave)."""
    seen: list[Message] = []

    def handler(msg):
        seen.append(msg)
        return forward(msg)

    hub.route("overlay", handler)
    return seen


def test_relayed_message_arrives_and_the_relay_sees_only_ciphertext():
    with PeerMesh(3) as mesh:  # star: a and b have no link to each other, only to the hub
        (hub_ov, a_ov, _), (_, _, b_box) = _attach(mesh)
        hub, a, b = mesh.peers
        seen = _spy(hub, hub_ov.handle)
        a_ov.send(b.peer_id, {"secret": SECRET}, via=hub.peer_id)
        assert wait_until(lambda: b_box.accepted)
        assert b_box.accepted == [(a.peer_id, {"secret": SECRET})]
        (relayed,) = seen
        sealed = relayed.tensors["sealed"].numpy().tobytes()
        assert SECRET.encode() not in sealed and SECRET.encode() not in str(relayed.fields).encode()
        f = relayed.fields
        with pytest.raises(CryptoError):  # the relay holds no key that opens it
            open_sealed(hub.identity, a.identity.card, sealed, header_bytes(f["src"], f["dst"], f["oid"], f["exp"]))


@pytest.mark.parametrize("tamper", ["ciphertext", "dst", "exp", "oid"])
def test_a_relay_that_alters_a_message_is_caught(tamper):
    with PeerMesh(4) as mesh:
        (_, a_ov, _, _), boxes = _attach(mesh)
        hub, a, b, c = mesh.peers
        target = c if tamper == "dst" else b  # "dst": the relay re-addresses b's message to c

        def evil(msg):
            fields, sealed = dict(msg.fields), bytearray(msg.tensors["sealed"].numpy().tobytes())
            if tamper == "ciphertext":
                sealed[-1] ^= 1
            elif tamper == "exp":
                fields["exp"] += 60.0
            elif tamper == "oid":
                fields["oid"] = "0" * 16
            else:
                fields["dst"] = c.peer_id
            hub.send(target.peer_id, Message("overlay", fields, {"sealed": torch.frombuffer(sealed, dtype=torch.uint8)}))

        _spy(hub, evil)
        a_ov.send(b.peer_id, {"secret": SECRET}, via=hub.peer_id)
        box = boxes[mesh.peers.index(target)]
        assert wait_until(lambda: box.rejected)
        assert box.rejected == [(a.peer_id, "bad_signature")]
        assert box.accepted == [] and boxes[2].accepted == []


def test_replayed_message_is_rejected():
    with PeerMesh(3) as mesh:  # star: a and b have no link to each other, only to the hub
        (hub_ov, a_ov, _), (_, _, b_box) = _attach(mesh)
        hub, a, b = mesh.peers

        def twice(msg):
            hub_ov.handle(msg)
            hub.send(b.peer_id, Message("overlay", dict(msg.fields), msg.tensors))

        _spy(hub, twice)
        a_ov.send(b.peer_id, {"n": 1}, via=hub.peer_id)
        assert wait_until(lambda: b_box.rejected)
        assert b_box.accepted == [(a.peer_id, {"n": 1})]
        assert b_box.rejected == [(a.peer_id, "replayed")]


def test_unknown_sender_and_expired_message_are_rejected():
    with PeerMesh(3) as mesh:
        (_, a_ov, _), (_, _, b_box) = _attach(mesh)
        hub, a, b = mesh.peers
        late = Inbox().overlay(a, clock=lambda: time.time() - 3600)  # a's clock an hour behind
        late.send(b.peer_id, {"n": 1}, via=hub.peer_id)
        assert wait_until(lambda: b_box.rejected)
        b.revoke(a.peer_id)  # b no longer trusts a's card
        a_ov.send(b.peer_id, {"n": 2}, via=hub.peer_id)
        assert wait_until(lambda: len(b_box.rejected) == 2)
        assert b_box.rejected == [(a.peer_id, "expired"), (a.peer_id, "untrusted_sender")]
        assert b_box.accepted == []


def test_direct_link_is_used_when_there_is_one():
    with PeerMesh(3, topology="full") as mesh:
        overlays, inboxes = _attach(mesh)
        hub, a, b = mesh.peers
        relayed = _spy(hub, overlays[0].handle)
        assert wait_until(lambda: a.is_online(b.peer_id))
        overlays[1].send(b.peer_id, {"n": 1})  # no relay named: it must go direct
        assert wait_until(lambda: inboxes[2].accepted)
        assert inboxes[2].accepted == [(a.peer_id, {"n": 1})] and relayed == []


def test_a_bundle_of_sealed_messages_carried_in_another_message_keeps_every_check():
    """Secure aggregation carries shares in bulk inside its own messages: the carrier (the
    researcher) still sees ciphertext only, and tampering, replays and misdelivery are refused."""
    with PeerMesh(3) as mesh:
        (hub_ov, a_ov, b_ov), (_, _, b_box) = _attach(mesh)
        hub, a, b = mesh.peers
        sealed = [a_ov.seal(b.peer_id, {"n": i, "secret": SECRET}) for i in range(3)]
        headers, tensors = bundle(sealed, "share")
        carried = Message("carrier", {"shares": headers}, tensors)  # what the hub passes on, unread
        assert all(SECRET.encode() not in t.numpy().tobytes() for t in carried.tensors.values())
        forged = carried.tensors["share.1"].clone()
        forged[-1] ^= 1
        envelopes = unbundle(headers, {**carried.tensors, "share.1": forged}, "share")
        outcomes = []
        for envelope in envelopes + envelopes[:1]:  # the first once more: a replay
            try:
                b_ov.accept(envelope)
                outcomes.append("ok")
            except OverlayRejected as exc:
                outcomes.append(exc.code)
        assert outcomes == ["ok", "bad_signature", "ok", "replayed"]
        assert [p["n"] for _, p in b_box.accepted] == [0, 2]
        assert b_box.rejected == [(a.peer_id, "bad_signature"), (a.peer_id, "replayed")]
        with pytest.raises(OverlayRejected) as info:  # addressed to b: nobody else opens it
            hub_ov.accept(unbundle(headers, tensors, "share")[2])
        assert info.value.code == "bad_overlay"
        with pytest.raises(OverlayRejected):
            unbundle([["only", "three", "fields"]], tensors, "share")
