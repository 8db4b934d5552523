"""The impairment relay of the network harness (meshfl.testing._relay), on loopback: it delays
each direction by at least its setting, keeps bytes in order under jitter, holds everything while
blackholed and delivers it afterwards, and resets connections on request."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from meshfl.launch.slurm import free_port
from meshfl.testing.netns import ImpairmentRelay


@pytest.fixture
def relay(tmp_path):
    relay = ImpairmentRelay(tmp_path / "relay.sock")
    try:
        yield relay
    finally:
        relay.close()
    assert relay.proc.returncode is not None


class Server:
    """A loopback TCP server that records when bytes arrive and echoes what it is told to."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.conn, _ = self.sock.accept()
        self.accepted.set()

    def recv_exactly(self, n: int, timeout: float = 10.0) -> bytes:
        assert self.accepted.wait(timeout)
        self.conn.settimeout(timeout)
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            assert chunk, "the relay closed the connection"
            data += chunk
        return data

    def close(self) -> None:
        for s in (self.conn, self.sock):
            if s is not None:
                s.close()


@pytest.fixture
def server():
    s = Server()
    try:
        yield s
    finally:
        s.close()


def _dial(link) -> socket.socket:
    sock = socket.create_connection((link.host, link.port), timeout=10)
    sock.settimeout(10)
    return sock


def test_each_direction_waits_at_least_its_delay(relay, server):
    link = relay.add("l", ("127.0.0.1", 0), ("127.0.0.1", server.port), up_ms=80, down_ms=30)
    with _dial(link) as client:
        sent = time.monotonic()
        client.sendall(b"ping")
        assert server.recv_exactly(4) == b"ping"
        up = time.monotonic() - sent
        server.conn.sendall(b"pong")
        assert client.recv(4) == b"pong"
        rtt = time.monotonic() - sent
    assert up >= 0.080 and rtt >= 0.110  # never early; later only by scheduling
    stats = link.stats()
    assert (stats["up_bytes"], stats["down_bytes"]) == (4, 4)


def test_jitter_never_reorders_bytes(relay, server):
    link = relay.add("l", ("127.0.0.1", 0), ("127.0.0.1", server.port), up_ms=5, jitter_ms=5)
    payload = b"".join(i.to_bytes(4, "big") for i in range(2000))
    with _dial(link) as client:
        for i in range(0, len(payload), 40):  # many small writes, each delayed 0-10 ms
            client.sendall(payload[i : i + 40])
        assert server.recv_exactly(len(payload)) == payload


def test_a_blackhole_holds_everything_and_delivers_it_once_lifted(relay, server):
    link = relay.add("l", ("127.0.0.1", 0), ("127.0.0.1", server.port))
    with _dial(link) as client:
        client.sendall(b"before")
        assert server.recv_exactly(6) == b"before"
        link.set(blackhole=True)
        client.sendall(b"during the outage")
        readable, _, _ = select.select([server.conn], [], [], 0.3)
        assert readable == []  # nothing gets through while the blackhole is on
        link.set(blackhole=False)
        assert server.recv_exactly(17) == b"during the outage"  # and nothing was lost


def test_reset_aborts_both_ends(relay, server):
    link = relay.add("l", ("127.0.0.1", 0), ("127.0.0.1", server.port))
    with _dial(link) as client:
        client.sendall(b"x")
        assert server.recv_exactly(1) == b"x"
        assert link.reset() == 1
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        server.conn.settimeout(10)
        with pytest.raises(ConnectionResetError):
            server.conn.recv(1)


def test_a_refused_target_is_refused_by_the_relay_too(relay):
    closed_port = free_port("127.0.0.1")  # below the range a bind to port 0 draws from: no other test listens there
    link = relay.add("l", ("127.0.0.1", 0), ("127.0.0.1", closed_port))
    with pytest.raises(ConnectionResetError):  # (under load the reset can beat connect() back to us)
        with _dial(link) as client:
            client.recv(1)
