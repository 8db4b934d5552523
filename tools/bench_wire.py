#!/usr/bin/env python
"""Wire benchmark: a dict of float32 tensors (P parameters) to K peer processes and back.

Measures, in the same run and with the same security setting:
  * meshfl: researcher Peer -> K node Peers (separate processes) that echo the tensors back;
  * raw:    plain pyzmq ROUTER -> K DEALER processes echoing the same bytes as 1 MB copy=False
            frames (the best plain pyzmq does here; see shared/notes/limits-measured.md).
Prints one JSON object: median round-trip of each, their ratio, GB/s (bytes out + back), and the
sender's peak RSS in each phase.

    python tools/bench_wire.py                  # P = 5e7, K = 4, CURVE on
    python tools/bench_wire.py --no-curve
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshfl.crypto import Identity, PeerCard  # noqa: E402
from meshfl.transport import Peer  # noqa: E402
from meshfl.wire import Message, declare  # noqa: E402

declare("bench.echo", required={"rep": "int"}, tensors=True)
FRAME = 1 << 20


def make_model(params: int) -> dict[str, torch.Tensor]:
    """A model-like mix: a few big matrices (many frames each) and some small tensors."""
    sizes = [int(params * f) for f in (0.4, 0.3, 0.2)]
    sizes += [max(1, (params - sum(sizes)) // 8)] * 7
    sizes.append(params - sum(sizes))
    return {f"layer{i}.weight": torch.randn(n) for i, n in enumerate(sizes)}


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ----------------------------------------------------------------------------- children
def child_meshfl(endpoint: str, card_text: str, curve: bool) -> None:
    ident = Identity.generate(f"node{os.getpid()}")
    print(ident.card.to_text(), flush=True)

    def echo(msg: Message) -> Message:
        return msg.reply("bench.echo", msg.fields, msg.tensors)

    peer = Peer(ident, curve=curve, handler=echo).start()
    sys.stdin.readline()  # the parent trusts our card, then says go
    peer.trust(PeerCard.from_text(card_text), endpoint)
    sys.stdin.readline()  # the parent closes stdin when done
    peer.close()


def child_raw(endpoint: str, server_key: str, curve: bool) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    if curve:
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = server_key.encode()
    sock.connect(endpoint)
    sock.send(b"ready")
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sys.stdin, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if sock in events:
            frames = sock.recv_multipart(copy=False)
            sock.send_multipart(frames, copy=False)
        else:
            break
    sock.close(0)
    ctx.term()


def spawn(kind: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--child", kind, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def stop(children: list[subprocess.Popen]) -> None:
    for c in children:
        try:
            c.stdin.close()
        except OSError:
            pass
    for c in children:
        try:
            c.wait(timeout=10)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


# ----------------------------------------------------------------------------- the two sides
class MeshflSide:
    """A researcher Peer and K node Peer processes that echo what they receive."""

    def __init__(self, k: int, curve: bool, endpoint: str):
        ident = Identity.generate("researcher")
        self.peer = Peer(ident, listen=endpoint, curve=curve, heartbeat=1.0, dead_after=60.0).start()
        self.children = [spawn("meshfl", self.peer.endpoint, ident.card.to_text(), str(int(curve))) for _ in range(k)]
        self.ids = []
        for c in self.children:
            card = PeerCard.from_text(c.stdout.readline().strip())
            self.peer.trust(card)
            self.ids.append(card.peer_id)
            c.stdin.write("go\n")
            c.stdin.flush()
        if not self.peer.wait_online(self.ids, 60):
            raise RuntimeError("nodes did not connect")

    def round_trip(self, model, rep: int) -> float:
        t0 = time.perf_counter()
        futures = [self.peer.request(pid, Message("bench.echo", {"rep": rep}, model), timeout=600) for pid in self.ids]
        replies = [f.result() for f in futures]
        dt = time.perf_counter() - t0
        assert all(set(r.tensors) == set(model) for r in replies)
        return dt

    def close(self) -> None:
        stop(self.children)
        self.peer.close()


class RawSide:
    """Plain pyzmq: a ROUTER and K DEALER processes echoing 1 MB copy=False frames."""

    def __init__(self, k: int, curve: bool, endpoint: str):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        server_key = "-"
        if curve:
            pub, sec = zmq.curve_keypair()
            self.router.curve_server = True
            self.router.curve_publickey, self.router.curve_secretkey = pub, sec
            server_key = pub.decode()
        self.router.bind(endpoint)
        bound = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.children = [spawn("raw", bound, server_key, str(int(curve))) for _ in range(k)]
        for c in self.children:
            c.stdout.readline()
        self.ids = [self.router.recv_multipart()[0] for _ in range(k)]

    def round_trip(self, model, rep: int) -> float:
        t0 = time.perf_counter()
        frames = []
        for t in model.values():
            raw = memoryview(t.numpy()).cast("B")
            frames.extend(raw[i : i + FRAME] for i in range(0, raw.nbytes, FRAME))
        for rid in self.ids:
            self.router.send_multipart([rid, b"hdr", *frames], copy=False)
        replies = [self.router.recv_multipart(copy=False) for _ in self.ids]
        dt = time.perf_counter() - t0
        assert all(len(r) == len(frames) + 2 for r in replies)
        return dt

    def close(self) -> None:
        stop(self.children)
        self.router.close(0)
        self.ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=5e7, help="P, float32 parameters (default 5e7)")
    ap.add_argument("--peers", type=int, default=4, help="K node processes (default 4)")
    ap.add_argument("--reps", type=int, default=5, help="timed round trips per phase (after one warm-up)")
    ap.add_argument("--no-curve", action="store_true", help="plain links in both phases")
    ap.add_argument("--transport", choices=["tcp", "ipc"], default="tcp")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, endpoint, key, curve = args.child
        (child_meshfl if kind == "meshfl" else child_raw)(endpoint, key, curve == "1")
        return

    torch.set_num_threads(2)
    curve = not args.no_curve
    params = int(args.params)
    model = make_model(params)
    nbytes = sum(t.numel() * 4 for t in model.values())
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))

    def endpoint(tag: str) -> str:
        return "tcp://127.0.0.1:0" if args.transport == "tcp" else f"ipc://{tmp}/meshfl-bench-{os.getpid()}-{tag}.sock"

    base_rss = rss_mb()
    raw_side = RawSide(args.peers, curve, endpoint("raw"))
    mesh_side = MeshflSide(args.peers, curve, endpoint("meshfl"))
    raw, mesh, peaks = [], [], {"raw_pyzmq": 0.0, "meshfl": 0.0}
    try:
        # Alternate the two sides rep by rep (after one warm-up each): a noisy machine then
        # slows both alike, and the ratio holds.
        for rep in range(args.reps + 1):
            for label, side, times in (("raw_pyzmq", raw_side, raw), ("meshfl", mesh_side, mesh)):
                peak_rss_reset()
                dt = side.round_trip(model, rep)
                peaks[label] = max(peaks[label], peak_rss_mb())
                if rep:
                    times.append(dt)
    finally:
        mesh_side.close()
        raw_side.close()
    moved = 2 * nbytes * args.peers
    out = {
        "benchmark": "wire",
        "params": params,
        "peers": args.peers,
        "curve": curve,
        "transport": args.transport,
        "model_mb": round(nbytes / 1e6, 1),
        "reps": args.reps,
        "meshfl_median_s": round(statistics.median(mesh), 4),
        "raw_pyzmq_median_s": round(statistics.median(raw), 4),
        "ratio_meshfl_over_raw": round(statistics.median(mesh) / statistics.median(raw), 3),
        "meshfl_gb_per_s": round(moved / statistics.median(mesh) / 1e9, 3),
        "raw_gb_per_s": round(moved / statistics.median(raw) / 1e9, 3),
        "sender_rss_before_mb": round(base_rss),
        "sender_peak_rss_mb": {k: round(v) for k, v in peaks.items()},
        "meshfl_times_s": [round(t, 4) for t in mesh],
        "raw_times_s": [round(t, 4) for t in raw],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
