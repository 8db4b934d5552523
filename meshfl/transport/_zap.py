"""ZAP (ZeroMQ Authentication Protocol, RFC 27) for CURVE links: admit only trusted keys.

Without a ZAP handler a CURVE server accepts *any* client key, so every listening peer answers
ZAP requests from its own I/O loop with this pure function. An admitted client's ZAP user id is
its peer id, which the transport later compares with the routing id each message claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


@dataclass(frozen=True)
class ZapDecision:
    reply: list[bytes]
    allowed: bool
    peer_id: str | None
    reason: str
    address: str


def zap_decide(request: list[bytes], peer_for_key: Callable[[bytes], str | None]) -> ZapDecision:
    """Answer one ZAP request; ``peer_for_key`` maps a CURVE public key to a trusted peer id."""
    if len(request) < 6:
        return ZapDecision([], False, None, "malformed ZAP request", "?")
    version, request_id, _domain, address, _identity, mechanism, *credentials = request
    addr = address.decode(errors="replace")

    def reply(ok: bool, text: str, user: str = "") -> list[bytes]:
        code = b"200" if ok else b"400"
        return [version, request_id, code, text.encode(), user.encode(), b""]

    if version != b"1.0":
        return ZapDecision(reply(False, "bad ZAP version"), False, None, "bad ZAP version", addr)
    if mechanism != b"CURVE" or not credentials or len(credentials[0]) != 32:
        reason = f"mechanism {mechanism.decode(errors='replace')} refused: CURVE required"
        return ZapDecision(reply(False, reason), False, None, reason, addr)
    peer_id = peer_for_key(credentials[0])
    if peer_id is None:
        return ZapDecision(reply(False, "key not trusted"), False, None, "key not trusted", addr)
    return ZapDecision(reply(True, "OK", peer_id), True, peer_id, "trusted", addr)
