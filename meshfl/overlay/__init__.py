"""The node-to-node overlay: end-to-end sealed messages, carried directly or by one relay.

A node usually has a link only to its researcher(s), yet secure aggregation needs nodes to talk to
each other. An overlay message is sealed for its recipient (NaCl Box) and signed by its sender
(:func:`meshfl.crypto.seal`); its routing header ``src, dst, oid, exp`` travels in the clear and is
covered by the signature. It goes straight to the recipient over a live link when there is one (a
node may also listen), else to a relay, by default the researcher. A relay forwards it unchanged
over its own link to the recipient: it sees the header and ciphertext only, and anything it alters
breaks the signature.

The recipient rejects, and reports through ``on_reject`` (the node audits it), a message whose
sender it does not trust, whose signature or box fails, whose id it has seen already (replay), or
whose expiry has passed. Ids are remembered until their expiry, and an expiry more than
:data:`MAX_TTL` ahead is refused, so that memory stays bounded.

Only one hop: a relay forwards only messages that came straight from their source, so no message
can loop. A protocol may also carry sealed messages in bulk inside its own messages
(:func:`bundle`, :func:`unbundle`); :meth:`Overlay.accept` checks each as if it came alone.

Not durable: the overlay carries short-lived protocol messages (secure-aggregation shares) whose
senders give up on a round rather than queue for it; the replay memory is lost with a restart,
which the short expiry bounds.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import orjson
import torch

from ..crypto import Identity, PeerCard, open_sealed, seal
from ..errors import CryptoError, MeshflError, NotTrusted, PeerUnavailable
from ..transport import Peer
from ..wire import Message, declare, new_id

declare("overlay", required={"src": "str", "dst": "str", "oid": "str", "exp": "float"}, tensors=True)

DEFAULT_TTL = 120.0
MAX_TTL = 600.0
_HEADER_CONTEXT = "meshfl.overlay.v1"

log = logging.getLogger("meshfl.overlay")


class OverlayRejected(MeshflError):
    """An overlay message the recipient will not accept.

    Codes: ``untrusted_sender``, ``bad_signature``, ``bad_box``, ``replayed``, ``expired``,
    ``bad_overlay`` (malformed), ``unreachable`` (a relay has no link to the recipient).
    """

    code = "overlay_rejected"


def header_bytes(src: str, dst: str, oid: str, exp: float) -> bytes:
    """The signed routing header: what a relay can read but cannot change."""
    return orjson.dumps([_HEADER_CONTEXT, src, dst, oid, exp])


class Overlay:
    """Sealed node-to-node messaging on top of a :class:`~meshfl.transport.Peer`.

    ``on_message(src, payload)`` receives each accepted payload (a JSON object); it runs on the
    peer's dispatcher thread. ``on_reject(src, code, message)`` hears every refusal. Receiving
    happens on that one thread only, so the replay memory needs no lock; :meth:`send` is safe
    from any thread.
    """

    def __init__(
        self,
        peer: Peer,
        on_message: Callable[[str, dict], None],
        *,
        on_reject: Callable[[str, str, str], None] | None = None,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be in (0, {MAX_TTL}]")
        self.peer = peer
        self._on_message = on_message
        self._on_reject = on_reject
        self._ttl = ttl
        self._clock = clock
        self._seen: dict[tuple[str, str], float] = {}  # (src, oid) -> expiry
        self._next_prune = 0.0
        peer.route("overlay", self.handle)

    # ------------------------------------------------------------------ sending
    def seal(self, dest: str, payload: dict) -> Message:
        """``payload`` sealed for ``dest`` as an ``overlay`` message, not sent: :meth:`send` sends
        one; a protocol may also carry several in bulk (:func:`bundle`)."""
        entry = self.peer.trust_table.get(dest)
        if entry is None:
            raise NotTrusted(f"cannot seal for {dest}: its card is not trusted here")
        return seal_message(self.peer.identity, entry.card, payload, self._clock() + self._ttl)

    def send(self, dest: str, payload: dict, via: str | None = None) -> None:
        """Seal ``payload`` for ``dest`` and send it: directly if linked, else through ``via``."""
        msg = self.seal(dest, payload)
        hop = dest if self.peer.is_online(dest) else via
        if hop is None:
            raise PeerUnavailable(f"no link to {dest} and no relay given")
        self.peer.send(hop, msg)

    # ------------------------------------------------------------------ receiving
    def handle(self, msg: Message) -> None:
        """The peer's handler for ``overlay`` messages: open what is ours, relay the rest."""
        if msg.fields["dst"] != self.peer.peer_id:
            return self._relay(msg)
        self.accept(msg)
        return None

    def accept(self, msg: Message) -> None:
        """Open an overlay message addressed to us, however it came, and pass its payload on;
        :class:`OverlayRejected` (reported to ``on_reject`` first) if it does not check out."""
        f = msg.fields
        try:
            if f["dst"] != self.peer.peer_id:
                raise OverlayRejected(f"message {f['oid']} is for {f['dst']}, not us", code="bad_overlay")
            payload = self._open(msg)
        except OverlayRejected as exc:
            log.warning("[%s] overlay message from %s rejected: %s", self.peer.name, f["src"], exc)
            if self._on_reject is not None:
                self._on_reject(f["src"], exc.code, exc.message)
            raise
        self._on_message(f["src"], payload)

    def _relay(self, msg: Message) -> None:
        f = msg.fields
        if msg.sender != f["src"]:
            raise OverlayRejected("overlay messages take at most one relay", code="unreachable")
        if not self.peer.is_online(f["dst"]):
            raise OverlayRejected(f"{self.peer.name} has no link to {f['dst']}", code="unreachable")
        self.peer.send(f["dst"], Message("overlay", dict(f), msg.tensors))  # frames forwarded, not copied
        return None

    def _open(self, msg: Message) -> dict:
        f = msg.fields
        src, oid, exp = f["src"], f["oid"], float(f["exp"])
        now = self._clock()
        entry = self.peer.trust_table.get(src)
        payload = open_message(self.peer.identity, entry.card if entry is not None else None, msg, now)
        if (src, oid) in self._seen:
            raise OverlayRejected(f"message {oid} from {entry.card.name} was seen before", code="replayed")
        self._seen[(src, oid)] = exp  # remembered only once authentic: a forgery cannot burn a real id
        if now >= self._next_prune:
            self._seen = {k: e for k, e in self._seen.items() if e >= now}
            self._next_prune = now + 10.0
        return payload


