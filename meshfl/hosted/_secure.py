"""Secure cycles: the host plays the researcher's part of a secure round (:mod:`meshfl.secagg`).

Light clients have no overlay, so the host relays the set-up; the shares it relays are sealed
end to end between clients (NaCl box, signed by their sender, :func:`meshfl.overlay.seal_message`),
so it sees only ciphertext, and it sums masked vectors it cannot read. A cycle goes through
:data:`PHASES`, each request parked until its step is done (docs/protocol.md, "Secure cycles"):

    accepting  clients ask (``hosted.request``) and say they are ready (``hosted.setup``); the
               roster is fixed at ``max_clients`` ready, or at the set-up deadline with at least
               ``min_clients`` (else the wait is extended and slots of clients not ready freed):
               ``hosted.roster`` gives each the session, the members' cards, a majority
               threshold (:func:`~meshfl.secagg.check_threshold`) and the fixed-point encoding;
    keys       each sends its round key and its shares sealed to every other member
               (``hosted.key``); once all did, or at the deadline, those are the members and each
               gets their keys and the shares sealed to it (``hosted.keys``);
    training   members pull, train and push the masked vector (``hosted.diff``), added to a
               :class:`~meshfl.secagg.MaskedSum`, until all pushed or the cycle deadline;
    reveal     the members that pushed are the survivors: each learns who survived and who
               dropped (``hosted.reveal`` -> ``hosted.survivors``) and reveals shares
               (``hosted.shares``); from ``threshold`` shares of each secret the host unmasks,
               decodes the sample-weighted mean and publishes the next version.

Each client's :class:`~meshfl.secagg.NodeSession` reveals once, for one split of its members, and
the threshold is a majority, so the host can never rebuild both secrets of one client: it learns
the survivors' sum only. Fewer members, survivors or reveals than the threshold fail the cycle
cleanly: parked clients get the coded error (``secagg_not_enough``), the model keeps its version
and a new cycle opens. Nothing of a secure cycle is written before its version (masked vectors are
useless without the reveal), so a host restarted mid-cycle abandons it and opens a new one.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Mapping

import numpy as np
import torch

from ..crypto import DEFAULT_PRG, Identity, PeerCard
from ..errors import HostedError
from ..overlay import DEFAULT_TTL, MAX_TTL, OverlayRejected, bundle, open_message, seal_message, unbundle
from ..secagg import (DEFAULT_CLIP, METRIC_SLOTS, VECTOR, Encoding, MaskedSum, NodeSession, SecAggError,
                      UpdateEncoder, add_mean, check_threshold, decode_sum, enough_shares, frac_bits_for,
                      secure_metrics, unmask)
from ..wire import Message, error_message
from ._state import CYCLES

log = logging.getLogger("meshfl.hosted")

PHASES = ("accepting", "keys", "training", "reveal")
MAX_BOUND = 1 << 40  # a client's sample bound
TYPES = ("hosted.setup", "hosted.key", "hosted.reveal", "hosted.shares")


class SecureCycle:
    """What the host may know of one secure cycle: who is in it, their round keys, the masked sum."""

    def __init__(self, name: str, cycle: int, config, now: float) -> None:
        self.name, self.cycle, self.config = name, cycle, config
        self.session = f"hosted.{name}.c{cycle}.{os.urandom(6).hex()}"
        self.phase = "accepting"
        self.deadline = now + config.setup_timeout
        self.ready: dict[str, tuple[str, int]] = {}  # client -> (ticket, bound on its samples)
        self.parked: dict[str, Message] = {}  # the requests waiting for this phase's end
        self.roster: list[str] = []
        self.threshold = 0
        self.encoding: Encoding | None = None
        self.fields: dict = {}  # the encoding as the clients get it
        self.public: dict[str, str] = {}  # member -> its round key (hex), as it sent it
        self.sealed: dict[str, list[Message]] = {}  # member -> the shares it sealed to the others
        self.members: list[str] = []
        self.sum: MaskedSum | None = None
        self.pushed: dict[str, str] = {}  # member -> its diff id
        self.names: dict[str, list] = {}  # member -> the metric names in its vector's slots
        self.survivors: list[str] = []
        self.dropped: list[str] = []
        self.reveals: dict[str, dict] = {}

    def status(self) -> dict:
        return {"session": self.session, "phase": self.phase, "ready": len(self.ready), "roster": len(self.roster),
                "members": len(self.members), "pushed": len(self.pushed), "revealed": len(self.reveals),
                "threshold": self.threshold, "phase_deadline_in": round(max(0.0, self.deadline - time.time()), 3)}


class SecureHost:
    """The host's handling of secure cycles (called under the host's lock)."""

    def __init__(self, host) -> None:
        self.host = host

    def open(self, live) -> None:
        live.secure = SecureCycle(live.record["name"], live.cycle["cycle"], live.config, time.time())

    # ------------------------------------------------------------------ requests
    def request(self, live, msg: Message) -> Message:
        """``hosted.request`` in a secure cycle: a slot while the roster is open, else backoff."""
        sc, client = live.secure, msg.sender
        if sc.phase != "accepting":
            return self.host._backoff(msg, live, "cycle_running")
        ticket = self.host._ticket(live, client, live.version)
        if client not in live.open:
            if len(live.open) >= live.config.max_clients:
                return self.host._backoff(msg, live, "cycle_full")
            live.open[client] = ticket
        return self.host._accepted(msg, live, ticket)

    def handle(self, live, msg: Message) -> Message | None:
        sc, f = live.secure, msg.fields
        if msg.type != "hosted.setup" and f["session"] != sc.session:
            done = live.unmasked
            if done is not None and f["session"] == done.session and msg.type in ("hosted.reveal", "hosted.shares") \
                    and msg.sender in done.survivors:  # a survivor late to an unmasked cycle: nothing more is needed
                return self._survivors(live, done, msg) if msg.type == "hosted.reveal" else \
                    msg.reply("hosted.revealed", {"model": live.record["name"], "session": done.session})
            failed = live.failed or {}
            if f["session"] == failed.get("session"):
                raise SecAggError(f"secure cycle {failed['cycle']} failed: {failed['message']}", code=failed["code"])
            raise SecAggError("no such secure cycle here (it ended, or the host restarted)",
                              code="secagg_session_lost")
        step = {"hosted.setup": self._setup, "hosted.key": self._key, "hosted.reveal": self._reveal,
                "hosted.shares": self._shares}[msg.type]
        return step(live, sc, msg)

    def _setup(self, live, sc: SecureCycle, msg: Message) -> None:
        client, f = msg.sender, msg.fields
        if sc.phase != "accepting":
            raise HostedError("this secure cycle's roster is fixed: ask again for the next", code="phase_closed")
        if not hmac.compare_digest(f["ticket"], self.host._ticket(live, client, live.version)):
            raise HostedError("no ticket of this client for this cycle matches: ask to train first",
                              code="not_accepted")
        if not 0 < f["bound"] <= MAX_BOUND:
            raise HostedError(f"a sample bound is 1..{MAX_BOUND}", code="bad_samples")
        if client not in live.open:
            if len(live.open) >= live.config.max_clients:
                raise HostedError("the cycle is full", code="not_accepted")
            live.open[client] = f["ticket"]
        sc.ready[client] = (f["ticket"], f["bound"])
        sc.parked[client] = msg  # a re-sent set-up replaces the one that timed out
        self._accepting(live, sc, time.time())
        return None

    def _key(self, live, sc: SecureCycle, msg: Message) -> None:
        client, f = msg.sender, msg.fields
        if sc.phase != "keys":
            raise HostedError(f"this secure cycle is past its key exchange ({sc.phase})", code="phase_closed")
        if client not in sc.roster:
            raise HostedError("this client is not on the cycle's roster", code="not_accepted")
        if client in sc.public and f["public"] != sc.public[client]:
            raise SecAggError("this client sent another round key already", code="secagg_conflict")
        try:
            key = bytes.fromhex(f["public"])
            sealed = unbundle(f["shares"], msg.tensors, "share")
        except (ValueError, OverlayRejected):
            key, sealed = b"", []
        others = set(sc.roster) - {client}
        if len(key) != 32 or any(m.fields["src"] != client for m in sealed) \
                or sorted(m.fields["dst"] for m in sealed) != sorted(others):
            raise SecAggError("a key message holds a 32-byte round key and one share from its sender to each other "
                              "member", code="secagg_protocol")
        sc.public[client] = f["public"]
        sc.sealed[client] = sealed
        sc.parked[client] = msg
        if len(sc.public) == len(sc.roster):
            self._keys_done(live, sc, time.time())
        return None

    def diff(self, live, msg: Message) -> Message:
        """A member's masked vector (``hosted.diff``): added to the sum, never seen unmasked."""
        sc, client, f = live.secure, msg.sender, msg.fields
        if client in sc.pushed:
            if sc.pushed[client] != f["diff_id"]:
                raise HostedError("this client already sent a diff in this cycle", code="duplicate_diff")
            return self._ack(live, msg, True)
        failed = live.failed or {}
        if failed.get("tickets", {}).get(client) == f["ticket"]:
            raise SecAggError(f"secure cycle {failed['cycle']} failed: {failed['message']}", code=failed["code"])
        if sc.phase != "training" or client not in sc.members:
            code = "phase_closed" if client in sc.members else "not_accepted"
            raise HostedError(f"this client has no masked vector to send now (cycle {sc.cycle}: {sc.phase})",
                              code=code)
        if f["version"] != live.version:
            raise HostedError(f"the diff is for version {f['version']}, the cycle trains {live.version}",
                              code="stale_version")
        if not hmac.compare_digest(f["ticket"], sc.ready[client][0]):
            raise HostedError("that ticket is not this client's in this cycle", code="not_accepted")
        sc.sum.add(msg.tensors)  # checked whole first: a wrong vector (secagg_protocol) adds nothing
        sc.pushed[client] = f["diff_id"]
        reply = self._ack(live, msg, False)
        if len(sc.pushed) == len(sc.members):
            self.host.peer.reply(msg, reply)
            self._training_done(live, sc, time.time())
            return None
        return reply

    def _ack(self, live, msg: Message, duplicate: bool) -> Message:
        return msg.reply("hosted.ack", {"model": live.record["name"], "diff_id": msg.fields["diff_id"],
                                        "cycle": live.secure.cycle, "duplicate": duplicate})

    def _reveal(self, live, sc: SecureCycle, msg: Message) -> Message | None:
        client, names = msg.sender, msg.fields.get("metric_names") or []
        if client not in sc.members:
            raise HostedError("this client is not a member of this secure cycle", code="not_accepted")
        if not (isinstance(names, list) and len(names) <= METRIC_SLOTS and all(isinstance(n, str) for n in names)):
            raise HostedError(f"metric_names: at most {METRIC_SLOTS} strings", code="bad_request")
        sc.names[client] = names
        if sc.phase == "training":
            sc.parked[client] = msg
            return None
        if client not in sc.survivors:
            raise HostedError("this client's vector came too late: it is not in the sum", code="phase_closed")
        return self._survivors(live, sc, msg)

    def _survivors(self, live, sc: SecureCycle, msg: Message) -> Message:
        return msg.reply("hosted.survivors", {"model": live.record["name"], "session": sc.session,
                                              "survivors": sc.survivors, "dropped": sc.dropped})

    def _shares(self, live, sc: SecureCycle, msg: Message) -> None:
        client, f = msg.sender, msg.fields
        if sc.phase != "reveal" or client not in sc.survivors:
            raise HostedError("this client has nothing to reveal now", code="phase_closed")
        if client in sc.reveals:
            raise SecAggError("this client revealed already", code="secagg_conflict")
        sc.reveals[client] = {"b": f["b"], "s": f["s"]}
        self.host.peer.reply(msg, msg.reply("hosted.revealed", {"model": live.record["name"], "session": sc.session}))
        if enough_shares(list(sc.reveals.values()), sc.survivors, sc.dropped, sc.threshold):
            self._finish(live, sc)
        return None

    # ------------------------------------------------------------------ phases
    def tick(self, live, now: float) -> None:
        """The phase's deadline passed."""
        sc = live.secure
        if sc.phase == "accepting":
            self._accepting(live, sc, now)
        elif sc.phase == "keys":
            self._keys_done(live, sc, now)
        elif sc.phase == "training":
            self._training_done(live, sc, now)
        else:
            self._fail(live, sc, "secagg_not_enough", f"{len(sc.reveals)} of {len(sc.survivors)} survivors revealed "
                       f"their shares in time, {sc.threshold} needed; nothing was unmasked")

    def _accepting(self, live, sc: SecureCycle, now: float) -> None:
        cfg = live.config
        if len(sc.ready) < cfg.max_clients and (now < sc.deadline or len(sc.ready) < cfg.min_clients):
            if now >= sc.deadline:  # too few: wait longer, freeing the slots of clients not ready
                sc.deadline = now + cfg.setup_timeout
                live.open = {c: t for c, t in live.open.items() if c in sc.ready}
            return
        cards = {}
        for client in sorted(sc.ready):
            entry = self.host.peer.trust_table.get(client)
            if entry is None:  # revoked since it asked
                self._refuse(sc, client, HostedError("this client is no longer enrolled", code="not_accepted"))
            else:
                cards[client] = entry.card.to_text()
        sc.roster = sorted(cards)
        n = len(sc.roster)
        if n < max(2, cfg.min_clients):
            return self._fail(live, sc, "secagg_not_enough", f"{n} clients ready, {cfg.min_clients} needed")
        sc.threshold = check_threshold(max(2, n // 2 + 1), n)
        parameters = sorted(live.record["parameters"])
        sc.encoding = Encoding.for_state(live.glob, set(parameters), frac_bits_for(n, DEFAULT_CLIP), DEFAULT_CLIP)
        sc.fields = {"parameters": parameters, "weight_scale": max(sc.ready[c][1] for c in sc.roster),
                     "clip": sc.encoding.clip, "frac_bits": sc.encoding.frac_bits}
        sc.sum = MaskedSum(sc.encoding)
        self._phase(live, sc, "keys", now + cfg.setup_timeout)
        live.open = {}
        fields = {"model": live.record["name"], "session": sc.session, "cards": cards, "threshold": sc.threshold,
                  "prg": DEFAULT_PRG, "encoding": sc.fields, "deadline_in": cfg.setup_timeout}
        for client, msg in self._take(sc).items():
            self.host.peer.reply(msg, msg.reply("hosted.roster", fields))
        log.info("[%s] %s secure cycle %d: %d members, threshold %d", self.host.name, sc.name, sc.cycle, n,
                 sc.threshold)

    def _keys_done(self, live, sc: SecureCycle, now: float) -> None:
        sc.members = sorted(sc.public)
        if len(sc.members) < sc.threshold:
            return self._fail(live, sc, "secagg_not_enough", f"{len(sc.members)} of {len(sc.roster)} clients completed "
                              f"the key exchange, {sc.threshold} needed")
        self._phase(live, sc, "training", now + live.config.cycle_length)
        keys = {m: sc.public[m] for m in sc.members}
        for client, msg in self._take(sc).items():
            mine = [m for owner in sc.members for m in sc.sealed[owner] if m.fields["dst"] == client]
            headers, tensors = bundle(mine, "share")
            self.host.peer.reply(msg, msg.reply("hosted.keys", {
                "model": live.record["name"], "session": sc.session, "keys": keys, "shares": headers,
                "deadline_in": live.config.cycle_length}, tensors))
        sc.sealed = {}

    def _training_done(self, live, sc: SecureCycle, now: float) -> None:
        sc.survivors = sorted(sc.pushed)
        sc.dropped = [m for m in sc.members if m not in sc.pushed]
        if len(sc.survivors) < sc.threshold:
            return self._fail(live, sc, "secagg_not_enough", f"{len(sc.survivors)} of {len(sc.members)} members sent "
                              f"their masked vector, {sc.threshold} needed; nothing was unmasked")
        self._phase(live, sc, "reveal", now + live.config.setup_timeout)
        for client, msg in self._take(sc).items():
            if client in sc.pushed:
                self.host.peer.reply(msg, self._survivors(live, sc, msg))
            else:
                self._refuse(sc, client, HostedError("no masked vector of this client came", code="phase_closed"),
                             msg)

    def _finish(self, live, sc: SecureCycle) -> None:
        """Unmask the survivors' sum, fold its mean into the aggregator as one update, publish."""
        started = time.monotonic()
        keys = {m: bytes.fromhex(sc.public[m]) for m in sc.members}
        try:
            unmask(sc.sum.total, sc.encoding.boundary, sc.session, keys, sc.survivors, sc.dropped,
                   list(sc.reveals.values()), sc.threshold, DEFAULT_PRG)
            deltas, samples, slots = decode_sum(sc.sum.total, sc.encoding, sc.fields["weight_scale"])
        except SecAggError as exc:
            return self._fail(live, sc, exc.code, exc.message)
        mean = add_mean(live.glob, deltas)
        live.agg.begin(live.glob, live.record["parameters"])
        live.agg.add(mean, float(samples), "secure-sum", count=len(sc.survivors))
        live.reset_summary()
        live.diffs, live.clients, live.samples, live.weight = len(sc.survivors), set(sc.survivors), samples, samples
        live.staleness = {"0": len(sc.survivors)}
        names = {c: sc.names[c] for c in sc.survivors if c in sc.names}
        for k, v in (secure_metrics(names, slots) if names else {}).items():
            live.metric_sums[k], live.metric_weights[k] = v * samples, samples
        live.note = {"secure": {"members": len(sc.members), "survivors": len(sc.survivors),
                                "dropped": len(sc.dropped), "threshold": sc.threshold,
                                "unmask_seconds": round(time.monotonic() - started, 4)}}
        live.unmasked, sc.sum, sc.reveals = sc, None, {}
        if sc.dropped:
            log.info("[%s] %s secure cycle %d: recovered the masks of %d dropped member(s)", self.host.name, sc.name,
                     sc.cycle, len(sc.dropped))
        self.host._publish(live)

    def _fail(self, live, sc: SecureCycle, code: str, message: str) -> None:
        """End the cycle with nothing applied: parked clients get the error; a new cycle opens."""
        for client in list(sc.parked):
            self._refuse(sc, client, SecAggError(message, code=code))
        live.failed = {"cycle": sc.cycle, "session": sc.session, "code": code, "message": message, "at": time.time(),
                       "tickets": {c: t for c, (t, _) in sc.ready.items()}}
        log.warning("[%s] %s secure cycle %d failed (%s): %s", self.host.name, sc.name, sc.cycle, code, message)
        self.host._next_cycle(live, "hosted.cycle_failed", code=code, reason=message[:200])

    def _phase(self, live, sc: SecureCycle, phase: str, deadline: float) -> None:
        """Enter ``phase``; the cycle's record says so, for ``meshfl host status`` beside the host."""
        sc.phase, sc.deadline = phase, deadline
        live.cycle = {**live.cycle, "secure": {"phase": phase, "members": len(sc.members or sc.roster),
                                               "threshold": sc.threshold}}
        self.host.home.store.atomic(lambda tx: tx.put(CYCLES, sc.name, live.cycle))

    def _take(self, sc: SecureCycle) -> dict[str, Message]:
        parked, sc.parked = sc.parked, {}
        return parked

    def _refuse(self, sc: SecureCycle, client: str, exc, msg: Message | None = None) -> None:
        msg = msg or sc.parked.pop(client, None)
        if msg is not None:
            self.host.peer.reply(msg, error_message(exc.code, exc.message, msg.id, exc.details))


class SecureTurn:
    """A client's side of one secure cycle (the light client's and a node's): its
    :class:`~meshfl.secagg.NodeSession` (its secrets, memory only), the members' cards as the host
    passed them on (each bound to its peer id by the key it is signed with: the host can add
    members it enrolled, not swap one's keys) and the cycle's encoding."""

    def __init__(self, identity: Identity, host: str, model: str) -> None:
        self.identity, self.host, self.model = identity, host, model
        self.cards: dict[str, PeerCard] = {}
        self.session: NodeSession | None = None
        self.encoding: dict = {}

    def key_message(self, roster: Mapping) -> Message:
        """From ``hosted.roster``: make this round's secrets and seal a share to each other member."""
        cards = {}
        for pid, text in (roster.get("cards") or {}).items():
            card = PeerCard.from_text(text)
            if card.peer_id != pid:
                raise SecAggError(f"the card given for member {pid} is another peer's", code="secagg_protocol")
            cards[pid] = card
        self.session = NodeSession(self.identity, roster["session"], self.host, list(cards), roster["threshold"],
                                   roster["prg"])
        self.cards = cards
        self.encoding = encoding_of(roster["encoding"], len(cards))
        expires = time.time() + min(MAX_TTL, DEFAULT_TTL + float(roster["deadline_in"]))
        sealed = [seal_message(self.identity, cards[pid], payload, expires)
                  for pid, payload in self.session.distribute(cards.get)]
        headers, tensors = bundle(sealed, "share")
        return Message("hosted.key", {"model": self.model, "session": self.session.session,
                                      **self.session.key_fields(), "shares": headers}, tensors)

    def take_keys(self, reply: Message) -> None:
        """From ``hosted.keys``: open the shares sealed to this client, check the members' keys."""
        for envelope in unbundle(reply.fields["shares"], reply.tensors, "share"):
            src = envelope.fields["src"]
            payload = open_message(self.identity, self.cards.get(src), envelope, time.time())
            if payload.get("type") != "secagg.share" or payload.get("session") != self.session.session:
                raise SecAggError(f"a share from {src} is not of this cycle", code="secagg_protocol")
            self.session.receive_share(src, payload)
        self.session.set_keys(reply.fields["keys"], self.cards.get)

    def spec(self) -> dict:
        """The encoding with the session, as a node's task carries it (``payload["secagg"]``)."""
        return {"session": self.session.session, **self.encoding}

    def mask(self, diff: Mapping[str, torch.Tensor], samples: int, metrics: Mapping[str, float]) -> tuple[dict, list]:
        """The masked vector of ``diff`` (one int32 tensor) and the metric names in its slots."""
        e = self.encoding
        enc = Encoding.for_state(diff, set(e["parameters"]), e["frac_bits"], e["clip"])
        encoder = UpdateEncoder(diff, samples, e["weight_scale"], metrics, enc)
        vector = np.empty(enc.nbytes, dtype=np.uint8)
        self.session.mask(vector, encoder.fill, enc.boundary)
        encoder.log_clipped()
        return {VECTOR: torch.from_numpy(vector).view(torch.int32)}, encoder.names

    def shares_message(self, survivors: Mapping) -> Message:
        """From ``hosted.survivors``: the reveal (once, for one split: NodeSession refuses another)."""
        s, d = survivors.get("survivors"), survivors.get("dropped")
        if not (isinstance(s, list) and isinstance(d, list) and all(isinstance(p, str) for p in s + d)):
            raise SecAggError("survivors and dropped are lists of peer ids", code="secagg_protocol")
        shares = self.session.reveal(s, d)
        return Message("hosted.shares", {"model": self.model, "session": self.session.session, **shares})


def encoding_of(fields: Mapping, n: int) -> dict:
    """The encoding of a ``hosted.roster``, checked as a node checks a researcher's (its fractional
    bits keep the sum of ``n`` clipped values in range)."""
    parameters, clip = fields.get("parameters"), fields.get("clip")
    bits, scale = fields.get("frac_bits"), fields.get("weight_scale")
    ok = (isinstance(parameters, list) and all(isinstance(p, str) for p in parameters)
          and isinstance(clip, (int, float)) and not isinstance(clip, bool) and 0 < clip < 2**20
          and isinstance(bits, int) and not isinstance(bits, bool) and 8 <= bits <= 30
          and isinstance(scale, int) and not isinstance(scale, bool) and 0 < scale <= MAX_BOUND)
    if not ok or frac_bits_for(n, float(clip)) < bits:
        raise SecAggError("a secure cycle's encoding needs parameters, weight_scale, clip and frac_bits that keep "
                          "the members' sum in range", code="secagg_protocol")
    return {"parameters": parameters, "weight_scale": scale, "clip": float(clip), "frac_bits": bits}


def bound_of(samples: int) -> int:
    """What a client tells the host of its sample count: the next power of two (a bound, not the count)."""
    return 1 << max(0, int(samples) - 1).bit_length()


__all__ = ["PHASES", "TYPES", "SecureCycle", "SecureHost", "SecureTurn", "bound_of", "encoding_of"]
