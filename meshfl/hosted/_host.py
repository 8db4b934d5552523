"""Host: a peer that hosts named, versioned models which many clients train (design §9).

It binds a ROUTER like a researcher (a :class:`~meshfl.transport.Peer`, CURVE, only enrolled keys
get in) and answers three exchanges per model: a client asks to train (``hosted.request``: a
ticket, or backoff), pulls the current version when its cached copy is stale (``hosted.pull``)
and pushes its diff (``hosted.push``, then ``hosted.diff``); model-sized transfers wait their
turn (:mod:`meshfl.hosted._flow`). Diffs are folded into the model's aggregator as they come
(``update = global + diff``, weighted by samples - times ``1/sqrt(1+tau)`` in async mode), so a
host holds about three models of memory per hosted model whatever the number of clients: the
global, the aggregator's sum and one scratch buffer, plus one per transfer slot. A model or diff
larger than one chunk moves in chunks (:mod:`meshfl.hosted._chunks`), so no message is larger
than a chunk whatever the model's size. Every diff is checked whole before anything is written;
a refused one (coded :class:`~meshfl.errors.HostedError`) leaves the model untouched.

Durability and restart: see :mod:`meshfl.hosted._state`. One lock serialises state changes: the
peer's dispatcher thread runs requests, a committer thread commits diffs' records in groups and
acknowledges them (:mod:`meshfl.hosted._commits`), a timer thread closes cycles at their deadline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..aggregate import make_aggregator
from ..crypto import PeerCard
from ..errors import ConfigError, HostedError, MeshflError, StoreError
from ..home import Home
from ..plans import DEFAULT_TRAINING_ARGS, load_plan_class, plan_source
from ..protocol import CHUNK_BYTES, chunk_plan, layout_of
from ..transport import Peer
from ..wire import DEFAULT_LIMITS, DTYPE_NAMES, Message, TensorMap, check_layout, error_message
from . import _wire  # noqa: F401  (declares the hosted messages)
from ._chunks import Upload
from ._commits import GroupCommit
from ._config import ServerConfig, check_model_name, staleness_weight
from ._flow import Transfers
from ._secure import TYPES as SECURE_TYPES
from ._secure import SecureHost
from ._state import (CLIENTS, CYCLES, DIFFS, META, MODELS, TICKETS, VERSIONS, DiffSlots, HostStore, bump, diff_key,
                     generation, model_blob, state_blob, tensors_hash, version_key)

log = logging.getLogger("meshfl.hosted")
TICK_S = 0.5  # the longest the timer sleeps with no deadline due

MAX_METRICS = 32
_QUEUED = object()  # a diff handed to the group commit: answered after it


class _Live:
    """One hosted model in memory: its record, global tensors, aggregator and open cycle."""

    def __init__(self, record: dict, cycle: dict, glob: dict, agg) -> None:
        self.record = record
        self.config = ServerConfig.from_dict(record["server"])
        self.cycle = cycle
        self.glob = glob
        self.agg = agg
        self.layout = {k: (DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in glob.items()}
        self.nbytes = sum(t.numel() * t.element_size() for t in glob.values())
        self.scratch = {k: torch.empty_like(t) for k, t in glob.items()}
        self.slots: DiffSlots | None = None  # set by the host: where the open cycle's diffs are kept
        self.spare: list[dict] = []  # upload buffers of ended transfers, for the next ones
        self.chunks: list = []  # the model's chunk plan (the host's chunk_bytes), set when loaded
        self.capabilities: dict[str, dict] = {}  # what accepted clients said they can do, for the diff records
        self.open: dict[str, str] = {}  # client -> its ticket for this cycle (async: this version), not yet used
        self.uncommitted: dict[str, str] = {}  # client -> its diff id: folded in, its record in the group commit
        self.broken: str | None = None  # why storing a diff failed: nothing more is taken until a restart
        self.secure = None  # the open secure cycle (:class:`~meshfl.hosted._secure.SecureCycle`)
        self.failed: dict | None = None  # how the last secure cycle failed, for its late clients and status
        self.unmasked = None  # the last secure cycle that made a version (for survivors late to reveal)
        self.digest = ""  # the current version's hash (set by the host), asked for by every request
        self.reset_summary()

    def reset_summary(self) -> None:
        self.diffs = 0
        self.clients: set[str] = set()
        self.samples = 0
        self.weight = 0.0
        self.staleness: dict[str, int] = {}
        self.metric_sums: dict[str, float] = {}
        self.metric_weights: dict[str, float] = {}
        self.note: dict = {}  # what else the next version's record says (a secure cycle's members)

    def count(self, client: str, rec: dict) -> None:
        self.diffs += 1
        self.clients.add(client)
        self.samples += rec["samples"]
        self.weight += rec["weight"]
        tau = str(rec["tau"])
        self.staleness[tau] = self.staleness.get(tau, 0) + 1
        for k, v in rec.get("metrics", {}).items():
            self.metric_sums[k] = self.metric_sums.get(k, 0.0) + v * rec["samples"]
            self.metric_weights[k] = self.metric_weights.get(k, 0.0) + rec["samples"]

    @property
    def version(self) -> int:
        return self.record["version"]


@dataclasses.dataclass
class _Folded:
    """A diff checked, stored in its slot and folded in; its record waits for the group commit."""

    live: _Live
    msg: Message  # the request, its tensors dropped: what the ack answers
    rec: dict
    cycle: int
    version: int


class Host:
    """Hosts models for clients. ``Host(home)`` opens a researcher home (``meshfl init --role researcher``)."""

    def __init__(self, home: str | Path | Home, *, listen: str | None = None, peer_options: dict | None = None,
                 max_message_bytes: int = 1 << 30, enroll_listen: str | None = None, max_transfers: int = 2,
                 transfer_timeout: float = 15.0, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._own_home = not isinstance(home, Home)  # a Home handed in stays open after close()
        self.home = home if isinstance(home, Home) else Home.open(home)
        cfg = self.home.config
        endpoint = listen or cfg.listen
        problem = (f"a host runs on a researcher home; {self.home.path} is a {cfg.role} home"
                   if cfg.role != "researcher" else
                   None if endpoint else "a host needs a listen endpoint (meshfl init --listen, or listen=...)")
        if problem:
            if self._own_home:
                self.home.close()
            raise ConfigError(problem, code="wrong_role" if cfg.role != "researcher" else "config")
        options = {"heartbeat": cfg.heartbeat, "dead_after": cfg.dead_after,
                   "limits": dataclasses.replace(DEFAULT_LIMITS, max_message_bytes=max_message_bytes),
                   **(peer_options or {})}
        # Its handlers only decide and queue (diffs commit on a thread of their own), so they run on the
        # I/O thread; its light clients are many, so libzmq pings none of them (see Peer).
        self.peer = Peer(self.home.identity, listen=endpoint, handler=self._handle, inline=True, ping_dialers=False,
                         **options)
        self.name = cfg.name
        self.state = HostStore(self.home.store, self.home.path / "hosted")
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # notified when a model gets a new version
        self._live: dict[str, _Live] = {}
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._timer_main, name=f"meshfl-host-{self.name}", daemon=True)
        self._started = False
        self._generation = -1
        self._enroll_listen = enroll_listen
        self._pulls = Transfers(max_transfers, transfer_timeout)
        self._pushes = Transfers(max_transfers, transfer_timeout, room=self._push_room)
        self._commits: GroupCommit | None = None
        self._secure = SecureHost(self)
        self.chunk_bytes = chunk_bytes  # a model or diff larger than this moves in chunks of it
        self._uploads: dict[str, Upload] = {}  # client -> its chunked diff arriving (one per push slot)
        self.enroll_server = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Host":
        try:
            self._ticket_key = bytes.fromhex(self.home.store.atomic(_ticket_key))
            with self._lock:
                for record in self.state.models():
                    self._load(record, restart=True)
                self._clean_packs()
            self._commits = GroupCommit(self._commit, self.name)
            self.peer.start()
            self._sync()
            if self._enroll_listen:
                from ._enroll import EnrollServer

                self.enroll_server = EnrollServer(self, self._enroll_listen)
        except BaseException:
            self.close()  # nothing half-started is left behind (the home is closed if we opened it)
            raise
        self._timer.start()
        self._started = True
        log.info("[%s] host listening on %s with %d model(s)", self.name, self.peer.endpoint, len(self._live))
        return self

    def close(self) -> None:
        self._stop.set()
        if self._timer.is_alive():
            self._timer.join()
        if self.enroll_server is not None:
            self.enroll_server.close()
        if self._commits is not None:
            self._commits.close()  # what waits is committed and acknowledged
        self.peer.close()
        for live in self._live.values():
            live.slots.close()
        if self._own_home:
            self.home.close()

    def __enter__(self) -> "Host":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return self.peer.endpoint

    @property
    def card(self) -> PeerCard:
        return self.home.identity.card

    # ------------------------------------------------------------------ enrollment
    def enroll(self, cards: Iterable[PeerCard], via: str = "python") -> int:
        """Trust clients' cards (bulk: one transaction, one audit record); returns how many are new."""
        cards = list(cards)
        new = enroll_cards(self.home, cards, via)
        for card in cards:
            self.peer.trust(card)
        return new

    def redeem(self, token: str, card: PeerCard) -> bool:
        """Enroll ``card`` with one use of an enrollment token (see :mod:`meshfl.hosted._enroll`)."""
        from ._enroll import redeem

        new = redeem(self.home, token, card)
        self.peer.trust(card)
        log.info("[%s] enrolled %s (%s) with a token", self.name, card.peer_id, card.name)
        return new

    def revoke_client(self, peer_id: str) -> bool:
        """Cut an enrolled client off at once (its link closes; what it sends is dropped)."""
        done = revoke_in(self.home, peer_id)
        self.peer.revoke(peer_id)
        return done

    # ------------------------------------------------------------------ models
    def add_model(self, name: str, plan, **kw: Any) -> dict:
        """Host ``plan`` as ``name`` (see :func:`create_model`) and serve it at once."""
        with self._lock:
            if name in self._live:
                raise HostedError(f"a model named {name!r} is hosted already", code="model_exists")
            out = create_model(self.home, self.state, name, plan, **kw)
            self._load(self.home.store.read(lambda tx: tx.get(MODELS, name)))
        return out

    def model(self, name: str, version: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors of a version (default: the current one), as copies."""
        live = self._get(name)
        v = live.version if version is None else version
        if not self.state.blobs.exists(model_blob(name, v)):
            raise HostedError(f"version {v} of {name!r} is not kept", code="unknown_version")
        return {k: t.clone() for k, t in self.state.blobs.read(model_blob(name, v)).items()}

    def versions(self, name: str) -> list[dict]:
        """Per version: hash, when, diffs, clients, samples, staleness distribution, client metrics."""
        self._get(name)
        return self.state.versions(name)

    def status(self, name: str | None = None) -> list[dict]:
        """Each model (or ``name``): mode, current version, the open cycle's progress, version history."""
        with self._lock:
            names = [name] if name else sorted(self._live)
            return [self._status(self._get(n)) for n in names]

    def _status(self, live: _Live) -> dict:
        cfg = live.config
        out = {"name": live.record["name"], "mode": cfg.mode, "version": live.version,
               "plan_hash": live.record["plan_hash"], "cycle": live.cycle["cycle"],
               "open": {"accepted": len(live.open) + (live.diffs if cfg.mode == "cycle" else 0),
                        "diffs": live.diffs, "clients": len(live.clients), "close_at": cfg.close_at,
                        "deadline_in": self._deadline_in(live) if cfg.mode == "cycle" else None,
                        "phase": live.secure.phase if live.secure else ("open" if cfg.mode == "cycle" else "buffer")},
               "server": cfg.to_dict(), "versions": self.state.versions(live.record["name"])}
        if live.secure:
            out["secure"] = {**live.secure.status(),
                             "last_failure": {k: v for k, v in (live.failed or {}).items() if k != "tickets"} or None}
        return out

    def wait_version(self, name: str, version: int, timeout: float) -> bool:
        """Block until ``name`` reached ``version`` (for scripts and tests); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._get(name).version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # ------------------------------------------------------------------ loading and restart
    def _get(self, name: str) -> _Live:
        live = self._live.get(name)
        if live is None:
            raise HostedError(f"no hosted model named {name!r}", code="unknown_model")
        return live

    def _load(self, record: dict, restart: bool = False) -> None:
        name = record["name"]
        v = record["version"]
        glob = self.state.blobs.read(model_blob(name, v))
        cycle = self.home.store.read(lambda tx: tx.get(CYCLES, name))
        live = _Live(record, cycle, glob, self._aggregator(record))
        live.digest = self._version_hash(live, v)
        live.chunks = chunk_plan(layout_of(glob), self.chunk_bytes)  # every version has the same layout
        live.agg.begin(glob, live.record["parameters"])
        live.slots = DiffSlots(self.state.blobs.folder / f"{name}.diffs", live.layout)
        dropped = []
        for rec in self.state.diffs(name, cycle["cycle"]):
            try:
                diff = live.slots.read(rec["slot"], rec["crc"])
            except StoreError:  # only an OS crash loses a slot's bytes (not fsynced)
                dropped.append(rec)
                continue
            self._fold(live, diff, rec)
            live.count(rec["client"], rec)
        if dropped:
            log.warning("[%s] %s: %d diff(s) lost their tensors in a crash and are dropped", self.name, name,
                        len(dropped))

            def drop(tx) -> None:  # and its ticket's use: the client may send that diff again
                for r in dropped:
                    tx.delete(DIFFS, diff_key(name, cycle["cycle"], r["client"], r["ticket"]))
                    if (tx.get(TICKETS, f"{name}/{r['client']}") or {}).get("ticket") == r["ticket"]:
                        tx.delete(TICKETS, f"{name}/{r['client']}")

            self.home.store.atomic(drop)
        self._live[name] = live
        if live.config.secure_aggregation:
            if restart:  # its masked vectors, if any, died with the process: useless without the reveal
                log.info("[%s] %s: secure cycle %d abandoned at restart", self.name, name, cycle["cycle"])
                self._next_cycle(live, "hosted.cycle_abandoned")
            else:
                self._secure.open(live)
        elif live.diffs and live.diffs >= live.config.close_at:
            self._publish(live)  # the host died between the last diff and its version

    def _aggregator(self, record: dict):
        """The model's aggregator as it stood at its current version (a server optimizer's state
        read back from that version's pack)."""
        agg = make_aggregator(record["aggregator"])
        name, v = record["name"], record["version"]
        if self.state.blobs.exists(state_blob(name, v)):
            agg.load_state_dict({"meta": {"name": agg.name, "rounds": v},
                                 "tensors": self.state.blobs.read(state_blob(name, v))})
        return agg

    def _clean_packs(self) -> None:
        keep = set()
        for name, live in self._live.items():
            versions = [r["version"] for r in self.state.versions(name)]
            for v in versions[-live.config.keep_versions:]:
                keep |= {model_blob(name, v), state_blob(name, v)}
        removed = self.state.clean_packs(keep)
        if removed:
            log.info("[%s] removed %d pack(s) left by an earlier run", self.name, removed)

    # ------------------------------------------------------------------ cycles
    def _deadline_in(self, live: _Live) -> float:
        deadline = live.secure.deadline if live.secure else live.cycle.get("deadline")
        return max(0.0, deadline - time.time()) if deadline else 0.0

    def _ticket(self, live: _Live, client: str, version: int) -> str:
        """A client's ticket: a MAC over what it was accepted for (cycle mode: this cycle and its
        extension; async: the version), so handing one out costs no write and it survives a restart."""
        c = live.cycle
        what = f"{live.record['name']}|{client}|{version}" + (
            f"|{c['cycle']}|{c['extended']}" if live.config.mode == "cycle" else "")
        return hmac.new(self._ticket_key, what.encode(), hashlib.sha256).hexdigest()[:32]

    def _sync(self) -> None:
        """Take up what was changed beside this process (``meshfl host add-model``, ``enroll``,
        ``revoke``): new models, newly trusted and revoked clients."""
        gen, models, rows = self.home.store.read(lambda tx: (generation(tx), tx.keys(MODELS), tx.items(CLIENTS)))
        with self._lock:
            for name in models:
                if name not in self._live:
                    self._load(self.home.store.read(lambda tx: tx.get(MODELS, name)))
        trusted = {e.card.peer_id for e in self.peer.trust_table.entries()}
        for peer_id, row in rows:
            if row.get("revoked"):
                if peer_id in trusted:
                    self.peer.revoke(peer_id)
            elif peer_id not in trusted and row.get("card"):
                self.peer.trust(PeerCard.from_text(row["card"]))
        self._generation = gen

    def _next_tick(self) -> float:
        """Seconds until the timer has work: the nearest cycle deadline, at most TICK_S (vanished
        transfers, and models or clients changed beside this process)."""
        with self._lock:
            deadlines = [live.secure.deadline if live.secure else live.cycle["deadline"]
                         for live in self._live.values() if live.config.mode == "cycle"]
        return min([TICK_S] + [max(0.02, d - time.time()) for d in deadlines])  # a failing close: no busy loop

    def _timer_main(self) -> None:
        while not self._stop.wait(self._next_tick()):
            if self._pulls.in_flight or self._pushes.in_flight:
                self._expire_transfers()  # slots of clients that vanished mid-transfer
            if self.home.store.read(generation) != self._generation:
                try:
                    self._sync()
                except Exception:
                    log.exception("[%s] reloading models and clients failed", self.name)
            with self._lock:
                for live in list(self._live.values()):  # a model with diffs in the group commit: next tick
                    due = live.secure.deadline if live.secure else live.cycle.get("deadline")
                    if live.config.mode == "cycle" and time.time() >= due and not live.uncommitted \
                            and not live.broken:
                        try:
                            self._deadline(live)
                        except Exception:
                            log.exception("[%s] closing a cycle of %s failed", self.name, live.record["name"])

    def _deadline(self, live: _Live) -> None:
        if live.secure:
            return self._secure.tick(live, time.time())
        if live.diffs >= live.config.min_clients:
            self._publish(live)
            return
        # Too few diffs: keep those, free the slots of clients that never sent one, extend.
        name = live.record["name"]
        cycle = {**live.cycle, "deadline": time.time() + live.config.cycle_length, "extended": live.cycle["extended"] + 1}
        self.home.store.atomic(lambda tx: tx.put(CYCLES, name, cycle))
        freed = len(live.open)
        live.cycle, live.open = cycle, {}
        log.info("[%s] %s cycle %d: %d diff(s) of %d needed at the deadline; extended, %d slot(s) freed",
                 self.name, name, cycle["cycle"], live.diffs, live.config.min_clients, freed)

    def _publish(self, live: _Live) -> None:
        """Close the open cycle: the aggregate becomes the next version, committed before anything else."""
        name = live.record["name"]
        old_cycle = live.cycle["cycle"]
        new_state = live.agg.finish()
        agg_tensors = live.agg.state_dict()["tensors"]
        overflow = _non_finite(new_state) or _non_finite(agg_tensors)
        if overflow is not None:  # finite diffs can still overflow float32 in their sum or on the model
            log.warning("[%s] %s cycle %d: the aggregate of %d diff(s) is not finite (tensor %r): no version "
                        "made, the cycle's diffs are discarded and the next cycle starts on version %d",
                        self.name, name, old_cycle, live.diffs, overflow, live.version)
            self._next_cycle(live, "hosted.cycle_discarded", reason="non_finite_aggregate", tensor=overflow,
                             diffs=live.diffs)
            return
        v = live.version + 1
        digest = tensors_hash(new_state)
        self.state.blobs.write(model_blob(name, v), new_state)
        if agg_tensors:
            self.state.blobs.write(state_blob(name, v), agg_tensors)
        now = time.time()
        summary = {"version": v, "hash": digest, "created": now, "cycle": old_cycle, "diffs": live.diffs,
                   "clients": len(live.clients), "samples": live.samples, "staleness": dict(live.staleness),
                   "metrics": {k: live.metric_sums[k] / live.metric_weights[k] for k in live.metric_sums},
                   **live.note}
        record = {**live.record, "version": v}
        cycle = _new_cycle(old_cycle + 1, v, now, live.config)
        diffs = self.state.diffs(name, old_cycle)

        def write(tx) -> None:
            tx.put(VERSIONS, version_key(name, v), summary)
            tx.put(MODELS, name, record)
            tx.put(CYCLES, name, cycle)
            for rec in diffs:
                tx.delete(DIFFS, diff_key(name, old_cycle, rec["client"], rec["ticket"]))
            self.home.audit.append("hosted.version", model=name, version=v, hash=digest, diffs=live.diffs)

        self.home.store.atomic(write)  # the cycle's slots are free for the next one
        gone = v - live.config.keep_versions
        if gone >= 0:
            self.state.blobs.delete(model_blob(name, gone))
            self.state.blobs.delete(state_blob(name, gone))
        live.record, live.cycle, live.digest = record, cycle, digest
        live.glob = self.state.blobs.read(model_blob(name, v))
        live.agg.begin(live.glob, record["parameters"])
        live.reset_summary()
        live.open, live.capabilities = {}, {}  # cycle mode: a new cycle; async: a ticket is for one version
        if live.config.secure_aggregation:
            self._secure.open(live)
        self._reply_started(self._pushes.poke())  # pushes waiting for room in this model's next cycle
        self._cond.notify_all()
        log.info("[%s] %s version %d from %d diff(s) of %d client(s)", self.name, name, v, summary["diffs"],
                 summary["clients"])

    def _next_cycle(self, live: _Live, event: str, **audit: Any) -> None:
        """Open the next cycle on the same version, dropping the open one's diffs (a secure cycle
        failed or was abandoned; an aggregate was not finite). Cycle mode's tickets name their
        cycle, so they end with it; async tickets name the version, which stays."""
        name = live.record["name"]
        old_cycle = live.cycle["cycle"]
        cycle = _new_cycle(old_cycle + 1, live.version, time.time(), live.config)

        def write(tx) -> None:
            tx.put(CYCLES, name, cycle)
            for rec in self.state.diffs(name, old_cycle):  # joins this transaction
                tx.delete(DIFFS, diff_key(name, old_cycle, rec["client"], rec["ticket"]))
            self.home.audit.append(event, model=name, cycle=old_cycle, version=live.version, **audit)

        self.home.store.atomic(write)
        live.cycle, live.capabilities = cycle, {}
        if live.config.mode == "cycle":
            live.open = {}
        live.agg = self._aggregator(live.record)  # finish() may have stepped a server optimizer
        live.agg.begin(live.glob, live.record["parameters"])
        live.reset_summary()
        if live.config.secure_aggregation:
            self._secure.open(live)
        self._reply_started(self._pushes.poke())  # pushes waiting for room in this cycle
        self._cond.notify_all()

    # ------------------------------------------------------------------ requests
    def _handle(self, msg: Message) -> Message | None:
        if msg.type == "hosted.request":
            return self._on_request(msg)
        if msg.type in ("hosted.pull", "hosted.fetch"):
            with self._lock:
                return self._pulls.admit(msg, self._on_pull if msg.type == "hosted.pull" else self._on_fetch)
        if msg.type == "hosted.pulled":
            self._end_transfer(self._pulls, msg.sender)
            return None
        if msg.type == "hosted.push":
            with self._lock:
                return self._before_push(msg) or self._pushes.admit(msg, self._on_push)
        if msg.type == "hosted.put":
            return self._on_put(msg)
        if msg.type == "hosted.diff":
            try:
                answer = self._on_diff(msg)
            finally:
                self._end_transfer(self._pushes, msg.sender)  # the diff is here: its memory is free
            return None if answer is _QUEUED else answer
        if msg.type in SECURE_TYPES:
            with self._lock:
                live = self._get(msg.fields["model"])
                if not live.secure:
                    raise HostedError(f"{live.record['name']!r} runs no secure cycles", code="bad_request")
                return self._secure.handle(live, msg)
        if msg.type == "hosted.status":
            return msg.reply("hosted.info", {"models": self.status(msg.fields.get("model"))})
        if msg.type == "ping":
            return Message("pong", {"name": self.name, "peer_id": self.peer.peer_id, "role": "host", "version": "1"})
        raise MeshflError(f"a host does not handle {msg.type!r}", code="unknown_type")

    def _end_transfer(self, transfers: Transfers, client: str) -> None:
        with self._lock:
            self._reply_started(transfers.release(client))

    def _expire_transfers(self) -> None:
        with self._lock:
            self._reply_started(self._pulls.expire() + self._pushes.expire())

    def _reply_started(self, started: list[tuple[Message, Message]]) -> None:
        for c in [c for c in self._uploads if not self._pushes.holds(c)]:
            self._drop_upload(c)
        for request, reply in started:
            self.peer.reply(request, reply)

    def _push_room(self, msg: Message) -> bool:
        """May a push for this model start: with the diffs already in and the pushes in flight, is
        there room left in the open cycle (async: buffer)? One with no room waits for the next."""
        live = self._live.get(msg.fields.get("model"))
        if live is None or live.secure:
            return True
        return live.diffs + self._pushes.in_flight_for(live.record["name"]) < live.config.close_at

    def _on_request(self, msg: Message) -> Message | None:
        """A ticket or backoff. A client that asks (``pull``) gets a version of at most one chunk
        with its ticket when its cached copy is stale: one round trip less, and the answer then
        waits for a pull slot like a pull (the slot is kept only if the model went with it)."""
        with self._lock:
            live = self._get(msg.fields["model"])
            if msg.fields.get("pull") and msg.fields.get("cached") != live.digest and not live.secure \
                    and live.nbytes <= self.chunk_bytes:
                return self._pulls.admit(msg, self._request_with_model, keep=lambda reply: reply.tensors)
            return self._request_reply(msg)

    def _request_with_model(self, msg: Message) -> Message:
        """Decided when the pull slot is there (the version may have changed while it waited)."""
        reply = self._request_reply(msg)
        live = self._get(msg.fields["model"])
        if reply.type == "hosted.accepted" and not reply.fields["current"] and not live.secure:
            reply.fields["inline"] = True
            if msg.fields.get("plan"):
                reply.fields.update(plan_source=live.record["plan_source"], plan_class=live.record["plan_class"],
                                    model_args=live.record["model_args"])
            reply.tensors = live.glob
        return reply

    def _request_reply(self, msg: Message) -> Message:
        client, name = msg.sender, msg.fields["model"]
        with self._lock:
            live = self._get(name)
            cfg = live.config
            if live.secure:
                return self._secure.request(live, msg)
            done = self.home.store.read(lambda tx: tx.get(TICKETS, f"{name}/{client}"))
            ticket = self._ticket(live, client, live.version)
            if done is not None and done["ticket"] == ticket:
                return self._backoff(msg, live, "already_sent")
            if client not in live.open:
                busy = len(live.open) + (live.diffs if cfg.mode == "cycle" else 0)
                if busy >= cfg.max_clients:
                    return self._backoff(msg, live, "cycle_full" if cfg.mode == "cycle" else "busy")
                live.open[client] = ticket
            live.capabilities[client] = _small(msg.fields.get("capabilities") or {})
            return self._accepted(msg, live, ticket)

    def _accepted(self, msg: Message, live: _Live, ticket: str) -> Message:
        digest = self._version_hash(live, live.version)
        fields = {"model": live.record["name"], "ticket": ticket, "cycle": live.cycle["cycle"],
                  "version": live.version, "version_hash": digest, "plan_hash": live.record["plan_hash"],
                  "training_args": live.record["training_args"], "current": msg.fields.get("cached") == digest,
                  "deadline_in": self._deadline_in(live) if live.config.mode == "cycle" else 0.0}
        if live.secure:
            fields["secure"] = True
        return msg.reply("hosted.accepted", fields)

    def _backoff(self, msg: Message, live: _Live, reason: str) -> Message:
        retry = self._deadline_in(live) if live.config.mode == "cycle" else 1.0
        return msg.reply("hosted.backoff", {"model": live.record["name"], "retry_in": max(0.5, retry),
                                            "reason": reason})

    def _version_hash(self, live: _Live, version: int) -> str:
        if version == live.version and live.digest:
            return live.digest
        rec = self.home.store.read(lambda tx: tx.get(VERSIONS, version_key(live.record["name"], version)))
        if rec is None:
            raise HostedError(f"{live.record['name']!r} has no version {version}", code="unknown_version")
        return rec["hash"]

    def _on_pull(self, msg: Message) -> Message:
        name, v = msg.fields["model"], msg.fields["version"]
        with self._lock:
            live = self._get(name)
            digest = self._version_hash(live, v)
            blob = model_blob(name, v)
            if v != live.version and not self.state.blobs.exists(blob):
                raise HostedError(f"version {v} of {name!r} is no longer kept", code="unknown_version")
            tensors = live.glob if v == live.version else self.state.blobs.read(blob)
        fields = {"model": name, "version": v, "version_hash": digest, "plan_hash": live.record["plan_hash"]}
        if msg.fields.get("plan"):
            fields.update(plan_source=live.record["plan_source"], plan_class=live.record["plan_class"],
                          model_args=live.record["model_args"])
        if live.nbytes > self.chunk_bytes:  # announced here, pulled chunk by chunk (hosted.fetch)
            fields.update(layout=layout_of(tensors), chunk_bytes=self.chunk_bytes)
            tensors = {}
        return msg.reply("hosted.model", fields, tensors)

    def _on_fetch(self, msg: Message) -> Message:
        """One chunk of a version, a view of its tensors (the current one in memory, others mapped)."""
        name, v, index = msg.fields["model"], msg.fields["version"], msg.fields["index"]
        live = self._get(name)
        if v == live.version:
            tensors = live.glob
        elif 0 <= v < live.version and self.state.blobs.exists(model_blob(name, v)):
            tensors = self.state.blobs.read(model_blob(name, v))
        else:
            raise HostedError(f"version {v} of {name!r} is not kept", code="unknown_version")
        if not 0 <= index < len(live.chunks):
            raise HostedError(f"{name!r} has no chunk {index}", code="bad_chunk")
        tensor, start, count = live.chunks[index]
        return msg.reply("hosted.chunk", {"model": name, "version": v, "index": index},
                         {"data": tensors[tensor].reshape(-1)[start : start + count]})

    def _before_push(self, msg: Message) -> Message | None:
        """Before a slot is granted to a diff that is to come in chunks: one already counted is
        acknowledged at once, and a layout that does not match the model is refused with the code
        its tensors would get (a small diff comes whole and is checked as it is)."""
        client, f = msg.sender, msg.fields
        live = self._get(f["model"])
        specs = check_layout(f.get("layout") or [])
        if sum(nbytes for _, _, nbytes in specs.values()) <= self.chunk_bytes:
            return None
        done = self.home.store.read(lambda tx: tx.get(TICKETS, f"{f['model']}/{client}"))
        if done is not None and done["ticket"] == f["ticket"] and done["diff_id"] == f.get("diff_id"):
            return msg.reply("hosted.ack", {"model": f["model"], "diff_id": done["diff_id"], "cycle": done["cycle"],
                                            "duplicate": True})
        self._check_layout(live, specs)
        return None

    def _on_push(self, msg: Message) -> Message:
        """A transfer slot: a diff larger than a chunk gets an upload buffer (the same one again
        when it is pushed again) and is asked for in chunks."""
        client, f = msg.sender, msg.fields
        live = self._get(f["model"])
        declared = sum(nbytes for _, _, nbytes in check_layout(f.get("layout") or []).values())
        if declared <= self.chunk_bytes or not f.get("diff_id"):
            self._drop_upload(client)
            return msg.reply("hosted.go", {"model": f["model"]})
        upload = self._uploads.get(client)
        if upload is None or (upload.model, upload.diff_id) != (f["model"], f["diff_id"]):
            self._drop_upload(client)
            buffer = live.spare.pop() if live.spare else {k: torch.empty_like(t) for k, t in live.glob.items()}
            self._uploads[client] = Upload(f["model"], f["diff_id"], buffer, live.chunks)
        return msg.reply("hosted.go", {"model": f["model"], "chunk_bytes": self.chunk_bytes})

    def _on_put(self, msg: Message) -> Message:
        """One chunk of a client's diff, written into its place (the same chunk again: no change)."""
        client, f = msg.sender, msg.fields
        with self._lock:
            upload = self._uploads.get(client)
            if upload is None or (upload.model, upload.diff_id) != (f["model"], f["diff_id"]) \
                    or not self._pushes.touch(client):
                raise HostedError("no upload of that diff is open (its slot ended): push it again", code="no_upload")
            upload.put(f["index"], msg.tensors.get("data"))
        return msg.reply("hosted.got", {"model": f["model"], "diff_id": f["diff_id"], "index": f["index"]})

    def _drop_upload(self, client: str) -> None:
        upload = self._uploads.pop(client, None)
        if upload is not None and upload.model in self._live:
            self._live[upload.model].spare.append(upload.buffer)

    def _diff_tensors(self, msg: Message) -> Mapping:
        """The diff's tensors: the message's own, or those its chunks brought (all of them)."""
        count = msg.fields.get("chunks")
        if count is None:
            return msg.tensors
        upload = self._uploads.get(msg.sender)
        if upload is None or (upload.model, upload.diff_id) != (msg.fields["model"], msg.fields["diff_id"]) \
                or not upload.complete(count):
            raise HostedError("the diff's chunks did not all arrive: push it again", code="incomplete_diff")
        return upload.buffer

    def _on_diff(self, msg: Message) -> Message | object | None:
        """Check a diff whole; a good one goes to the group commit (``_QUEUED``: its ack follows
        the commit)."""
        client, f = msg.sender, msg.fields
        name, diff_id = f["model"], f["diff_id"]
        with self._lock:
            live = self._get(name)
            if live.secure:  # a masked vector: summed, never stored
                return self._secure.diff(live, msg)
            cfg = live.config
            if live.broken:
                raise HostedError(f"the host could not store diffs of {name!r} ({live.broken}); it takes "
                                  "none until it restarts", code="store_failed")
            waiting = live.uncommitted.get(client)
            if waiting is not None:
                if waiting == diff_id:  # sent again while its record commits: its ack follows
                    return _QUEUED
                raise HostedError("this client already sent a diff on this ticket", code="duplicate_diff")
            done = self.home.store.read(lambda tx: tx.get(TICKETS, f"{name}/{client}"))
            if done is not None and done["ticket"] == f["ticket"]:
                if done["diff_id"] == diff_id:  # a re-sent diff whose ack was lost
                    return msg.reply("hosted.ack", {"model": name, "diff_id": diff_id, "cycle": done["cycle"],
                                                    "duplicate": True})
                raise HostedError("this client already sent a diff on this ticket", code="duplicate_diff")
            version = f["version"]
            if version > live.version or version < 0:
                raise HostedError(f"{name!r} has no version {version} (it is at {live.version})",
                                  code="unknown_version")
            tau = live.version - version
            if cfg.mode == "cycle" and tau or tau > cfg.max_staleness:
                raise HostedError(f"the diff is for version {version}, the model is at {live.version}"
                                  + (f" (max_staleness {cfg.max_staleness})" if cfg.mode == "async" else
                                     ": its cycle closed"), code="stale_version")
            if live.diffs >= cfg.close_at:  # only a diff sent without its hosted.go gets here
                raise HostedError(f"the {'cycle' if cfg.mode == 'cycle' else 'buffer'} is full: ask to push "
                                  "(hosted.push) first", code="stale_version")
            if not hmac.compare_digest(f["ticket"], self._ticket(live, client, version)):
                raise HostedError("no ticket of this client for this cycle matches that diff (never asked, or its "
                                  "slot was freed at the deadline): ask to train first", code="not_accepted")
            if done is not None and (done["version"] >= version if cfg.mode == "async" else
                                     done["cycle"] == live.cycle["cycle"]):
                raise HostedError("this client already sent a diff for this version", code="duplicate_diff")
            samples = f["samples"]
            if samples <= 0:
                raise HostedError(f"samples must be > 0, got {samples}", code="bad_samples")
            metrics = _metrics(f.get("metrics") or {})
            tensors = self._diff_tensors(msg)
            self._check_diff(live, tensors)
            weight = samples * (staleness_weight(tau) if cfg.mode == "async" else 1.0)
            slot = live.diffs  # the cycle's i-th diff takes slot i
            rec = {"client": client, "ticket": f["ticket"], "diff_id": diff_id, "base": version, "tau": tau,
                   "samples": samples, "weight": weight, "metrics": metrics, "at": time.time(), "slot": slot,
                   "crc": live.slots.write(slot, tensors), "capabilities": live.capabilities.pop(client, {})}
            self._fold(live, tensors, rec)
            live.count(client, rec)
            live.open.pop(client, None)
            live.uncommitted[client] = diff_id
            item = _Folded(live, Message(msg.type, id=msg.id, sender=client), rec, live.cycle["cycle"], version)
        self._commits.put(item)
        return _QUEUED

    def _commit(self, batch: list[_Folded]) -> None:
        """The committer thread's part (:class:`GroupCommit`): the batch's records and tickets in
        one transaction, then the acks, then the next version if a cycle (buffer) is full. A
        version is made only when every diff folded into it has committed; if a commit fails, the
        sum in memory holds diffs the store does not, so the model takes nothing more until a
        restart rebuilds it from what did commit."""
        try:
            self.home.store.atomic(lambda tx: [self._record(tx, item) for item in batch])
        except Exception as exc:
            log.exception("[%s] storing %d diff(s) failed", self.name, len(batch))
            with self._lock:
                for item in batch:
                    item.live.broken = f"{type(exc).__name__}: {exc}"
            for item in batch:
                self.peer.reply(item.msg, error_message("store_failed", f"the host could not store the diff: {exc}",
                                                        item.msg.id))
            return
        with self._lock:
            for item in batch:
                item.live.uncommitted.pop(item.msg.sender, None)
            for live in {id(item.live): item.live for item in batch}.values():
                if live.diffs >= live.config.close_at and not live.uncommitted:
                    self._publish(live)
        for item in batch:
            self.peer.reply(item.msg, item.msg.reply("hosted.ack", {"model": item.live.record["name"],
                                                                    "diff_id": item.rec["diff_id"],
                                                                    "cycle": item.cycle, "duplicate": False}))

    def _record(self, tx, item: _Folded) -> None:
        """An accepted diff's record and its ticket's use (inside the group commit)."""
        name, client, rec = item.live.record["name"], item.msg.sender, item.rec
        tx.put(DIFFS, diff_key(name, item.cycle, client, rec["ticket"]), rec)
        tx.put(TICKETS, f"{name}/{client}", {"ticket": rec["ticket"], "diff_id": rec["diff_id"], "cycle": item.cycle,
                                             "version": item.version})
        seen = tx.get(CLIENTS, client) or {}
        tx.put(CLIENTS, client, {**seen, "diffs": seen.get("diffs", 0) + 1, "last": rec["at"]})

    def _check_diff(self, live: _Live, tensors: Mapping) -> None:
        """The whole diff, checked before anything is written: names, size, dtypes, shapes, finiteness."""
        spec = getattr(tensors, "spec", None)
        self._check_layout(live, {n: spec(n) if spec else (tensors[n].dtype, tuple(tensors[n].shape),
                                                           tensors[n].numel() * tensors[n].element_size())
                                  for n in tensors})
        for n in sorted(tensors):
            if not live.glob[n].is_floating_point():
                continue
            if isinstance(tensors, TensorMap):
                views = [v for _, v in tensors.pieces(n)]
            else:  # in pieces too: a float64 sum of a whole large tensor makes a temporary of twice its size
                flat = tensors[n].reshape(-1)
                step = max(1, self.chunk_bytes // flat.element_size())
                views = [flat[i : i + step] for i in range(0, flat.numel(), step)]
            # A sum is NaN or infinite if any element is: one pass, no temporary tensor. In float32
            # (a quarter of float64's cost here); one that overflows on finite values is checked in full.
            for v in views:
                if not bool(torch.isfinite(v.sum(dtype=torch.float32))) and not bool(torch.isfinite(v).all()):
                    raise HostedError(f"tensor {n!r} holds NaN or infinity", code="non_finite",
                                      details={"tensor": n})

    @staticmethod
    def _check_layout(live: _Live, specs: Mapping[str, tuple]) -> None:
        """A diff's names, size, dtypes and shapes (``name -> (dtype, shape, nbytes)``) against the model."""
        names = set(specs)
        total = sum(nbytes for _, _, nbytes in specs.values())
        if total > min(live.config.max_diff_bytes, live.nbytes):
            raise HostedError(f"a diff of {total} bytes is larger than the model ({live.nbytes} bytes)",
                              code="oversize")
        if names != set(live.layout):
            extra, missing = sorted(names - set(live.layout)), sorted(set(live.layout) - names)
            what = f"tensor {extra[0]!r} is not in the model" if extra else f"tensor {missing[0]!r} is missing"
            raise HostedError(f"the diff does not match the model: {what}", code="bad_diff")
        for n in sorted(names):
            dtype, shape, _ = specs[n]
            want_dtype, want_shape = live.layout[n]
            if DTYPE_NAMES.get(dtype) != want_dtype:
                raise HostedError(f"tensor {n!r} is {DTYPE_NAMES.get(dtype, dtype)}, the model's is {want_dtype}",
                                  code="bad_dtype", details={"tensor": n})
            if tuple(shape) != want_shape:
                raise HostedError(f"tensor {n!r} has shape {tuple(shape)}, the model's is {want_shape}",
                                  code="bad_shape", details={"tensor": n})

    def _fold(self, live: _Live, diff: Mapping, rec: dict) -> None:
        """Add ``global + diff`` (bool tensors: the diff is the value) to the aggregator."""
        update = {}
        for n, g in live.glob.items():
            d = diff[n]
            update[n] = d if g.dtype == torch.bool else torch.add(g, d.reshape(g.shape), out=live.scratch[n])
        live.agg.add(update, rec["weight"], f"{rec['client']}/{rec['ticket']}")


def create_model(home: Home, state: HostStore, name: str, plan, *, model_args: dict | None = None,
                 training_args: dict | None = None, server: dict | ServerConfig | None = None,
                 plan_class: str | None = None, initial: Mapping[str, torch.Tensor] | None = None,
                 seed: int = 0) -> dict:
    """Add ``plan`` (a TorchTrainingPlan subclass, or its source with ``plan_class``) as model ``name``.

    Version 0 is ``initial`` or the plan's ``init_model(**model_args)`` under ``seed``;
    ``training_args`` reach every client; ``server`` is a :class:`ServerConfig` or its dict.
    Works on a home whose host is not running (``meshfl host add-model``); a running host picks
    the model up within a second.
    """
    from ..node._plans import plan_hash

    check_model_name(name)
    source = plan if isinstance(plan, str) else plan_source(plan)
    cls_name = plan_class or (None if isinstance(plan, str) else plan.__name__)
    if not cls_name:
        raise ConfigError("plan_class is needed with a plan's source", code="bad_config")
    config = server if isinstance(server, ServerConfig) else ServerConfig.from_dict(server)
    model_args = dict(model_args or {})
    training_args = {**DEFAULT_TRAINING_ARGS, **(training_args or {})}
    try:
        plan_cls = load_plan_class(source, cls_name, f"meshfl_hosted_{name}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = plan_cls().init_model(**model_args)
    except Exception as exc:
        raise ConfigError(f"the plan cannot build its model: {type(exc).__name__}: {exc}", code="bad_plan") from None
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in (initial or module.state_dict()).items()}
    parameters = [k for k, p in module.named_parameters() if p.requires_grad]
    agg = make_aggregator(config.aggregator)
    record = {"name": name, "plan_source": source, "plan_class": cls_name, "plan_hash": plan_hash(source),
              "model_args": model_args, "training_args": training_args, "server": config.to_dict(),
              "parameters": parameters, "version": 0, "created": time.time(), "aggregator": agg.config()}
    digest = tensors_hash(tensors)
    if home.store.read(lambda tx: tx.has(MODELS, name)):
        raise HostedError(f"a model named {name!r} is hosted already", code="model_exists")
    state.blobs.write(model_blob(name, 0), tensors)
    now = time.time()
    cycle = _new_cycle(0, 0, now, config)

    def write(tx) -> None:
        if tx.has(MODELS, name):
            raise HostedError(f"a model named {name!r} is hosted already", code="model_exists")
        tx.put(MODELS, name, record)
        tx.put(VERSIONS, version_key(name, 0), {"version": 0, "hash": digest, "created": now, "diffs": 0,
                                                "clients": 0, "samples": 0, "staleness": {}, "metrics": {}})
        tx.put(CYCLES, name, cycle)
        bump(tx)
        home.audit.append("hosted.add_model", model=name, plan_hash=record["plan_hash"], mode=config.mode,
                          version_hash=digest)

    home.store.atomic(write)
    log.info("[%s] hosting %s (%s mode, plan %s)", home.config.name, name, config.mode, record["plan_hash"][:12])
    return {"name": name, "version": 0, "version_hash": digest, "plan_hash": record["plan_hash"]}


def enroll_cards(home: Home, cards: Iterable[PeerCard], via: str) -> int:
    """Trust clients' cards in one transaction with one audit record; returns how many are new."""
    cards = list(cards)

    def write(tx) -> int:
        return enroll_in(tx, home, cards, via)

    return home.store.atomic(write)


def enroll_in(tx, home: Home, cards: list, via: str) -> int:
    """:func:`enroll_cards` inside a transaction (a token's redemption adds its own records)."""
    now, new = time.time(), 0
    for card in cards:
        if card.peer_id == home.identity.peer_id:
            raise ConfigError("a host does not enroll its own key", code="self_trust")
        old = tx.get(CLIENTS, card.peer_id)
        if old is None or old.get("revoked"):
            new += 1
        tx.put(CLIENTS, card.peer_id, {**(old or {}), "card": card.to_text(), "name": card.name, "enrolled": now,
                                       "via": via, "revoked": False})
    bump(tx)
    home.audit.append("hosted.enroll", count=len(cards), new=new, via=via,
                      peer_ids=[c.peer_id for c in cards][:20])
    return new


def revoke_in(home: Home, peer_id: str) -> bool:
    def write(tx) -> bool:
        old = tx.get(CLIENTS, peer_id)
        if old is None or old.get("revoked"):
            return False
        tx.put(CLIENTS, peer_id, {**old, "revoked": True, "revoked_at": time.time()})
        bump(tx)
        home.audit.append("hosted.revoke", peer_id=peer_id)
        return True

    return home.store.atomic(write)


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor holding NaN or infinity, if any (a sum first, as for a diff: no
    temporary unless it overflows)."""
    for n in sorted(tensors):
        t = tensors[n]
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))) \
                and not bool(torch.isfinite(t).all()):
            return n
    return None


def _new_cycle(number: int, version: int, now: float, config: ServerConfig) -> dict:
    return {"cycle": number, "version": version, "opened": now,
            "deadline": now + config.cycle_length if config.mode == "cycle" else None, "extended": 0}


def _ticket_key(tx) -> str:
    """The host's secret for ticket MACs, made once and kept in its store."""
    key = tx.get(META, "ticket_key")
    if key is None:
        key = os.urandom(32).hex()
        tx.put(META, "ticket_key", key)
    return key


def _metrics(metrics: dict) -> dict:
    if len(metrics) > MAX_METRICS:
        raise HostedError(f"at most {MAX_METRICS} metrics", code="bad_diff")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or len(k) > 64 or isinstance(v, bool) or not isinstance(v, (int, float)) \
                or not math.isfinite(v):
            raise HostedError(f"metric {k!r} must be a finite number", code="bad_diff")
        out[k] = float(v)
    return out


def _small(capabilities: dict) -> dict:
    """What a client says it can do, kept (bounded) with its ticket."""
    return {str(k)[:32]: v for k, v in list(capabilities.items())[:16] if isinstance(v, (str, int, float, bool))}


__all__ = ["Host", "create_model", "enroll_cards"]
