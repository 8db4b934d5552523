#!/usr/bin/env python
"""Peer benchmark: one listening Peer and many CURVE DEALERs, as a host and its light clients.

Two figures, each against a baseline measured in the same run:

- Request/reply: ``--clients`` DEALERs (one process) each send a ping, all at once, and wait for
  every pong; ``--rounds`` such rounds, a Peer running its handler on the dispatcher thread and one
  running it on its I/O thread (``inline``) taking turns. ``inline_cpu_ratio`` = the inline
  server's CPU per round / the dispatcher's (below 1: the two thread hand-offs it saves).
- Idle: the clients stay connected and send nothing for ``--idle`` seconds; the server's CPU, in
  percent of one core, with libzmq heartbeats on the ROUTER (the default) and without
  (``ping_dialers=False``, as a host runs).

    python tools/bench_peer.py                      # 1 000 clients, about a minute on 2 cores
    python tools/bench_peer.py --clients 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

import meshfl.protocol  # noqa: E402,F401  (declares ping and pong)
from meshfl.crypto import Identity  # noqa: E402
from meshfl.transport import Peer  # noqa: E402
from meshfl.wire import Message, encode  # noqa: E402


def clients_main(endpoint: str, server_key: str, rounds: int) -> None:
    """The DEALERs, keys from stdin: connect, then on each line of stdin run that many rounds
    (0: stay connected, silent, until stdin closes) and print the median round time."""
    ctx = zmq.Context()
    ctx.max_sockets = 100_000
    socks, pings = [], []
    for line in sys.stdin.readline().split(";"):
        public, secret, peer_id = line.split()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = peer_id.encode()
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public.encode(), secret.encode(), server_key.encode()
        s.connect(endpoint)
        socks.append(s)
        pings.append(encode(Message("ping", sender=peer_id)))
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)

    def one_round() -> float:
        start = time.perf_counter()
        for s, ping in zip(socks, pings):
            s.send_multipart(ping)
        answered = 0
        while answered < len(socks):
            events = poller.poll(60_000)
            if not events:
                raise SystemExit("the server stopped answering")
            for s, _ in events:
                s.recv_multipart()
                answered += 1
        return time.perf_counter() - start

    one_round()  # every connection up and warm
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        times = [one_round() for _ in range(n)]
        print(json.dumps(statistics.median(times) if times else 0.0), flush=True)
    for s in socks:
        s.close()
    ctx.term()


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class Side:
    """A listening Peer and a process of DEALERs connected to it."""

    def __init__(self, root: Path, tag: str, ids: list[Identity], **options) -> None:
        server = Identity.generate(f"server-{tag}")
        self.peer = Peer(server, listen=f"ipc://{root}/{tag}.sock", handler=self._pong, **options).start()
        for i in ids:
            self.peer.trust(i.card)
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", self.peer.endpoint,
                                      server.link_public_z85.decode()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write(";".join(f"{i.link_public_z85.decode()} {i.link_secret_z85.decode()} {i.peer_id}"
                                       for i in ids) + "\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the clients did not connect")

    def _pong(self, msg: Message) -> Message:
        return Message("pong", {"name": "server", "peer_id": self.peer.peer_id, "role": "bench", "version": "1"})

    def rounds(self, n: int) -> tuple[float, float]:
        """``n`` rounds: (median round seconds, server CPU seconds per round)."""
        before = cpu_s()
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        median = float(self.proc.stdout.readline())
        return median, (cpu_s() - before) / n

    def idle_percent(self, seconds: float) -> float:
        before, start = cpu_s(), time.perf_counter()
        time.sleep(seconds)
        return 100 * (cpu_s() - before) / (time.perf_counter() - start)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.peer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10, help="request/reply rounds per turn")
    ap.add_argument("--turns", type=int, default=4, help="turns of each side (they alternate)")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle measured on each side")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        clients_main(*args.child, args.rounds)
        return
    ids = [Identity.generate(f"c{i}") for i in range(args.clients)]
    out: dict = {"benchmark": "peer", "clients": args.clients, "curve": True}
    with tempfile.TemporaryDirectory(prefix="meshfl-bench-peer-") as tmp:
        # One side at a time: each Peer's I/O thread shares this process's GIL and CPU clock.
        cpu: dict[str, list[float]] = {"dispatcher": [], "inline": []}
        rtt: dict[str, list[float]] = {"dispatcher": [], "inline": []}
        for _ in range(args.turns):
            for mode in cpu:
                side = Side(Path(tmp), mode, ids, inline=mode == "inline")
                try:
                    median, per_round = side.rounds(args.rounds)
                finally:
                    side.close()
                rtt[mode].append(median)
                cpu[mode].append(per_round)
        ratios = [i / d for i, d in zip(cpu["inline"], cpu["dispatcher"])]
        out.update({
            "dispatcher_round_s": round(statistics.median(rtt["dispatcher"]), 4),
            "inline_round_s": round(statistics.median(rtt["inline"]), 4),
            "dispatcher_cpu_s_per_round": round(statistics.median(cpu["dispatcher"]), 4),
            "inline_cpu_s_per_round": round(statistics.median(cpu["inline"]), 4),
            "inline_cpu_ratio": round(statistics.median(ratios), 3),
            "inline_cpu_ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        })
        for pinging in (True, False):
            side = Side(Path(tmp), f"idle-{pinging}", ids, ping_dialers=pinging)
            try:
                out["idle_cpu_percent_" + ("pinging" if pinging else "not_pinging")] = round(
                    side.idle_percent(args.idle), 2)
            finally:
                side.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
