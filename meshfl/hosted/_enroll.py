"""Enrolling many clients: bulk cards, and tokens a client redeems itself.

Only enrolled keys get through the host's CURVE handshake (its ZAP handler admits trusted keys
only), so an unenrolled key gets nothing at all from the model endpoint. A client with a token
dials a separate enrollment endpoint instead: a CURVE server (the client authenticates the host
by its card, the link is encrypted) that admits any key but understands one message,
``hosted.enroll`` (token + the client's signed card), and answers ``hosted.enrolled`` or a coded
error. A token is ``<id>.<secret>``; the host stores only the secret's SHA-256, its uses left
and expiry; redeeming it, enrolling the card and the audit record are one transaction. Revoking
a token stops further uses; clients it enrolled stay enrolled until revoked themselves, and a
revoked key cannot enroll itself again with a token (``key_revoked``): only the operator can.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time

import zmq

from ..crypto import Identity, PeerCard
from ..errors import CryptoError, HostedError, MeshflError, RemoteError, RequestTimeout, WireError
from ..home import Home
from ..wire import Limits, Message, decode, encode, error_message, peek_id
from ..wire import declare
from ..transport._zap import ZAP_ENDPOINT
from ._state import CLIENTS, TOKENS

log = logging.getLogger("meshfl.hosted")

declare("hosted.enroll", required={"token": "str", "card": "str"})
declare("hosted.enrolled", required={"peer_id": "str", "new": "bool"})

#: Enrollment messages are small: a token and a card.
ENROLL_LIMITS = Limits(max_envelope_bytes=4096, max_message_bytes=0, max_frame_bytes=8192, max_frames=0,
                       max_tensors=0)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(home: Home, uses: int = 1, expires_in: float | None = None, label: str = "") -> str:
    """A new enrollment token good for ``uses`` clients (and ``expires_in`` seconds); shown once."""
    if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
        raise HostedError("a token's uses must be an integer >= 1", code="bad_token")
    tid, secret = os.urandom(4).hex(), os.urandom(16).hex()
    record = {"id": tid, "secret_sha256": _digest(secret), "uses_left": uses, "uses": 0, "label": label,
              "created": time.time(), "expires": time.time() + expires_in if expires_in else None, "revoked": False}

    def write(tx) -> None:
        tx.put(TOKENS, tid, record)
        home.audit.append("hosted.token.create", token=tid, uses=uses, expires=record["expires"], label=label)

    home.store.atomic(write)
    return f"{tid}.{secret}"


def revoke_token(home: Home, tid: str) -> bool:
    def write(tx) -> bool:
        rec = tx.get(TOKENS, tid)
        if rec is None or rec["revoked"]:
            return False
        tx.put(TOKENS, tid, {**rec, "revoked": True})
        home.audit.append("hosted.token.revoke", token=tid)
        return True

    return home.store.atomic(write)


def tokens(home: Home) -> list[dict]:
    """Every token's record, without its secret's hash."""
    rows = home.store.read(lambda tx: tx.items(TOKENS))
    return [{k: v for k, v in rec.items() if k != "secret_sha256"} for _, rec in rows]


def redeem(home: Home, token: str, card: PeerCard) -> bool:
    """Spend one use of ``token`` on enrolling ``card``; True if the card is newly enrolled."""
    from ._host import enroll_in

    tid, _, secret = token.partition(".")

    def write(tx) -> bool:
        rec = tx.get(TOKENS, tid) if tid else None
        if rec is None or not hmac.compare_digest(rec["secret_sha256"], _digest(secret)):
            raise HostedError("unknown enrollment token", code="bad_token")
        if rec["revoked"]:
            raise HostedError("this enrollment token was revoked", code="token_revoked")
        if rec["expires"] is not None and time.time() > rec["expires"]:
            raise HostedError("this enrollment token expired", code="token_expired")
        if rec["uses_left"] <= 0:
            raise HostedError("this enrollment token has no uses left", code="token_used_up")
        if (tx.get(CLIENTS, card.peer_id) or {}).get("revoked"):
            raise HostedError("this key was revoked: only the host's operator can enroll it again", code="key_revoked")
        tx.put(TOKENS, tid, {**rec, "uses_left": rec["uses_left"] - 1, "uses": rec["uses"] + 1})
        return enroll_in(tx, home, [card], f"token:{tid}") > 0

    return home.store.atomic(write)


class EnrollServer:
    """The enrollment endpoint: its own context, so the host's ZAP handler (trusted keys only)
    does not guard it. Its own ZAP handler admits any CURVE key and names the connection by
    it, so a card is enrolled only by whoever holds its link key; its one message is checked
    against the token table."""

    def __init__(self, host, listen: str) -> None:
        self.host = host
        self._ctx = zmq.Context(io_threads=1)
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.zap_domain = b"meshfl.enroll"
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, ENROLL_LIMITS.max_frame_bytes)
        sock.curve_server = True
        sock.curve_secretkey = host.home.identity.link_secret_z85
        sock.curve_publickey = host.home.identity.link_public_z85
        sock.bind(listen)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="meshfl-enroll", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(0)
        self._zap.close(0)
        self._ctx.term()

    def _answer_zap(self) -> None:
        version, request_id, *_rest = request = self._zap.recv_multipart()
        ok = len(request) >= 7 and request[5] == b"CURVE" and len(request[6]) == 32
        user = request[6].hex() if ok else ""
        self._zap.send_multipart([version, request_id, b"200" if ok else b"400", b"OK" if ok else b"CURVE only",
                                  user.encode(), b""])

    def _main(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._zap, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(100))
            if self._zap in events:
                self._answer_zap()
            if self._sock not in events:
                continue
            frames = self._sock.recv_multipart(copy=False)
            route, body = frames[0].bytes, frames[1:]
            try:
                msg = decode(body, ENROLL_LIMITS)
                if msg.type != "hosted.enroll":
                    raise HostedError("the enrollment endpoint takes only hosted.enroll", code="unknown_type")
                card = PeerCard.from_text(msg.fields["card"])  # verifies its signature
                if body[0].get("User-Id") != card.link_key.hex():
                    raise HostedError("the card's link key is not the key of this connection", code="bad_card")
                new = self.host.redeem(msg.fields["token"], card)
                reply = msg.reply("hosted.enrolled", {"peer_id": card.peer_id, "new": new})
            except (MeshflError, CryptoError) as exc:
                log.warning("[%s] enrollment refused: %s", self.host.name, exc)
                reply = error_message(exc.code, exc.message, peek_id(body[0].buffer) if body else None)
            except Exception:
                log.exception("[%s] enrollment failed", self.host.name)
                reply = error_message("internal", "enrollment failed", None)
            reply.sender = self.host.peer.peer_id
            try:
                self._sock.send_multipart([route, *encode(reply)], flags=zmq.DONTWAIT)
            except zmq.ZMQError:
                pass


def enroll(endpoint: str, host_card: PeerCard, token: str, identity: Identity, *, timeout: float = 10.0,
           context: zmq.Context | None = None) -> dict:
    """Redeem ``token`` at a host's enrollment endpoint for ``identity``'s card."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey = identity.link_secret_z85
    sock.curve_publickey = identity.link_public_z85
    sock.curve_serverkey = host_card.link_key_z85
    sock.connect(endpoint)
    try:
        msg = Message("hosted.enroll", {"token": token, "card": identity.card.to_text()}, sender=identity.peer_id)
        sock.send_multipart(encode(msg))
        if not sock.poll(timeout * 1000):
            raise RequestTimeout("no answer from the enrollment endpoint in time")
        try:
            reply = decode(sock.recv_multipart(), ENROLL_LIMITS)
        except WireError as exc:
            raise HostedError(f"bad answer from the enrollment endpoint: {exc.message}", code="bad_reply") from None
        if reply.type == "error":
            raise RemoteError.from_wire(reply.fields, host_card.name)
        return reply.fields
    finally:
        sock.close(0)
