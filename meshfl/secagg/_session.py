"""The two sides of one secure-aggregation round, as pure objects (no sockets, no threads).

A node's :class:`NodeSession` holds its round secrets: an X25519 round key (pairwise masks) and a
self-mask seed. Both are split into Shamir shares (threshold t) for the other participants at
set-up; each share also carries its sender's round public key, so the key comes sealed and signed
by its owner, end to end. The members (participants whose round keys reached the researcher) come
in the researcher's key list, and the node masks with exactly them, each key checked against the
one its owner's share carried. Each holder reveals shares to the researcher for one of two
purposes: the self-mask seed of a member that *sent* its masked vector, or the round key of a
member that *dropped out*. A node reveals only once, for one partition of the members into
survivors and dropped, and the threshold is a majority, so the researcher can never get both
secrets of one node (which would unmask that node's vector).

The researcher's :func:`unmask` takes the revealed shares, rebuilds those secrets and strips the
leftover masks from the sum of the survivors' vectors.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Iterable, Mapping

import numpy as np
from nacl.public import PrivateKey

from ..crypto import PRG_ALGORITHMS, SEED_BYTES, Identity, PeerCard, shamir_combine, shamir_split
from ..errors import CryptoError
from ._fixed import SecAggError
from ._masks import Masker, pair_seed, pair_sign


def check_threshold(threshold: int, participants: int) -> int:
    """A threshold t with ``participants / 2 < t <= participants`` and ``t >= 2``.

    A majority, so that no two disjoint groups of share holders can each reach t: a researcher
    that told some nodes "x survived" and others "x dropped" still cannot rebuild both of x's
    secrets. At least 2, so that an unmasked sum never holds a single node's update.
    """
    if participants < 2:
        raise SecAggError("secure aggregation needs at least 2 nodes: one node's sum is its update",
                          code="secagg_not_enough")
    low = max(2, participants // 2 + 1)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not low <= threshold <= participants:
        raise SecAggError(
            f"a secure-aggregation threshold is {low}..{participants} for {participants} participants "
            f"(a majority, at least 2), not {threshold!r}",
            code="secagg_protocol",
        )
    return threshold


def _hex(value, what: str, size: int | None = None) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raise SecAggError(f"{what} is not hex", code="secagg_protocol") from None
    if size is not None and len(raw) != size:
        raise SecAggError(f"{what} must be {size} bytes", code="secagg_protocol")
    return raw


class NodeSession:
    """One node's secrets and view of one secure-aggregation round."""

    def __init__(self, identity: Identity, session: str, researcher: str, participants: Iterable[str],
                 threshold: int, prg: str) -> None:
        self.me = identity.peer_id
        self.session = session
        self.researcher = researcher
        self.participants = frozenset(participants)
        if self.me not in self.participants:
            raise SecAggError("this node is not among the round's participants", code="secagg_protocol")
        self.threshold = check_threshold(threshold, len(self.participants))
        if prg not in PRG_ALGORITHMS:
            raise SecAggError(f"mask PRG {prg!r} is not available here (have {PRG_ALGORITHMS})", code="secagg_protocol")
        self.prg = prg
        self.created = time.monotonic()
        self._secret = PrivateKey.generate()
        self._self_seed = os.urandom(SEED_BYTES)
        self.public = bytes(self._secret.public_key)
        self.keys: dict[str, bytes] = {}  # members' checked round keys (from secagg.keys)
        self.held: dict[str, tuple[int, bytes, bytes]] = {}  # owner -> (x, round-key share, self-seed share)
        self._sealed_keys: dict[str, bytes] = {}  # owner -> the round key its sealed share carried
        self.members: tuple[str, ...] | None = None  # who this node masked with
        self.revealed: tuple[str, ...] | None = None  # the survivors it revealed for
        self._keys_known = threading.Event()  # set_keys succeeded, or the key list was refused
        self._keys_error: SecAggError | None = None

    def key_fields(self) -> dict:
        """The round key for the researcher to pass on (the members check it against the one
        this node's sealed share gave them)."""
        return {"public": self.public.hex()}

    def distribute(self, card_of: Callable[[str], PeerCard | None]) -> list[tuple[str, dict]]:
        """Split this node's secrets; one share payload per other participant, to send sealed."""
        if self.held.get(self.me):
            raise SecAggError("this round's shares were already distributed", code="secagg_conflict")
        untrusted = sorted(pid for pid in self.participants if pid != self.me and card_of(pid) is None)
        if untrusted:
            raise SecAggError(f"this node does not trust participants {untrusted}", code="secagg_untrusted_peer",
                              details={"peers": untrusted})
        order = sorted(self.participants)
        key_shares = shamir_split(bytes(self._secret), len(order), self.threshold)
        seed_shares = shamir_split(self._self_seed, len(order), self.threshold)
        out = []
        for pid, (x, key_share), (_, seed_share) in zip(order, key_shares, seed_shares):
            if pid == self.me:
                self.held[pid] = (x, key_share, seed_share)
            else:
                out.append((pid, {"type": "secagg.share", "session": self.session, "x": x,
                                  "s": key_share.hex(), "b": seed_share.hex(), "public": self.public.hex()}))
        return out

    def set_keys(self, keys: Mapping[str, str], card_of: Callable[[str], PeerCard | None]) -> None:
        """Take the members' round keys (the researcher passes them on); each must be the key its
        owner's sealed share carried, so that no one on the way can swap it.

        The members are the participants whose keys the researcher got: this node masks with them.
        An empty list means the researcher called the round off. Either way :meth:`wait_keys`
        returns (or raises) from now on.
        """
        if self._keys_known.is_set():
            raise SecAggError("the members' keys of this round came already", code="secagg_conflict")
        try:
            self._set_keys(keys, card_of)
        except SecAggError as exc:
            self._keys_error = exc
            raise
        finally:
            self._keys_known.set()

    def call_off(self, reason: str) -> None:
        """End the wait for the keys (the experiment was cancelled): masking fails with ``reason``."""
        if not self._keys_known.is_set():
            self._keys_error = SecAggError(reason, code="cancelled")
            self._keys_known.set()

    def wait_keys(self, timeout: float) -> None:
        """Block until the members' keys are in (the task trains meanwhile); raise if they were
        refused or did not come in time."""
        if not self._keys_known.wait(timeout):
            raise SecAggError(f"the members' round keys did not arrive within {timeout:g} s", code="secagg_protocol")
        if self._keys_error is not None:
            raise SecAggError(self._keys_error.message, code=self._keys_error.code)

    def _set_keys(self, keys: Mapping[str, str], card_of: Callable[[str], PeerCard | None]) -> None:
        if isinstance(keys, Mapping) and not keys:
            raise SecAggError("the researcher called this secure round off", code="secagg_not_enough")
        if not isinstance(keys, Mapping) or not set(keys) <= self.participants or self.me not in keys:
            raise SecAggError("the key list must name participants, this node among them", code="secagg_protocol")
        if len(keys) < self.threshold:
            raise SecAggError(f"{len(keys)} members cannot meet threshold {self.threshold}", code="secagg_not_enough")
        checked = {}
        for pid, entry in keys.items():
            public = _hex(entry, "a round key", 32)
            if pid == self.me:
                if public != self.public:
                    raise SecAggError("the researcher passed on another key for this node", code="secagg_protocol")
            elif card_of(pid) is None:
                raise SecAggError(f"this node does not trust member {pid}", code="secagg_untrusted_peer",
                                  details={"peers": [pid]})
            elif pid not in self._sealed_keys:
                raise SecAggError(f"no share from member {pid} reached this node: its round key is unchecked",
                                  code="secagg_protocol")
            elif public != self._sealed_keys[pid]:
                raise SecAggError(f"the round key of {pid} is not the one its sealed share carried",
                                  code="secagg_protocol")
            checked[pid] = public
        self.keys = checked

    def receive_share(self, owner: str, payload: Mapping) -> None:
        """Keep ``owner``'s shares and its round key (they come, sealed by ``owner``, with the key
        list)."""
        if owner not in self.participants or owner == self.me:
            raise SecAggError(f"{owner} is not another participant of {self.session}", code="secagg_protocol")
        if owner in self.held:
            raise SecAggError(f"{owner} already sent its shares", code="secagg_conflict")
        x = payload.get("x")
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= len(self.participants):
            raise SecAggError("a share index is 1..participants", code="secagg_protocol")
        public = _hex(payload.get("public"), "a round key", 32)
        self.held[owner] = (x, _hex(payload.get("s"), "a share"), _hex(payload.get("b"), "a share"))
        self._sealed_keys[owner] = public

    def mask(self, vector: np.ndarray, fill: Callable[[np.ndarray, int], None], boundary: int) -> None:
        """Make this node's vector in ``vector`` (uint8; its 64-bit section from byte ``boundary``)
        with ``fill(block, offset)``, a block at a time, adding its self mask and its pairwise masks
        with every member to each block. Once per round: asking again is refused (two vectors
        under one mask would leak their difference)."""
        if not self.keys:
            raise SecAggError("masking before the members' keys arrived", code="secagg_protocol")
        if self.members is not None:
            raise SecAggError("this node already masked its update for this round", code="secagg_conflict")
        members = tuple(sorted(self.keys))
        secret = bytes(self._secret)
        masks = [(self._self_seed, +1)] + [
            (pair_seed(secret, self.keys[other], self.session, self.me, other), pair_sign(self.me, other))
            for other in members if other != self.me
        ]
        self.members = members
        Masker(vector.size, boundary, self.prg).apply(vector, masks, fill)

    def reveal(self, survivors: Iterable[str], dropped: Iterable[str]) -> dict:
        """Shares for unmasking: self-seed shares of survivors, round-key shares of the dropped.

        Refused unless survivors and dropped split this node's masking members exactly, this node
        survived, at least t survived, and it never revealed for another split.
        """
        s, d = set(survivors), set(dropped)
        if self.members is None:
            raise SecAggError("this node sent no masked update in this round", code="secagg_protocol")
        if s & d or s | d != set(self.members) or self.me not in s:
            raise SecAggError("survivors and dropped must split the masking members", code="secagg_conflict")
        if len(s) < self.threshold:
            raise SecAggError(f"{len(s)} survivors are fewer than threshold {self.threshold}",
                              code="secagg_not_enough")
        key = tuple(sorted(s))
        if self.revealed is not None and self.revealed != key:
            raise SecAggError("already revealed for another set of survivors", code="secagg_conflict")
        self.revealed = key
        return {
            "b": {pid: [self.held[pid][0], self.held[pid][2].hex()] for pid in sorted(s) if pid in self.held},
            "s": {pid: [self.held[pid][0], self.held[pid][1].hex()] for pid in sorted(d) if pid in self.held},
        }


