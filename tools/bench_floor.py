#!/usr/bin/env python
"""The floor of a round that does the work meshfl's design requires, in a few lines of pyzmq.

Raw pyzmq (tools/bench_wire.py) only moves the bytes. A meshfl round must also make the task
durable before accepting it, train in a separate warm worker process, make the result durable
before sending it, and record the acknowledgement. This script does exactly that, with no
framework around it: K node processes, each with one thread, a CURVE DEALER, an LMDB home
(synced commits, as meshfl's) and a warm worker process fed a JSON line per task, the model
going through a file (no pickling). Per task: the model to a pack file, one synced commit of the
task, the worker's round trip (it maps the pack, adds a delta, writes the result back), one
synced commit of the result, the result sent, and one synced commit of the ack. The researcher
averages the results as they arrive and commits a checkpoint. No audit log, no validation, no
plan hashing, no dataset registry: whatever meshfl costs above this is the framework.

    python tools/bench_floor.py                 # P = 1e5, K = 8, 20 rounds
    python tools/bench_floor.py --params 1e6 --nodes 4

tools/bench_round.py runs it beside meshfl for the small (fixed-cost) case.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
import torch
import zmq

MAP_SIZE = 1 << 30
FRAME = 1 << 20  # tensors travel as 1 MB frames, as meshfl's and raw pyzmq's do
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuPerRound:
    """CPU a round costs, by kind of process: the nodes (``nodes``, their pids), their workers
    (the nodes' child processes) and this process (the researcher). The round is CPU-bound on
    a small machine, so this says where its time goes. :meth:`exclude` takes out this process's
    CPU spent on something else between rounds (the raw-pyzmq round trips)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.workers = [child for pid in nodes for child in _children(pid)]
        self._start = self._now()
        self._excluded = 0.0

    def _now(self) -> tuple[float, float, float]:
        return (sum(map(cpu_s, self.nodes)), sum(map(cpu_s, self.workers)), time.process_time())

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def figures(self, rounds: int) -> dict:
        end = self._now()
        node, worker, own = (b - a for a, b in zip(self._start, end))
        ms = 1000.0 / rounds
        out = {"node_each": node * ms / len(self.nodes), "worker_each": worker * ms / max(1, len(self.workers)),
               "researcher": (own - self._excluded) * ms}
        out["total"] = node * ms + worker * ms + out["researcher"]
        return {k: round(v, 2) for k, v in out.items()}


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _frames(buf) -> list:
    view = memoryview(buf).cast("B")
    return [view[i : i + FRAME] for i in range(0, view.nbytes, FRAME)]


def _worker() -> None:
    torch.set_num_threads(1)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    for line in sys.stdin.buffer:
        path = json.loads(line)["pack"]
        fd = os.open(path, os.O_RDWR)
        try:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) as mm:
                model = torch.frombuffer(mm, dtype=torch.float32).clone()
            model.add_(1e-3)  # the "training"
            os.pwrite(fd, model.numpy().view(np.uint8), 0)
        finally:
            os.close(fd)
        out.write(b'{"ok":true}\n')


