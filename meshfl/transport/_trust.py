"""Who may talk to a peer: the in-memory trust table the ZAP handler consults.

The table maps a peer id to its :class:`~meshfl.crypto.PeerCard` (and, for peers this one dials,
an endpoint) and each card's CURVE link key back to the peer id. Persistent trust lives in the
peer's LMDB store one layer up; this is what the I/O thread reads on every handshake and message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..crypto import PeerCard


@dataclass(frozen=True)
class TrustEntry:
    card: PeerCard
    endpoint: str | None = None


class TrustTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, TrustEntry] = {}
        self._by_link_key: dict[bytes, str] = {}

    def add(self, card: PeerCard, endpoint: str | None = None) -> None:
        with self._lock:
            old = self._by_id.get(card.peer_id)
            if old is not None:
                self._by_link_key.pop(old.card.link_key, None)
            self._by_id[card.peer_id] = TrustEntry(card, endpoint)
            self._by_link_key[card.link_key] = card.peer_id

    def remove(self, peer_id: str) -> bool:
        with self._lock:
            entry = self._by_id.pop(peer_id, None)
            if entry is not None:
                self._by_link_key.pop(entry.card.link_key, None)
            return entry is not None

    def get(self, peer_id: str) -> TrustEntry | None:
        with self._lock:
            return self._by_id.get(peer_id)

    def peer_for_link_key(self, link_key: bytes) -> str | None:
        with self._lock:
            return self._by_link_key.get(bytes(link_key))

    def __contains__(self, peer_id: object) -> bool:
        with self._lock:
            return peer_id in self._by_id

    def entries(self) -> list[TrustEntry]:
        with self._lock:
            return list(self._by_id.values())