class NodeSessions:
    """A node's live sessions (memory only: a restarted node drops out of its open rounds)."""

    MAX_SESSIONS = 64
    MAX_AGE_S = 6 * 3600.0

    def __init__(self) -> None:
        self._sessions: dict[str, NodeSession] = {}
        self._lock = threading.Lock()

    def open(self, session: NodeSession) -> None:
        with self._lock:
            now = time.monotonic()
            self._sessions = {k: v for k, v in self._sessions.items() if now - v.created < self.MAX_AGE_S}
            if session.session in self._sessions:
                raise SecAggError(f"session {session.session} exists already", code="secagg_conflict")
            while len(self._sessions) >= self.MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session.session] = session

    def get(self, session: str, researcher: str | None = None) -> NodeSession:
        with self._lock:
            found = self._sessions.get(session)
        if found is None or (researcher is not None and found.researcher != researcher):
            raise SecAggError(f"no secure-aggregation session {session!r} here (node restarted?)",
                              code="secagg_session_lost")
        return found


def unmask(total: np.ndarray, boundary: int, session: str, keys: Mapping[str, bytes], survivors: Iterable[str],
           dropped: Iterable[str], reveals: list[Mapping], threshold: int, prg: str) -> None:
    """Remove the survivors' self masks and the dropped members' pairwise masks from ``total``."""
    survivors, dropped = sorted(survivors), sorted(dropped)

    def rebuild(owner: str, kind: str) -> bytes:
        shares = []
        for reveal in reveals:
            entry = reveal.get(kind, {}).get(owner) if isinstance(reveal.get(kind), Mapping) else None
            if entry is None:
                continue
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)):
                raise SecAggError(f"a malformed share of {owner}", code="secagg_protocol")
            shares.append((entry[0], _hex(entry[1], "a share")))
        if len(shares) < threshold:
            raise SecAggError(f"{len(shares)} shares of {owner}'s secret arrived, {threshold} needed",
                              code="secagg_not_enough")
        try:
            return shamir_combine(shares)
        except CryptoError as exc:
            raise SecAggError(f"shares of {owner}'s secret do not combine: {exc.message}", code="secagg_protocol") from None

    masks = [(rebuild(owner, "b"), -1) for owner in survivors]
    for owner in dropped:
        secret = rebuild(owner, "s")
        if len(secret) != 32 or bytes(PrivateKey(secret).public_key) != keys[owner]:
            raise SecAggError(f"the rebuilt round key of {owner} does not match its public key", code="secagg_protocol")
        # undo what each survivor added for the pair (survivor, owner)
        masks += [(pair_seed(secret, keys[other], session, owner, other), -pair_sign(other, owner)) for other in survivors]
    Masker(total.size, boundary, prg).apply(total, masks)
