"""Real networks for tests: peers in Linux network namespaces, joined by veth pairs.

A :class:`Network` is one *switch* namespace and a namespace per host, each host joined to the
switch by a veth pair (host side ``eth0``, address ``10.77.<i>.2/24``; switch side ``h<i>``,
``10.77.<i>.1``). Peers run in their host's namespace as real processes
(``ip netns exec NS python -m meshfl.cli node start ...``, :meth:`Network.popen`).

- **Bandwidth**: ``add_host(..., rate_mbit=100)`` shapes both directions of the host's link with
  ``tbf`` (this kernel has no ``netem``; ``tbf`` and ``htb`` work).
- **Latency, jitter, faults**: :meth:`Network.relay` opens an impairment relay link
  (:mod:`meshfl.testing._relay`, one process in the switch namespace) on the client host's
  gateway; the client dials the link's :attr:`RelayLink.endpoint`, the relay dials the server.
  :meth:`RelayLink.set` changes delay and jitter or turns the blackhole on and off at any time,
  :meth:`RelayLink.reset` aborts its connections with a TCP RST.
- **Link cuts**: :meth:`Network.cut` / :meth:`Network.restore` take a host's link down and up
  (``ip link set eth0 down``), as an unplugged cable would.
- **Reachability**: a host added with ``inbound=True`` (default) is routed (the switch forwards
  between such hosts); one added with ``inbound=False`` has no route to or from anyone: nothing
  can open a connection to it, and it reaches others only through relay links on its own gateway,
  as a site behind a NAT or a proxy does. It must only dial out.

Every namespace name starts with ``mfl`` and a random suffix, so several networks (other tests,
other users) coexist. :meth:`Network.close` (also on error, as a context manager or the
``network`` fixture) stops every process it started (SIGTERM to its process group, SIGKILL after
a bounded wait), kills whatever still runs in its namespaces, and deletes them (their veths go
with them). Needs root and ``ip`` (iproute2), as CI has.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError

log = logging.getLogger("meshfl.testing")

RELAY_SCRIPT = Path(__file__).with_name("_relay.py")
SUBNET = "10.77"
STOP_TIMEOUT_S = 10.0


def available() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "network namespaces need iproute2 (ip, tc)"
    return None


def _run(argv: Sequence[str], timeout: float = 30.0) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ConfigError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}",
                          code="netns_failed")
    return proc.stdout


def _stop(procs: Sequence[subprocess.Popen], timeout: float) -> None:
    """SIGTERM each process's group, SIGKILL those still there after ``timeout``; reap them all."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        running = [p for p in procs if p.poll() is None]
        for proc in running:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    for proc in procs:
        proc.poll()


class Host:
    """One namespace on the network: its name, address and link."""

    def __init__(self, network_id: str, name: str, index: int, rate_mbit: float | None, inbound: bool):
        self.name, self.index = name, index
        self.namespace = f"{network_id}-{index}"
        self.address = f"{SUBNET}.{index}.2"
        self.gateway = f"{SUBNET}.{index}.1"
        self.switch_port = f"h{index}"
        self.rate_mbit, self.inbound = rate_mbit, inbound

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.namespace} {self.address}>"


class RelayLink:
    """One impaired path from a client host to a server's address, through the relay."""

    def __init__(self, relay: "ImpairmentRelay", name: str, host: str, port: int):
        self.relay, self.name, self.host, self.port = relay, name, host, port

    @property
    def endpoint(self) -> str:
        """What the client dials (a ZeroMQ endpoint)."""
        return f"tcp://{self.host}:{self.port}"

    def set(self, **settings) -> None:
        """Change ``up_ms``, ``down_ms``, ``jitter_ms`` or ``blackhole`` (True/False) now."""
        self.relay.call({"op": "set", "name": self.name, **settings})

    def reset(self) -> int:
        """Abort the link's open connections with a TCP RST; how many there were."""
        return self.relay.call({"op": "reset", "name": self.name})["connections"]

    def stats(self) -> dict:
        """``{"up_bytes", "down_bytes"}`` passed on so far, ``{"up_queued", "down_queued"}`` read and
        waiting (their delay, the blackhole), open ``connections``."""
        return self.relay.call({"op": "stats"})["links"][self.name]