def seal_message(identity: Identity, card: PeerCard, payload: dict, expires: float) -> Message:
    """``payload`` sealed from ``identity`` for ``card`` as an ``overlay`` message (what
    :meth:`Overlay.seal` makes; also for a participant with no Peer: a hosted model's client)."""
    src, dest, oid, exp = identity.peer_id, card.peer_id, new_id(), round(expires, 3)
    sealed = seal(identity, card, orjson.dumps(payload), header_bytes(src, dest, oid, exp))
    return Message(
        "overlay",
        {"src": src, "dst": dest, "oid": oid, "exp": exp},
        {"sealed": torch.frombuffer(bytearray(sealed), dtype=torch.uint8)},
    )


def open_message(identity: Identity, card: PeerCard | None, msg: Message, now: float) -> dict:
    """The payload of an overlay message for ``identity`` from ``card`` (None: its sender is not
    trusted), checked: addressee, expiry, signature and box. Replays are the caller's to catch
    (:class:`Overlay` remembers ids; a secure-aggregation session takes one share per sender)."""
    f = msg.fields
    src, oid, exp = f["src"], f["oid"], float(f["exp"])
    if f["dst"] != identity.peer_id:
        raise OverlayRejected(f"message {oid} is for {f['dst']}, not us", code="bad_overlay")
    if exp < now:
        raise OverlayRejected(f"message {oid} expired {now - exp:.1f}s ago", code="expired")
    if exp > now + MAX_TTL:
        raise OverlayRejected(f"message {oid} claims an expiry beyond {MAX_TTL:g}s", code="bad_overlay")
    if card is None or card.peer_id != src:
        raise OverlayRejected(f"sender {src} is not trusted here", code="untrusted_sender")
    sealed = msg.tensors.get("sealed") if "sealed" in msg.tensors else None
    if sealed is None or sealed.dtype != torch.uint8 or sealed.dim() != 1 or len(msg.tensors) != 1:
        raise OverlayRejected("an overlay message carries one uint8 tensor 'sealed'", code="bad_overlay")
    try:
        plaintext = open_sealed(identity, card, sealed.numpy().tobytes(), header_bytes(src, f["dst"], oid, f["exp"]))
    except CryptoError as exc:
        raise OverlayRejected(f"message {oid} from {card.name}: {exc.message}", code=exc.code) from None
    try:
        payload = orjson.loads(plaintext)
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise OverlayRejected(f"message {oid} from {card.name} is not a JSON object", code="bad_overlay")
    return payload


_HEADER_KEYS = ("src", "dst", "oid", "exp")


def bundle(messages: list[Message], prefix: str) -> tuple[list[list], dict[str, torch.Tensor]]:
    """Sealed overlay messages as one field (their headers) and tensors ``prefix.i`` (their
    sealed bytes), to ride inside another message: a relay carrying many at once."""
    headers = [[m.fields[k] for k in _HEADER_KEYS] for m in messages]
    return headers, {f"{prefix}.{i}": m.tensors["sealed"] for i, m in enumerate(messages)}


def unbundle(headers, tensors, prefix: str) -> list[Message]:
    """The overlay messages of :func:`bundle` back (shape only: :meth:`Overlay.accept` checks them)."""
    if not isinstance(headers, list):
        raise OverlayRejected("a bundle's headers are a list", code="bad_overlay")
    out = []
    for i, header in enumerate(headers):
        sealed = tensors.get(f"{prefix}.{i}") if f"{prefix}.{i}" in tensors else None
        if not (isinstance(header, list) and len(header) == 4 and all(isinstance(v, str) for v in header[:3])
                and isinstance(header[3], (int, float)) and not isinstance(header[3], bool) and sealed is not None):
            raise OverlayRejected(f"bundled overlay message {i} is malformed", code="bad_overlay")
        out.append(Message("overlay", dict(zip(_HEADER_KEYS, header)), {"sealed": sealed}))
    return out


__all__ = ["DEFAULT_TTL", "MAX_TTL", "Overlay", "OverlayRejected", "bundle", "header_bytes", "open_message",
           "seal_message", "unbundle"]