def _node(index: int, endpoint: str, server_key: str, home: str) -> None:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = sec, pub, server_key.encode()
    sock.connect(endpoint)
    env = lmdb.open(os.path.join(home, "db"), map_size=MAP_SIZE, max_dbs=2)
    tasks, outbox = env.open_db(b"tasks"), env.open_db(b"outbox")
    worker = subprocess.Popen([sys.executable, __file__, "--child", "worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    pack = os.path.join(home, "task.pack")
    sock.send_multipart([b"hello"])
    while True:
        frames = sock.recv_multipart(copy=False)
        kind = frames[0].bytes
        if kind == b"stop":
            break
        task_id = frames[1].bytes
        if kind == b"ack":
            with env.begin(write=True) as tx:
                tx.delete(task_id, db=outbox)
            continue
        fd = os.open(pack, os.O_WRONLY | os.O_CREAT, 0o600)
        pos = 0
        for frame in frames[2:]:
            pos += os.pwrite(fd, frame.buffer, pos)
        os.close(fd)
        with env.begin(write=True) as tx:
            tx.put(task_id, json.dumps({"state": "running", "pack": pack}).encode(), db=tasks)
        sock.send_multipart([b"accepted", task_id])
        worker.stdin.write(json.dumps({"pack": pack}).encode() + b"\n")
        worker.stdin.flush()
        if not json.loads(worker.stdout.readline()).get("ok"):
            raise RuntimeError("worker failed")
        with env.begin(write=True) as tx:
            tx.put(task_id, b'{"state":"done"}', db=tasks)
            tx.put(task_id, b'{"samples":100}', db=outbox)
        fd = os.open(pack, os.O_RDONLY)
        result = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        os.close(fd)
        sock.send_multipart([b"done", task_id, *_frames(result)], copy=False)
    worker.stdin.close()
    worker.wait()
    sock.close(0)
    ctx.term()


class FloorSide:
    """A ROUTER and K floor node processes (see the module doc); :meth:`round_trip` runs a round."""

    def __init__(self, k: int, root: Path):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        pub, sec = zmq.curve_keypair()
        self.router.curve_server = True
        self.router.curve_publickey, self.router.curve_secretkey = pub, sec
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        (root / "researcher").mkdir(parents=True)
        self.env = lmdb.open(str(root / "researcher"), map_size=MAP_SIZE)
        self.children = []
        for i in range(k):
            home = root / f"floor{i}"
            home.mkdir(parents=True)
            self.children.append(subprocess.Popen(
                [sys.executable, __file__, "--child", "node", str(i), f"tcp://127.0.0.1:{port}", pub.decode(), str(home)]))
        self.router.setsockopt(zmq.RCVTIMEO, 120_000)  # a child that never says hello fails the run
        try:
            self.ids = [self.router.recv_multipart()[0] for _ in range(k)]
        except zmq.Again:
            for child in self.children:
                child.kill()
                child.wait()
            raise RuntimeError("floor nodes did not start") from None
        self.rounds = 0

    def round_trip(self, model: torch.Tensor) -> float:
        """One round on the flat float32 ``model``; returns its seconds."""
        self.rounds += 1
        t0 = time.perf_counter()
        task = b"t%d" % self.rounds
        frames = _frames(model.numpy())
        for rid in self.ids:
            self.router.send_multipart([rid, b"train", task, *frames], copy=False)
        total, done = torch.zeros_like(model), 0
        while done < len(self.ids):
            rid, kind, *rest = self.router.recv_multipart(copy=False)
            if kind.bytes == b"done":
                start = 0
                for frame in rest[1:]:
                    part = torch.frombuffer(frame.buffer, dtype=torch.float32)
                    total[start : start + part.numel()].add_(part, alpha=1.0 / len(self.ids))
                    start += part.numel()
                done += 1
                self.router.send_multipart([rid.bytes, b"ack", task])
        with self.env.begin(write=True) as tx:  # the checkpoint
            tx.put(b"model", total.numpy().tobytes())
        return time.perf_counter() - t0

    def close(self) -> None:
        for rid in self.ids:
            self.router.send_multipart([rid, b"stop", b""])
        for child in self.children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.router.close(0)
        self.ctx.term()
        self.env.close()


def run_floor(params: int, k: int, rounds: int) -> dict:
    """Rounds of tools/bench_floor.py's lean durable baseline (after one warm-up), and the CPU
    they cost by kind of process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as meshfl's researcher does in a round: idle intra-op threads spin
    with tempfile.TemporaryDirectory(prefix="meshfl-bench-floor-") as tmp:
        side = FloorSide(k, Path(tmp))
        try:
            model = torch.zeros(params)
            side.round_trip(model)  # warm-up
            cpu = CpuPerRound([child.pid for child in side.children])
            times = [side.round_trip(model) for _ in range(rounds)]
            cpu_ms = cpu.figures(rounds)
        finally:
            side.close()
            torch.set_num_threads(threads)
    return {"floor_median_round_s": round(statistics.median(times), 4), "floor_round_times_s": [round(t, 4) for t in times],
            "floor_cpu_ms_per_round": cpu_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e5, help="P, float32 parameters (default 1e5)")
    ap.add_argument("--nodes", type=int, default=8, help="K node processes (default 8)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds, after one warm-up (default 20)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "worker":
            _worker()
        else:
            _node(int(args.child[1]), args.child[2], args.child[3], args.child[4])
        return
    figures = run_floor(int(args.params), args.nodes, args.rounds)
    print(json.dumps({"benchmark": "floor", "params": int(args.params), "nodes": args.nodes,
                      "rounds_timed": args.rounds, **figures}))


if __name__ == "__main__":
    main()