class ImpairmentRelay:
    """The relay process (:mod:`._relay`) and its control socket; ``prefix`` runs it elsewhere
    (``["ip", "netns", "exec", NS]``)."""

    def __init__(self, control: Path, prefix: Sequence[str] = ()) -> None:
        self.control = Path(control)
        self.proc = subprocess.Popen([*prefix, sys.executable, "-I", str(RELAY_SCRIPT), str(control)],
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._sock: socket.socket | None = None
        self._file = None
        try:
            ready = self._wait_ready(15.0)
            if ready != "ready":
                raise ConfigError(f"the impairment relay did not start ({ready!r})", code="netns_failed")
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(15.0)
            self._sock.connect(str(control))
            self._file = self._sock.makefile("rwb")
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return "no answer in time"
        return self.proc.stdout.readline().strip()

    def call(self, command: dict) -> dict:
        self._file.write(json.dumps(command).encode() + b"\n")
        self._file.flush()
        reply = json.loads(self._file.readline() or b'{"ok": false, "error": "the relay is gone"}')
        if not reply.get("ok"):
            raise ConfigError(f"relay: {reply.get('error')}", code="netns_failed")
        return reply

    def add(self, name: str, listen: tuple[str, int], target: tuple[str, int], *, up_ms: float = 0.0,
            down_ms: float = 0.0, jitter_ms: float = 0.0) -> RelayLink:
        reply = self.call({"op": "add", "name": name, "listen": list(listen), "target": list(target),
                           "up_ms": up_ms, "down_ms": down_ms, "jitter_ms": jitter_ms})
        return RelayLink(self, name, listen[0], reply["port"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        _stop([self.proc], STOP_TIMEOUT_S)
        self.proc.stdout.close()
        self.control.unlink(missing_ok=True)


class Network:
    """Hosts in their own network namespaces, joined through a switch namespace."""

    def __init__(self) -> None:
        reason = available()
        if reason is not None:
            raise ConfigError(f"cannot build a namespace network: {reason}", code="netns_unavailable")
        self.id = f"mfl{secrets.token_hex(3)}"
        self.switch = f"{self.id}-sw"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._relay: ImpairmentRelay | None = None
        self._relay_dir = ""

    # ------------------------------------------------------------------ building
    def start(self) -> "Network":
        try:
            self._add_namespace(self.switch)
            self._sysctl(self.switch, "net/ipv4/ip_forward", "1")
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    @staticmethod
    def _sysctl(namespace: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", namespace, "sh", "-c", f"echo {value} > /proc/sys/{key}"])

    def add_host(self, name: str, *, rate_mbit: float | None = None, inbound: bool = True) -> Host:
        """A new namespace linked to the switch; ``rate_mbit`` shapes its link both ways."""
        if name in self.hosts:
            raise ConfigError(f"host {name!r} exists", code="netns_failed")
        index = len(self.hosts)
        if index > 250:
            raise ConfigError("a network holds at most 251 hosts", code="netns_failed")
        host = Host(self.id, name, index, rate_mbit, inbound)
        self._add_namespace(host.namespace)
        _run(["ip", "link", "add", host.switch_port, "netns", self.switch, "type", "veth",
              "peer", "name", "eth0", "netns", host.namespace])
        _run(["ip", "-n", self.switch, "addr", "add", f"{host.gateway}/24", "dev", host.switch_port])
        _run(["ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0"])
        _run(["ip", "-n", self.switch, "link", "set", host.switch_port, "up"])
        _run(["ip", "-n", host.namespace, "link", "set", "eth0", "up"])
        if rate_mbit is not None:
            self._shape(self.switch, host.switch_port, rate_mbit)  # towards the host
            self._shape(host.namespace, "eth0", rate_mbit)  # from the host
        self.hosts[name] = host
        self._route(host)
        if inbound:
            for other in self.hosts.values():
                if other is not host and other.inbound:
                    _run(["ip", "-n", other.namespace, "route", "add", f"{SUBNET}.{index}.0/24",
                          "via", other.gateway])
        return host

    def _route(self, host: Host) -> None:
        """Routes from ``host`` to every other routed host (none for a host without inbound)."""
        if not host.inbound:
            return
        for other in self.hosts.values():
            if other is not host and other.inbound:
                _run(["ip", "-n", host.namespace, "route", "replace", f"{SUBNET}.{other.index}.0/24",
                      "via", host.gateway])

    @staticmethod
    def _shape(namespace: str, device: str, rate_mbit: float) -> None:
        # burst: at least a few ms of traffic, or tbf stalls large (GSO) packets; the queue
        # holds 50 ms at the rate before it drops.
        burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))
        _run(["ip", "netns", "exec", namespace, "tc", "qdisc", "replace", "dev", device, "root", "tbf",
              "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"])

    def relay(self, client: Host, server: Host, port: int, *, delay_ms: float = 0.0, up_ms: float | None = None,
              down_ms: float | None = None, jitter_ms: float = 0.0, name: str | None = None) -> RelayLink:
        """An impaired path for ``client`` to ``server``'s ``port``: the client dials
        :attr:`RelayLink.endpoint` (on its own gateway). ``delay_ms`` is one way, both ways
        (RTT = 2 x delay_ms); ``up_ms`` / ``down_ms`` set client->server / server->client apart."""
        if self._relay is None:  # (a short path: a unix socket's is at most 107 bytes)
            self._relay_dir = tempfile.mkdtemp(prefix=f"{self.id}-")
            self._relay = ImpairmentRelay(Path(self._relay_dir) / "relay.sock", ["ip", "netns", "exec", self.switch])
        return self._relay.add(
            name or f"{client.name}->{server.name}:{port}", (client.gateway, 0), (server.address, port),
            up_ms=delay_ms if up_ms is None else up_ms, down_ms=delay_ms if down_ms is None else down_ms,
            jitter_ms=jitter_ms)

    # ------------------------------------------------------------------ processes and faults
    def popen(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace, in its own process group; stopped by close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", host.namespace, *argv], start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: Host, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``argv`` to its end in ``host``'s namespace."""
        return subprocess.run(["ip", "netns", "exec", host.namespace, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def stop(self, proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM a process started here (its group), SIGKILL after ``timeout``; its exit code."""
        _stop([proc], timeout)
        return proc.returncode

    def cut(self, host: Host) -> None:
        """Take the host's link down (its end of the veth), as an unplugged cable."""
        _run(["ip", "-n", host.namespace, "link", "set", "eth0", "down"])

    def restore(self, host: Host) -> None:
        """Bring the link up again, with the routes the kernel dropped when it went down."""
        _run(["ip", "-n", host.namespace, "link", "set", "eth0", "up"])
        self._route(host)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Stop every process, then delete every namespace (and with them the veths)."""
        _stop(self._procs, STOP_TIMEOUT_S)
        self._procs.clear()
        if self._relay is not None:
            self._relay.close()
            self._relay = None
            shutil.rmtree(self._relay_dir, ignore_errors=True)
        for namespace in reversed(self._namespaces):
            for pid in self._pids(namespace):  # strays: children of the processes above
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                _run(["ip", "netns", "delete", namespace])
            except ConfigError as exc:
                log.warning("%s", exc.message)
        self._namespaces.clear()

    @staticmethod
    def _pids(namespace: str) -> list[int]:
        try:
            return [int(p) for p in _run(["ip", "netns", "pids", namespace]).split()]
        except ConfigError:
            return []

    def leftovers(self) -> list[str]:
        """Namespaces of this network that still exist (none after close())."""
        listed = _run(["ip", "netns", "list"]).split()
        return sorted(n for n in listed if n.startswith(self.id))

    def __enter__(self) -> "Network":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Host", "ImpairmentRelay", "Network", "RelayLink", "available"]
