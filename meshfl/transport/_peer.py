"""Peer: the one transport abstraction (design §1).

A peer binds a ROUTER when it has a listen address and opens one DEALER to each peer it dials, so a
node behind a hospital firewall only ever dials out. Whichever way a link goes, ``send(peer_id,
msg)`` reaches the peer: through the DEALER we dialed, else through our ROUTER by routing id.

Threads: one I/O thread owns every socket (ZeroMQ sockets are not thread-safe); callers hand it
work through a queue and a wake-up pipe, so the public API is thread-safe. Incoming requests go to
one dispatcher thread that runs the user's handler, so a slow handler never stalls the sockets;
a peer whose handlers never wait (a host's, a researcher's) runs them on the I/O thread instead (``inline``).
Replies are matched to requests by message id and resolve ``concurrent.futures.Future`` objects.

Security: CURVE on every link by default. Our ZAP handler admits only keys in the trust table; each
received message's ZAP user id (the authenticated peer id) must equal the routing id it claims
and the sender its envelope names, and must still be trusted (so a revoked key is cut off at once).
libzmq runs no security over ``inproc://``, so CURVE over inproc is refused rather than pretended.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..crypto import Identity, PeerCard
from ..errors import (
    ConfigError,
    MeshflError,
    NotTrusted,
    PeerUnavailable,
    RemoteError,
    RequestTimeout,
    TransportError,
    WireError,
)
from ..wire import DEFAULT_FRAME_BYTES, DEFAULT_LIMITS, Limits, Message, declare, decode, encode, error_message, peek_id
from ._ratelimit import RateLimitedLog
from ._trust import TrustTable
from ._zap import ZAP_ENDPOINT, zap_decide

declare("hello", required={"name": "str"})
declare("hb")

Handler = Callable[[Message], "Message | None"]
LinkCallback = Callable[[str, bool], None]

#: Messages taken from one socket per turn of the I/O loop (the poll reports what is left): in a
#: flood, sends queued by other threads and the heartbeat still get their turn.
_RECV_BATCH = 64

_DEALER_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
_DEALER_EVENTS |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class _PeerLog(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['peer']}] {msg}", kwargs


@dataclass
class _Pending:
    future: Future
    dest: str
    type: str
    deadline: float


@dataclass(frozen=True)
class LinkInfo:
    peer_id: str
    name: str
    outbound: bool
    up: bool
    last_seen: float | None


class Peer:
    """A meshfl endpoint: ROUTER inbox (optional), one DEALER per dialed peer, request/reply."""

    def __init__(
        self,
        identity: Identity,
        *,
        listen: str | None = None,
        curve: bool = True,
        handler: Handler | None = None,
        on_link: LinkCallback | None = None,
        limits: Limits = DEFAULT_LIMITS,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        heartbeat: float = 1.0,
        dead_after: float = 5.0,
        context: zmq.Context | None = None,
        inline: bool = False,
        ping_dialers: bool = True,
    ) -> None:
        """``inline``: run the handler and ``on_link`` on the I/O thread itself, not the
        dispatcher: two thread hand-offs less per request, for handlers that never wait on the
        network (a host's, a researcher's).
        ``ping_dialers=False``: no libzmq heartbeat on the ROUTER's connections; TCP keepalive
        finds dead ones instead. libzmq cancels a heartbeat timer by a linear search of all its
        timers, so with thousands of connections pinging each one costs O(connections) (a host's
        light clients: 14 % of its CPU at 1 000 clients)."""
        if curve and listen and listen.startswith("inproc://"):
            raise ConfigError("libzmq runs no CURVE over inproc://; use ipc:// or tcp://, or curve=False")
        if curve and context is not None:
            raise ConfigError("a shared context is only for insecure inproc meshes (curve=False)")
        self.identity = identity
        self.peer_id = identity.peer_id
        self.name = identity.name
        self.curve = curve
        self.limits = limits
        self.frame_bytes = frame_bytes
        self.trust_table = TrustTable()
        self.log = _PeerLog(logging.getLogger("meshfl.transport"), {"peer": self.name})
        self._noisy = RateLimitedLog(self.log)  # warnings a peer can cause at will (I/O thread only)
        self._listen = listen
        self._handler = handler
        self._routes: dict[str, Handler] = {}
        self._on_link = on_link
        self._heartbeat = heartbeat
        self._dead_after = dead_after
        self._own_context = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._links_lock = threading.Condition()
        self._dealers: dict[str, zmq.Socket] = {}
        self._dealer_of: dict[zmq.Socket, str] = {}
        self._monitors: dict[zmq.Socket, str] = {}
        self._dealer_up: set[str] = set()
        self._redial_at: dict[str, float] = {}
        self._redial_delay: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}
        self._names: dict[str, str] = {}
        self._online: set[str] = set()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._closed = False
        self.endpoint: str | None = None
        self._io = threading.Thread(target=self._io_main, name=f"meshfl-io-{self.name}", daemon=True)
        self._inline = inline
        self._ping_dialers = ping_dialers
        self._io_ident: int | None = None
        self._dispatcher = threading.Thread(target=self._dispatch_main, name=f"meshfl-dispatch-{self.name}", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Peer":
        self._io.start()
        self._dispatcher.start()
        self._ready.wait()
        if self._start_error is not None:
            self.close()
            raise self._start_error
        if not self.curve:
            self.log.warning("CURVE is off: links are neither authenticated nor encrypted (development only)")
        return self

    def close(self, linger: float = 0.5) -> None:
        """Stop both threads and close every socket; pending requests fail with TransportError."""
        if self._closed:
            return
        self._closed = True
        if self._io.is_alive():
            self._command("stop", linger)
            self._io.join()
        if self._dispatcher.is_alive():
            self._inbox.put(None)
            self._dispatcher.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(TransportError(f"peer {self.name} closed before {p.dest} replied"))

    def __enter__(self) -> "Peer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ trust and links
    def trust(self, card: PeerCard, endpoint: str | None = None) -> None:
        """Admit ``card``'s keys; with an endpoint, also dial it (and keep redialing)."""
        self.trust_table.add(card, endpoint)
        self._names[card.peer_id] = card.name
        if endpoint:
            self._command("connect", card.peer_id)

    def revoke(self, peer_id: str) -> bool:
        """Forget a peer: its link is closed and anything it still sends is dropped."""
        removed = self.trust_table.remove(peer_id)
        self._command("disconnect", peer_id)
        return removed

    def is_online(self, peer_id: str) -> bool:
        with self._links_lock:
            return peer_id in self._online

    def online(self) -> list[str]:
        with self._links_lock:
            return sorted(self._online)

    def wait_online(self, peer_ids, timeout: float) -> bool:
        """Block until every peer in ``peer_ids`` has a live link, or ``timeout`` passes."""
        wanted = set(peer_ids)
        return self.wait_links(lambda online: wanted <= online, timeout)

    def wait_links(self, predicate: Callable[[set], bool], timeout: float) -> bool:
        """Block until ``predicate(set of online peer ids)`` holds, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with self._links_lock:
            while not predicate(set(self._online)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._links_lock.wait(left)
        return True

    def links(self) -> list[LinkInfo]:
        with self._links_lock:
            ids = set(self._dealers) | set(self._last_seen)
            return [
                LinkInfo(pid, self._names.get(pid, pid), pid in self._dealers, pid in self._online, self._last_seen.get(pid))
                for pid in sorted(ids)
            ]

    # ------------------------------------------------------------------ messaging
    def route(self, mtype: str, handler: Handler) -> None:
        """Hand messages of type ``mtype`` to ``handler`` instead of the peer's main handler, so a
        layer on top (the overlay) plugs in without the main handler knowing about it."""
        self._routes[mtype] = handler

    def send(self, dest: str, msg: Message) -> Future:
        """Queue ``msg`` for ``dest``; the future resolves once libzmq has it (or fails: no link)."""
        fut: Future = Future()
        self._command("send", dest, self._encode(msg), fut)
        return fut

    def request(self, dest: str, msg: Message, timeout: float = 30.0) -> Future:
        """Send a request; the future resolves to the reply, or RemoteError / RequestTimeout."""
        fut: Future = Future()
        with self._pending_lock:
            self._pending[msg.id] = _Pending(fut, dest, msg.type, time.monotonic() + timeout)
        self._command("send", dest, self._encode(msg), None, msg.id)
        return fut

    def call(self, dest: str, msg: Message, timeout: float = 30.0) -> Message:
        """Blocking :meth:`request`."""
        return self.request(dest, msg, timeout).result()

    def reply(self, to: Message, msg: Message) -> Future:
        msg.reply_to = to.id
        return self.send(to.sender, msg)

    def _encode(self, msg: Message) -> list:
        msg.sender = self.peer_id
        return encode(msg, self.frame_bytes)

    def _command(self, *cmd: Any) -> None:
        if self._closed and cmd[0] != "stop":
            raise TransportError(f"peer {self.name} is closed")
        if cmd[0] == "send" and self._io_ident == threading.get_ident():  # a send made on the I/O thread
            stop = self._drain_commands()  # first what other threads queued before, in order
            if stop is not None:  # close() asked the I/O thread to stop: it still will
                self._cmds.put(("stop", stop))
            self._send_now(*cmd[1:])
            return
        self._cmds.put(cmd)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # ------------------------------------------------------------------ I/O thread
    def _io_main(self) -> None:
        self._io_ident = threading.get_ident()
        self._poller = zmq.Poller()
        self._router = None
        self._zap = None
        try:
            if self._listen:
                self._bind()
        except BaseException as exc:  # reported to start()
            self._start_error = exc if isinstance(exc, MeshflError) else ConfigError(f"cannot listen on {self._listen}: {exc}")
            self._ready.set()
            self._teardown(0)
            return
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._ready.set()
        next_beat = time.monotonic()
        linger = 0.5
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._beat(now)
                next_beat = now + self._heartbeat
            timeout = max(0.0, min(next_beat, self._next_deadline()) - time.monotonic())
            try:
                events = dict(self._poller.poll(timeout * 1000))
            except zmq.ZMQError as exc:
                self.log.error("poll failed: %s", exc)
                continue
            if self._wake_r in events:
                stop = self._run_commands()
                if stop is not None:
                    linger = stop
                    break
            for sock in events:
                if sock == self._wake_r:  # an fd: ints above 256 are not interned, never use "is"
                    continue
                if sock is self._zap:
                    self._answer_zap()
                elif sock is self._router:
                    self._recv_router()
                elif sock in self._monitors:
                    self._monitor_event(sock)
                else:
                    self._recv_dealer(sock)
            self._expire_requests()
        self._teardown(linger)

    def _configure(self, sock: zmq.Socket) -> None:
        sock.linger = 500
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self._heartbeat * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self._dead_after * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(self._dead_after * 1000))

    def _bind(self) -> None:
        if self.curve:
            self._zap = self._ctx.socket(zmq.REP)
            self._zap.bind(ZAP_ENDPOINT)
            self._poller.register(self._zap, zmq.POLLIN)
        router = self._ctx.socket(zmq.ROUTER)
        self._configure(router)
        if not self._ping_dialers:
            router.setsockopt(zmq.HEARTBEAT_IVL, 0)
            router.setsockopt(zmq.TCP_KEEPALIVE, 1)
            router.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, round(self._dead_after)))
            router.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, round(self._heartbeat)))
            router.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.curve:
            router.curve_server = True
            router.curve_secretkey = self.identity.link_secret_z85
            router.curve_publickey = self.identity.link_public_z85
            router.zap_domain = b"meshfl"
        try:
            router.bind(self._listen)
        except zmq.ZMQError:
            router.close(0)  # else the context could never terminate
            raise
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router = router
        self._poller.register(router, zmq.POLLIN)
        self.log.info("listening on %s (curve=%s)", self.endpoint, self.curve)

    def _teardown(self, linger: float) -> None:
        self._noisy.flush(everything=True)
        ms = int(linger * 1000)
        for sock in list(self._monitors):
            sock.close(0)
        for sock in list(self._dealers.values()):
            sock.close(ms)
        if self._router is not None:
            self._router.close(ms)
        if self._zap is not None:
            self._zap.close(0)
        self._monitors.clear()
        self._dealers.clear()
        self._dealer_of.clear()
        if self._own_context:
            self._ctx.term()

    def _run_commands(self) -> float | None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        return self._drain_commands()

    def _drain_commands(self) -> float | None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return None
            op = cmd[0]
            if op == "stop":
                return cmd[1]
            if op == "send":
                self._send_now(*cmd[1:])
            elif op == "connect":
                self._dial(cmd[1])
            elif op == "disconnect":
                self._hang_up(cmd[1])

    def _dial(self, peer_id: str) -> None:
        entry = self.trust_table.get(peer_id)
        if entry is None or not entry.endpoint:
            return
        self._hang_up(peer_id)
        sock = self._ctx.socket(zmq.DEALER)
        self._configure(sock)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        sock.routing_id = self.peer_id.encode()
        if self.curve:
            sock.curve_secretkey = self.identity.link_secret_z85
            sock.curve_publickey = self.identity.link_public_z85
            sock.curve_serverkey = entry.card.link_key_z85
        monitor = sock.get_monitor_socket(_DEALER_EVENTS)
        sock.connect(entry.endpoint)
        self._dealers[peer_id] = sock
        self._dealer_of[sock] = peer_id
        self._monitors[monitor] = peer_id
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)
        self.log.info("dialing %s at %s", entry.card.name, entry.endpoint)
        if entry.endpoint.startswith("inproc://"):
            self._link_up(peer_id)  # inproc has no handshake, hence no monitor event

    def _link_up(self, peer_id: str) -> None:
        # libzmq's own reconnect may succeed after failed handshakes scheduled a redial: that
        # redial would tear this working link down (losing what is queued on it), so drop it.
        self._redial_at.pop(peer_id, None)
        self._redial_delay.pop(peer_id, None)
        self._dealer_up.add(peer_id)
        hello = encode(Message("hello", {"name": self.name}, sender=self.peer_id))
        self._dealers[peer_id].send_multipart(hello, flags=zmq.DONTWAIT)
        self._set_online(peer_id, True)

    def _hang_up(self, peer_id: str) -> None:
        self._redial_at.pop(peer_id, None)
        sock = self._dealers.pop(peer_id, None)
        if sock is not None:
            del self._dealer_of[sock]
            for mon, pid in list(self._monitors.items()):
                if pid == peer_id:
                    self._poller.unregister(mon)
                    del self._monitors[mon]
                    sock.disable_monitor()
                    mon.close(0)
            self._poller.unregister(sock)
            sock.close(0)
        self._dealer_up.discard(peer_id)
        self._last_seen.pop(peer_id, None)
        self._set_online(peer_id, False)

    def _send_now(self, dest: str, frames: list, fut: Future | None, request_id: str | None = None) -> None:
        try:
            if self.curve and dest not in self.trust_table:
                raise NotTrusted(f"peer {dest} is not trusted")
            sock = self._dealers.get(dest)
            if sock is not None:
                if dest not in self._dealer_up:
                    raise PeerUnavailable(f"no live link to {self._names.get(dest, dest)} yet")
                sock.send_multipart(frames, flags=zmq.DONTWAIT, copy=False)
            elif self._router is not None:
                self._router.send_multipart([dest.encode(), *frames], flags=zmq.DONTWAIT, copy=False)
            else:
                raise PeerUnavailable(f"no link to {dest}")
        except (zmq.Again, zmq.ZMQError, MeshflError) as exc:
            err = exc if isinstance(exc, MeshflError) else PeerUnavailable(f"cannot reach {self._names.get(dest, dest)}: {exc}")
            if request_id is not None:
                with self._pending_lock:
                    p = self._pending.pop(request_id, None)
                fut = p.future if p else None
            if fut is not None and not fut.done():
                fut.set_exception(err)
            return
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _beat(self, now: float) -> None:
        """App heartbeat on dialed links (so the far ROUTER sees us), expiry of silent ones, redials."""
        self._noisy.flush()
        for pid, when in list(self._redial_at.items()):
            if when <= now:
                del self._redial_at[pid]
                self._dial(pid)
        if self._dealer_up:
            hb = encode(Message("hb", sender=self.peer_id), self.frame_bytes)
            for pid in list(self._dealer_up):
                try:
                    self._dealers[pid].send_multipart(hb, flags=zmq.DONTWAIT)
                except zmq.ZMQError:
                    pass
        for pid, seen in list(self._last_seen.items()):
            if pid not in self._dealer_up and now - seen > self._dead_after:
                del self._last_seen[pid]
                self._set_online(pid, False)

    def _set_online(self, peer_id: str, up: bool) -> None:
        with self._links_lock:
            changed = (peer_id in self._online) != up
            if up:
                self._online.add(peer_id)
            else:
                self._online.discard(peer_id)
            self._links_lock.notify_all()
        if changed:
            self.log.info("link to %s %s", self._names.get(peer_id, peer_id), "up" if up else "down")
            if self._on_link is not None:
                self._link_event(peer_id, up)

    def _answer_zap(self) -> None:
        request = self._zap.recv_multipart()
        decision = zap_decide(request, self.trust_table.peer_for_link_key)
        if decision.reply:
            self._zap.send_multipart(decision.reply)
        if not decision.allowed:
            key = request[6].hex() if len(request) > 6 else "?"
            self.log.warning("refused connection from %s: %s (key %s)", decision.address, decision.reason, key)

    def _monitor_event(self, mon: zmq.Socket) -> None:
        peer_id = self._monitors[mon]
        event = recv_monitor_message(mon)["event"]
        name = self._names.get(peer_id, peer_id)
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._link_up(peer_id)
        elif event == zmq.EVENT_DISCONNECTED:
            self._dealer_up.discard(peer_id)
            self._set_online(peer_id, False)
        elif peer_id not in self._redial_at:
            # libzmq gives up on a peer that refused our key; try again later, backing off, so a
            # node started before its researcher trusted it still gets in once it is trusted.
            # Failures before that redial (libzmq may keep retrying on its own) add nothing.
            delay = min(30.0, 2 * self._redial_delay.get(peer_id, 0.5))
            self._redial_delay[peer_id] = delay
            self._redial_at[peer_id] = time.monotonic() + delay
            self.log.warning("handshake with %s refused (are we trusted there?); retrying in %.0fs", name, delay)

    def _recv_dealer(self, sock: zmq.Socket) -> None:
        peer_id = self._dealer_of[sock]
        for _ in range(_RECV_BATCH):
            try:
                frames = sock.recv_multipart(flags=zmq.DONTWAIT, copy=False)
            except zmq.Again:
                return
            self._deliver(peer_id, frames, sock, None)

    def _recv_router(self) -> None:
        for _ in range(_RECV_BATCH):
            try:
                frames = self._router.recv_multipart(flags=zmq.DONTWAIT, copy=False)
            except zmq.Again:
                return
            routing_id = frames[0].bytes
            body = frames[1:]
            try:
                claimed = routing_id.decode()
            except UnicodeDecodeError:
                self._noisy.warning("routing", "messages with a non-text routing id",
                                    "dropped a message with a non-text routing id")
                continue
            if self.curve:
                user = body[0].get("User-Id") if body else None
                if user != claimed or claimed not in self.trust_table:
                    self._noisy.warning(("untrusted", user), f"messages from untrusted {user}",
                                        "dropped a message from %s: authenticated as %s, not (or no longer) trusted",
                                        claimed, user)
                    continue
            self._deliver(claimed, body, self._router, routing_id)

    def _deliver(self, sender: str, frames: list, sock: zmq.Socket, routing_id: bytes | None) -> None:
        if self.curve and sender not in self.trust_table:
            return
        was_online = sender in self._online
        self._last_seen[sender] = time.monotonic()
        if not was_online:
            self._set_online(sender, True)
        try:
            msg = decode(frames, self.limits)
            if msg.sender != sender:
                raise WireError(f"envelope names sender {msg.sender!r}, link is {sender!r}", code="bad_envelope")
        except WireError as exc:
            name = self._names.get(sender, sender)
            self._noisy.warning((sender, "bad"), f"bad messages from {name}", "bad message from %s: %s", name, exc)
            head = frames[0].buffer if frames else b""
            if b'"type":"error"' not in bytes(head[:256]):
                reply = encode(error_message(exc.code, exc.message, peek_id(head)), self.frame_bytes)
                reply_frames = reply if routing_id is None else [routing_id, *reply]
                try:
                    sock.send_multipart(reply_frames, flags=zmq.DONTWAIT)
                except zmq.ZMQError:
                    pass
            return
        msg.sender = sender
        if msg.type == "hello":  # the first message on each new connection of a peer that dials us
            self._names[sender] = str(msg.fields.get("name", sender))
            if was_online and self._on_link is not None:
                # It reconnected before it counted as gone: what we had queued on its old
                # connection may be lost, so tell the owner its link is up (again).
                self._link_event(sender, True)
            return
        if msg.type == "hb":
            return
        if msg.reply_to is not None:
            with self._pending_lock:
                pending = self._pending.pop(msg.reply_to, None)
            if pending is not None:
                if msg.type == "error":
                    pending.future.set_exception(RemoteError.from_wire(msg.fields, self._names.get(sender, sender)))
                else:
                    pending.future.set_result(msg)
                return
            if msg.type == "error":
                name = self._names.get(sender, sender)
                self._noisy.warning((sender, "error"), f"unsolicited errors from {name}", "error from %s: %s", name,
                                    msg.fields.get("message"))
                return
        if self._inline:
            self._handle(msg)
        else:
            self._inbox.put(msg)

    def _next_deadline(self) -> float:
        with self._pending_lock:
            return min((p.deadline for p in self._pending.values()), default=float("inf"))

    def _expire_requests(self) -> None:
        now = time.monotonic()
        with self._pending_lock:
            expired = [(mid, p) for mid, p in self._pending.items() if p.deadline <= now]
            for mid, _ in expired:
                del self._pending[mid]
        for _, p in expired:
            who = self._names.get(p.dest, p.dest)
            state = "online" if p.dest in self._online else "offline"
            p.future.set_exception(RequestTimeout(f"no reply from {who} ({state}) to {p.type!r} in time"))

    # ------------------------------------------------------------------ dispatcher thread
    def _dispatch_main(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            if isinstance(item, tuple):
                self._call_on_link(item[1], item[2])
                continue
            self._handle(item)

    def _link_event(self, peer_id: str, up: bool) -> None:
        """Tell the owner a link went up or down, in order with the messages around it: on the
        dispatcher, or at once where the handler runs inline."""
        if self._inline:
            self._call_on_link(peer_id, up)
        else:
            self._inbox.put(("link", peer_id, up))

    def _call_on_link(self, peer_id: str, up: bool) -> None:
        try:
            self._on_link(peer_id, up)
        except Exception:
            self.log.exception("link callback failed")

    def _handle(self, msg: Message) -> None:
        handler = self._routes.get(msg.type, self._handler)
        if handler is None:
            answer: Message | None = error_message("unknown_type", f"{self.name} handles no requests", msg.id)
        else:
            try:
                answer = handler(msg)
            except MeshflError as exc:
                answer = error_message(exc.code, exc.message, msg.id, exc.details)
            except Exception as exc:
                self.log.exception("handler failed on %s", msg.type)
                answer = error_message("internal", f"{msg.type} failed on {self.name}: {type(exc).__name__}", msg.id)
        if answer is not None and not self._closed:
            self.reply(msg, answer)
