"""Client: the light participant of hosted models, for devices and simulations.

One DEALER socket, CURVE, no LMDB, no threads of its own: it speaks the same messages as any peer
(:mod:`meshfl.hosted._wire`, the wire codec and its limits) but synchronously, request then reply,
so a thousand clients fit in a few processes (they may share one ``zmq.Context``). It is not a
:class:`~meshfl.transport.Peer`: a Peer's I/O and dispatcher threads per endpoint are what a
thousand clients on one machine cannot afford.

Training runs in-process through the node's own :func:`meshfl.node._worker.local_training` (the
plan's ``train``, else the default loop), on the device a node would pick. Plan code runs in this process unsandboxed, so a client runs only a plan it
approved: a local class whose source hashes to the host's plan (``plans=[MyPlan]``), or a hash in
``plans``; ``trust_host_plans=True`` runs whatever the host sends (simulations only).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import zmq

from ..crypto import Identity, PeerCard
from ..errors import HostedError, RemoteError, RequestTimeout, WireError
from ..plans import DEFAULT_TRAINING_ARGS, load_plan_class, plan_source
from ..wire import DEFAULT_FRAME_BYTES, DEFAULT_LIMITS, Limits, Message, decode, encode
from . import _chunks, _wire  # noqa: F401  (declares the hosted messages)
from ._secure import SecureTurn, bound_of

log = logging.getLogger("meshfl.hosted.client")

@dataclass(frozen=True)
class Backoff:
    """The host's "come back in ``retry_in`` seconds" (cycle full, already sent, busy)."""

    retry_in: float
    reason: str

class Client:
    """A light client of one host. ``data`` is ``(x, y)``: this client's private samples."""

    def __init__(self, endpoint: str, host_card: PeerCard, *, identity: Identity | None = None, name: str = "client",
                 data: tuple | None = None, plans: Iterable = (), trust_host_plans: bool = False,
                 context: zmq.Context | None = None, timeout: float = 30.0, limits: Limits = DEFAULT_LIMITS,
                 delay: float = 0.0) -> None:
        from ..node._plans import plan_hash

        self.identity = identity or Identity.generate(name)
        self.peer_id = self.identity.peer_id
        self.card = self.identity.card
        self.host_card = host_card
        self.timeout = timeout
        self.limits = limits
        self.delay = delay  # seconds added to each training (simulated slow devices)
        self._trust_all = trust_host_plans
        self._plans: dict[str, type | None] = {}
        for p in plans:
            if isinstance(p, str):
                self._plans[p] = None
            else:
                self._plans[plan_hash(plan_source(p))] = p
        self._data = data
        self._prepared: dict[str, tuple] = {}
        self._cache: dict[str, dict] = {}  # model -> {"hash", "version", "tensors", "plan", "model_args"}
        self.endpoint = endpoint
        self._own_ctx = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        self._sock: zmq.Socket | None = None
        self._expected: set[str] = set()  # ids of requests in flight on this socket
        self._early: dict[str, Message] = {}  # their replies that came before they were waited for

    def _socket(self) -> zmq.Socket:
        """The DEALER, dialed on first use and again after a timeout: libzmq does not retry a
        handshake the host refused (a key enrolled after the client started)."""
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.routing_id = self.peer_id.encode()
            sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
            sock.curve_secretkey = self.identity.link_secret_z85
            sock.curve_publickey = self.identity.link_public_z85
            sock.curve_serverkey = self.host_card.link_key_z85
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _hang_up(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        self._expected.clear()
        self._early.clear()

    def close(self) -> None:
        self._hang_up()
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one request
    def _send(self, msg: Message) -> None:
        """A one-way message."""
        msg.sender = self.peer_id
        self._socket().send_multipart(encode(msg, DEFAULT_FRAME_BYTES), copy=False)

    def call(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and wait for its reply; an error reply raises RemoteError with its code."""
        return self._post(msg, timeout)()

    def _post(self, msg: Message, timeout: float | None = None) -> Callable[[], Message]:
        """Send a request now; the returned callable waits for its reply (a window of chunk
        requests is several in flight, answered in any order)."""
        msg.sender = self.peer_id
        self._socket().send_multipart(encode(msg, DEFAULT_FRAME_BYTES), copy=False)
        self._expected.add(msg.id)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)

        def wait() -> Message:
            return self._wait(msg, deadline)

        def cancel() -> None:  # given up: its reply, should it come, is dropped
            self._expected.discard(msg.id)
            self._early.pop(msg.id, None)

        wait.cancel = cancel  # type: ignore[attr-defined]
        return wait

    def _wait(self, msg: Message, deadline: float) -> Message:
        reply = self._early.pop(msg.id, None)
        while reply is None:
            left = deadline - time.monotonic()
            sock = self._sock
            if msg.id not in self._expected or sock is None or left <= 0 or not sock.poll(left * 1000):
                self._hang_up()  # the next call dials afresh
                raise RequestTimeout(f"no reply from the host to {msg.type!r} in time")
            frames = sock.recv_multipart(copy=False)
            try:
                got = decode(frames, self.limits)
            except WireError as exc:
                log.warning("bad message from the host: %s", exc)
                continue
            if got.reply_to == msg.id:
                reply = got
            elif got.reply_to in self._expected:
                self._early[got.reply_to] = got
            # else: a late reply to an earlier request that timed out
        self._expected.discard(msg.id)
        if reply.type == "error":
            raise RemoteError.from_wire(reply.fields, self.host_card.name)
        return reply

    def request(self, model: str, capabilities: dict | None = None, pull: bool = False) -> Message | Backoff:
        """Ask to train. With ``pull``, a stale cached copy is replaced by the version the host
        sends with the ticket when it fits one chunk (one round trip less); else :meth:`pull` it."""
        entry = self._cache.get(model)
        reply = self.call(Message("hosted.request", {"model": model, "capabilities": capabilities or {},
                                                     "cached": (entry or {}).get("hash", ""), "pull": pull,
                                                     "plan": entry is None}))
        if reply.type == "hosted.backoff":
            return Backoff(reply.fields["retry_in"], reply.fields["reason"])
        if reply.fields.get("inline"):
            self._send(Message("hosted.pulled", {"model": model}))  # frees the host's transfer slot at once
            self._keep(model, reply.fields, reply.tensors)
        return reply

    def pull(self, model: str, version: int) -> dict:
        """The version's tensors (and the plan, the first time), into this client's cache."""
        f, tensors = _chunks.pull(self._post, self._send, model, version, model not in self._cache,
                                  self.limits.max_message_bytes)  # and the hosted.pulled that frees its slot
        return self._keep(model, f, tensors)

    def _keep(self, model: str, f: dict, tensors) -> dict:
        """A received version into the cache (the plan with it, the first time)."""
        entry = self._cache.get(model)
        if entry is None:
            entry = {"plan": self._plan(f["plan_hash"], f.get("plan_source"), f.get("plan_class")),
                     "plan_hash": f["plan_hash"], "model_args": f.get("model_args") or {}}
        elif f["plan_hash"] != entry["plan_hash"]:
            raise HostedError("the host changed the model's plan", code="plan_not_approved")
        # Inline, the tensors are views of the received frames, kept as they are: nothing here
        # writes to a cached version, and a copy per version cost a page fault per 4 KiB.
        entry.update(hash=f["version_hash"], version=f["version"], tensors={k: tensors[k] for k in tensors})
        self._cache[model] = entry
        return entry

    def push(self, model: str, ticket: str, version: int, diff: dict, samples: int, metrics: dict | None = None,
             diff_id: str | None = None, retries: int = 2) -> Message:
        """Send a diff (in chunks when the host asks for them); a timeout, or chunks that did not
        all get through, is retried with the same diff id (the host counts it once)."""
        diff_id = diff_id or os.urandom(8).hex()
        fields = {"model": model, "ticket": ticket, "diff_id": diff_id, "version": version, "samples": samples,
                  "metrics": metrics or {}}
        for attempt in range(retries + 1):
            try:
                return _chunks.push(self._post, fields, diff)
            except RequestTimeout:
                if attempt == retries:
                    raise
            except RemoteError as exc:
                if exc.code not in _chunks.RETRY_CODES or attempt == retries:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ the whole turn
    def train_once(self, model: str, capabilities: dict | None = None) -> dict | Backoff:
        """Ask, pull if stale, train on the local data, push the diff. Returns the ack's fields
        with this client's metrics, or a :class:`Backoff`."""
        answer = self.request(model, capabilities, pull=True)
        if isinstance(answer, Backoff):
            return answer
        a = answer.fields
        entry = self._cache.get(model)
        if entry is None or entry.get("hash") != a["version_hash"]:
            entry = self.pull(model, a["version"])
        if entry["plan_hash"] != a["plan_hash"]:
            raise HostedError("the host changed the model's plan", code="plan_not_approved")
        if a.get("secure"):
            return self._secure_turn(model, a, entry)
        diff, samples, metrics = self.train(entry, a["training_args"], model)
        ack = self.push(model, a["ticket"], a["version"], diff, samples, metrics)
        return {**ack.fields, "version": a["version"], "metrics": metrics, "samples": samples}

    def train(self, entry: dict, training_args: dict, model: str) -> tuple[dict, int, dict]:
        """Train the cached version on the local data: (trained - received, samples, metrics)."""
        from ..node._worker import local_training, pick_device

        if self._data is None:
            raise HostedError("this client has no data to train on (data=(x, y))", code="bad_request")
        plan = entry["plan"]()
        args = {**DEFAULT_TRAINING_ARGS, **training_args}
        device = pick_device(args, plan.uses_cuda)  # as on a node: "auto" is CUDA where there is one
        train, test = self._split(plan, entry, args)
        train = tuple(t.to(device) if t is not None else None for t in train)
        net = plan.init_model(**entry["model_args"]).to(device)
        start = entry["tensors"]
        net.load_state_dict(start)
        started = time.monotonic()
        metrics = local_training(plan, net, train, args, device)
        if self.delay:
            time.sleep(max(0.0, self.delay - (time.monotonic() - started)))  # a slow device, simulated
        if test[0].shape[0]:
            net.eval()
            metrics.update({f"test_{k}": v for k, v in plan.evaluate(net, tuple(
                t.to(device) if t is not None else None for t in test)).items()})
        state = net.state_dict()
        diff = {k: (state[k].detach().cpu() if v.dtype == torch.bool else state[k].detach().cpu() - v)
                for k, v in start.items()}
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        return diff, int(train[0].shape[0]), metrics

    def _split(self, plan, entry: dict, args: dict) -> tuple:
        """This client's (train, test) samples for the plan, prepared once."""
        key = entry["plan_hash"]
        if key not in self._prepared:
            x, y = plan.preprocess(*self._data)
            self._prepared = {key: plan.split(x, y, float(args["test_fraction"]), int(args["seed"]))}
        return self._prepared[key]

    def _secure_turn(self, model: str, accepted: dict, entry: dict) -> dict:
        """A secure cycle (:mod:`meshfl.hosted._secure`): set up with the other members through the
        host, train, push only the masked vector, reveal for the survivors."""
        if self._data is None:
            raise HostedError("this client has no data to train on (data=(x, y))", code="bad_request")
        args = {**DEFAULT_TRAINING_ARGS, **accepted["training_args"]}
        samples = int(self._split(entry["plan"](), entry, args)[0][0].shape[0])
        turn = SecureTurn(self.identity, self.host_card.peer_id, model)
        wait = lambda reply: float(reply.fields["deadline_in"]) + self.timeout  # noqa: E731  (parked by the host)
        roster = self.call(Message("hosted.setup", {"model": model, "ticket": accepted["ticket"],
                                                    "bound": bound_of(samples)}), accepted["deadline_in"] + self.timeout)
        keys = self.call(turn.key_message(roster.fields), wait(roster))
        turn.take_keys(keys)
        diff, samples, metrics = self.train(entry, accepted["training_args"], model)
        vector, names = turn.mask(diff, samples, metrics)
        ack = self.push(model, accepted["ticket"], accepted["version"], vector, 0)
        survivors = self.call(Message("hosted.reveal", {"model": model, "session": turn.session.session,
                                                        "metric_names": names}), wait(keys))
        self.call(turn.shares_message(survivors.fields))
        return {**ack.fields, "version": accepted["version"], "metrics": metrics, "samples": samples, "secure": True}

    def _plan(self, digest: str, source: str | None, cls_name: str | None) -> type:
        if digest in self._plans and self._plans[digest] is not None:
            return self._plans[digest]  # the client's own class: no code from the network runs
        if digest not in self._plans and not self._trust_all:
            raise HostedError(f"this client has not approved plan {digest[:12]}", code="plan_not_approved")
        if not source or not cls_name:
            raise HostedError("the host sent no plan source", code="bad_request")
        from ..node._plans import plan_hash

        if plan_hash(source) != digest:
            raise HostedError("the plan source does not match its hash", code="plan_not_approved")
        return load_plan_class(source, cls_name, f"meshfl_hosted_plan_{digest[:16]}")


__all__ = ["Backoff", "Client"]
