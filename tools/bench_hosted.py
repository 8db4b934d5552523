#!/usr/bin/env python
"""Hosted-model benchmark: a host process and light clients in several processes, CURVE on.

Part 1, cycles of ``--clients`` clients (each its own key and socket, ``--procs`` processes) on
a model of ``--params`` float32: each client asks, pulls the model and pushes a diff; a cycle
closes at the last one. Baselines: the same bytes (one small request, the model down, the diff
up, a small ack per client) through plain pyzmq ROUTER/DEALER sockets from client processes of
their own, with CURVE on as the host has it (``raw_curve_s``) and off (``raw_plain_s``). The
three sides take turns, cycle by cycle: a warm-up cycle each (libzmq sets up a connection's
buffers at its first transfer, plain sockets too), then ``--turns`` measured ones; the figures
are medians over those, with the spread of the per-cycle ratio (these machines are noisy).
``ratio_over_raw`` = host cycle time / raw CURVE time (goal <= 2); ``ratio_over_plaintext``
against plaintext sockets is printed too: CURVE alone costs about 3x on bulk here
(../shared/notes/limits-measured.md), so that figure cannot reach 2 with encryption on.
``host_peak_in_models`` = the host's peak RSS during a measured cycle above its RSS just before
it, in model sizes (median and max over the measured cycles; goal <= 4, whatever the number of
clients). ``host_kept_in_models_per_cycle`` is what of that stays after each measured cycle: on
a young host about half of it is libzmq's per-connection message queues being touched for the
first time, about 0.5 KB per client per cycle of four small requests until some 56 KB per
client, then flat (tools/bench_zmq_queues.py measures that on plain pyzmq sockets). Both are
printed cycle by cycle too (``host_peak_in_models_per_cycle``, ``host_kept_in_models_per_cycle_each``).
The run is CPU-bound on small machines, so the CPU of each side per cycle is printed too
(``host_cpu_s_per_cycle``, ``hosted_clients_cpu_s_per_cycle`` and the raw server's and clients'),
and what holding every client's link costs while nothing moves (``host_idle_cpu_percent``).

Part 2, convergence in wall time (this process: an in-process host, one thread per client): a
non-IID split (two of four classes each) over ``--race-clients`` clients whose training takes
``--delay`` to 10x that; synchronous cycles (every client, every cycle) and FedBuff (buffer
``--buffer``) train the same model until the global model reaches ``--target`` accuracy on a
held-out set. ``fedbuff_speedup`` = sync wall time / FedBuff wall time (goal >= 2).

    python tools/bench_hosted.py                                  # about a minute on 2 cores
    python tools/bench_hosted.py --clients 1000 --procs 8 --race-clients 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tools'}", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------- part 1
def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


IDLE_S = 3.0  # how long the idle cost is measured


def cpu_s(pid: int) -> float:
    """The CPU seconds (user + system, all threads) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample_rss(pid: int, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        try:
            out.append(rss(pid))
        except OSError:
            return
        stop.wait(0.005)


def wait_line(proc: subprocess.Popen, word: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"a helper exited before saying {word!r}")
        if line.startswith(word):
            return line.strip()
    raise SystemExit(f"a helper did not say {word!r} in time")


def client_procs(args, mode: str, endpoint: str, card: str, root: Path) -> list[subprocess.Popen]:
    """``mode``: hosted (meshfl.Client), raw (plain DEALERs) or raw-curve (plain DEALERs, CURVE on;
    ``card`` is then the server's public key)."""
    per = [args.clients // args.procs + (1 if i < args.clients % args.procs else 0) for i in range(args.procs)]
    return [subprocess.Popen([sys.executable, __file__, "--role", "clients", "--mode", mode, "--n", str(n),
                              "--index", str(i), "--endpoint", endpoint, f"--card={card}",  # a z85 key may start with "-"
                              "--root", str(root),
                              "--params", str(args.params), "--turns", str(args.turns)],
                             stdout=subprocess.PIPE, text=True, env=ENV) for i, n in enumerate(per)]


class Fleet:
    """The client processes of one side (``mode``), taking their turns when told: turn 0 warms up
    every connection, the later ones are measured."""

    def __init__(self, args, mode: str, endpoint: str, card: str, root: Path, enroll=None) -> None:
        self.root, self.mode = root, mode
        self.cpu: list[float] = []
        self.procs = client_procs(args, mode, endpoint, card, root)
        for p in self.procs:
            wait_line(p, "cards")
        if enroll is not None:
            enroll()
        for p in self.procs:
            wait_line(p, "ready")

    def turn(self, k: int) -> float:
        """One turn of every client, all together: the time from the first start to the last end
        (and the CPU the client processes used for it, in ``self.cpu``)."""
        go = self.root / f"go-{self.mode}-{k}"
        before = sum(cpu_s(p.pid) for p in self.procs)
        go.write_text("go")
        spans = [json.loads(wait_line(p, "done")[5:]) for p in self.procs]
        self.cpu.append(sum(cpu_s(p.pid) for p in self.procs) - before)
        go.unlink()
        return max(s[1] for s in spans) - min(s[0] for s in spans)

    def close(self) -> None:
        (self.root / f"stop-{self.mode}").write_text("stop")
        for p in self.procs:
            p.wait(timeout=60)

    def kill(self) -> None:
        """After a failure: no client process outlives the benchmark."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def part1(args, root: Path) -> dict:
    from bench_hosted_plan import WidePlan

    from meshfl.crypto import PeerCard
    from meshfl.home import Home
    from meshfl.hosted._host import create_model, enroll_cards
    from meshfl.hosted._state import HostStore

    inputs = max(1, -(-(args.params - 100) // 100))
    model_bytes = (inputs * 100 + 100) * 4
    turns = args.turns + 1
    home = root / "host"
    with Home.init(home, "researcher", "host", listen=f"ipc://{root}/host.sock") as h:
        state = HostStore(h.store, home / "hosted")
        create_model(h, state, "m", WidePlan, model_args={"inputs": inputs},
                     server={"max_clients": args.clients, "cycle_length": 3600})
    host = subprocess.Popen([sys.executable, "-m", "meshfl.cli", "host", "start", "--home", str(home),
                             "--max-transfers", str(args.max_transfers)],
                            stdout=subprocess.PIPE, stderr=open(root / "host.log", "ab"), text=True, env=ENV)
    servers, fleets = {}, {}
    try:
        endpoint = wait_line(host, "host listening on").split()[-1]
        card = str(home / "keys" / "identity.card")

        def enroll() -> None:
            cards = [PeerCard.from_text(line) for f in sorted(root.glob("cards-hosted*.txt"))
                     for line in f.read_text().split()]
            with Home.open(home) as h:
                enroll_cards(h, cards, "bench")

        fleets["hosted"] = Fleet(args, "hosted", endpoint, card, root, enroll)
        for mode in ("raw-curve", "raw"):
            servers[mode] = subprocess.Popen(
                [sys.executable, __file__, "--role", "raw-server", "--root", str(root), "--mode", mode,
                 "--params", str(inputs * 100 + 100), "--n", str(args.clients * turns)],
                stdout=subprocess.PIPE, text=True, env=ENV)
            _, raw_endpoint, key = wait_line(servers[mode], "listening").split()
            fleets[mode] = Fleet(args, mode, raw_endpoint, key, root)
        times: dict[str, list[float]] = {mode: [] for mode in fleets}
        peaks, bases, host_cpu, raw_cpu = [], [], [], []
        for k in range(turns):  # the three sides take turns, so that machine noise hits them alike
            base, samples, stop = rss(host.pid), [], threading.Event()
            bases.append(base)
            sampler = threading.Thread(target=sample_rss, args=(host.pid, stop, samples))
            sampler.start()
            cpu0 = cpu_s(host.pid)
            times["hosted"].append(fleets["hosted"].turn(k))
            host_cpu.append(cpu_s(host.pid) - cpu0)
            stop.set()
            sampler.join()
            peaks.append(max(0, max(samples, default=base) - base) / model_bytes)
            for mode in ("raw-curve", "raw"):
                cpu0 = cpu_s(servers[mode].pid)
                times[mode].append(fleets[mode].turn(k))
                if mode == "raw-curve":
                    raw_cpu.append(cpu_s(servers[mode].pid) - cpu0)
        bases.append(rss(host.pid))
        # Idle, every client still connected: what holding a thousand links costs the host and
        # the raw CURVE server (libzmq heartbeats made the host's grow with the clients).
        idle0 = {"host": cpu_s(host.pid), "raw": cpu_s(servers["raw-curve"].pid)}
        time.sleep(IDLE_S)
        idle = {k: round(100 * (cpu_s(pid) - idle0[k]) / IDLE_S, 1)
                for k, pid in (("host", host.pid), ("raw", servers["raw-curve"].pid))}
        for mode in servers:
            (root / f"stop-{mode}-server").write_text("stop")
        for fleet in fleets.values():
            fleet.close()
    finally:
        for fleet in fleets.values():
            fleet.kill()
        host.terminate()
        host.wait(timeout=60)
        for server in servers.values():
            if server.poll() is None:
                server.kill()
            server.wait(timeout=60)
    measured = {mode: t[1:] for mode, t in times.items()}
    ratios = [h / r for h, r in zip(measured["hosted"], measured["raw-curve"])]
    plain = [h / r for h, r in zip(measured["hosted"], measured["raw"])]
    return {"clients": args.clients, "procs": args.procs, "max_transfers": args.max_transfers,
            "params": inputs * 100 + 100, "model_bytes": model_bytes, "measured_cycles": args.turns,
            "host_cycle_s": round(statistics.median(measured["hosted"]), 3),
            "host_first_cycle_s": round(times["hosted"][0], 3),
            "raw_curve_s": round(statistics.median(measured["raw-curve"]), 3),
            "raw_plain_s": round(statistics.median(measured["raw"]), 3),
            "ratio_over_raw": round(statistics.median(ratios), 2),
            "ratio_over_raw_spread": [round(min(ratios), 2), round(max(ratios), 2)],
            "ratio_over_plaintext": round(statistics.median(plain), 2),
            "host_peak_in_models": round(statistics.median(peaks[1:]), 2),
            "host_peak_in_models_max": round(max(peaks[1:]), 2),
            "host_peak_in_models_per_cycle": [round(p, 2) for p in peaks[1:]],
            "host_kept_in_models_per_cycle_each": [round((b - a) / model_bytes, 2) for a, b in zip(bases[1:], bases[2:])],
            "host_kept_in_models_per_cycle": round((bases[-1] - bases[1]) / args.turns / model_bytes, 2),
            # the run is CPU-bound on small machines: the host's share of it, per cycle
            "host_cpu_s_per_cycle": round(statistics.median(host_cpu[1:]), 3),
            "hosted_clients_cpu_s_per_cycle": round(statistics.median(fleets["hosted"].cpu[1:]), 3),
            "raw_curve_server_cpu_s_per_turn": round(statistics.median(raw_cpu[1:]), 3),
            "raw_curve_clients_cpu_s_per_turn": round(statistics.median(fleets["raw-curve"].cpu[1:]), 3),
            "host_idle_cpu_percent": idle["host"], "raw_curve_idle_cpu_percent": idle["raw"],
            "host_cycle_times_s": [round(t, 3) for t in measured["hosted"]],
            "raw_curve_times_s": [round(t, 3) for t in measured["raw-curve"]]}


def clients_main(args) -> None:
    """One client process: ``--n`` clients, one thread each, waiting for the go file."""
    import torch

    from meshfl.crypto import Identity, PeerCard
    from meshfl.errors import RequestTimeout
    from meshfl.hosted import Client
    from meshfl.wire import Message

    torch.set_num_threads(1)
    root = Path(args.root)
    ctx = zmq.Context(io_threads=2)
    ids = [Identity.generate(f"p{args.index}c{i}") for i in range(args.n)]
    (root / f"cards-{args.mode}{args.index}.txt").write_text("\n".join(i.card.to_text() for i in ids) + "\n")
    print("cards", flush=True)
    if args.mode == "hosted":
        card = PeerCard.from_text(Path(args.card).read_text())
        from bench_hosted_plan import WidePlan

        clients = [Client(args.endpoint, card, identity=i, context=ctx, timeout=1.0, plans=[WidePlan]) for i in ids]
        for c in clients:  # until the host has enrolled this key
            while True:
                try:
                    c.call(Message("ping"))
                    break
                except RequestTimeout:
                    pass
            c.timeout = 300.0
    else:
        clients = []
        for i in ids:
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.routing_id = i.peer_id.encode()
            if args.mode == "raw-curve":
                s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
                s.curve_serverkey = args.card.encode()
            s.connect(args.endpoint)
            clients.append(s)
        for s in clients:  # connected, as the hosted clients are (they ping until enrolled)
            s.send(b"ping")
            s.recv()
    print("ready", flush=True)

    def hosted_turn(c) -> None:  # Client.train_once's steps, without the training
        t = c.request("m", pull=True).fields  # the model comes with the ticket
        entry = c._cache["m"] if t.get("inline") else c.pull("m", t["version"])
        # The received tensors go back as the diff, as the raw clients echo the bytes they got:
        # both sides move the same bytes, and neither allocates a model per turn.
        c.push("m", t["ticket"], t["version"], entry["tensors"], 10)

    def raw_turn(s) -> None:
        s.send(b"req")
        frames = s.recv_multipart(copy=False)
        s.send_multipart([b"diff", *frames[1:]], copy=False)
        s.recv()

    errors: list = []

    def guarded(turn, c) -> None:
        try:
            turn(c)
        except Exception as exc:  # reported below: a bench with a failed client measures nothing
            errors.append(repr(exc))

    turn = hosted_turn if args.mode == "hosted" else raw_turn
    for k in range(args.turns + 1):
        go = root / f"go-{args.mode}-{k}"
        while not go.exists():
            time.sleep(0.01)
        start = time.time()
        threads = [threading.Thread(target=guarded, args=(turn, c)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise SystemExit(f"{len(errors)} client(s) failed, first: {errors[0]}")
        print("done " + json.dumps([start, time.time()]), flush=True)
    while not (root / f"stop-{args.mode}").exists():  # closing a thousand sockets would slow the
        time.sleep(0.05)                              # other sides' turns: only after them all
    for c in clients:
        c.close()
    ctx.term()


def raw_server_main(args) -> None:
    """Plain ROUTER: the model (1 MB frames) to each requester, an ack for each diff."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    public = b"-"
    if args.mode == "raw-curve":  # no ZAP handler in this context: any client key is admitted
        public, secret = zmq.curve_keypair()
        s.curve_server, s.curve_publickey, s.curve_secretkey = True, public, secret
    s.bind(f"ipc://{args.root}/{args.mode}.sock")
    print(f"listening {s.getsockopt_string(zmq.LAST_ENDPOINT)} {public.decode()}", flush=True)
    model = np.zeros(args.params, dtype=np.float32)
    mv = memoryview(model).cast("B")
    frames = [mv[i:i + (1 << 20)] for i in range(0, mv.nbytes, 1 << 20)]
    diffs = 0
    while diffs < args.n:
        msg = s.recv_multipart(copy=False)
        if msg[1].bytes == b"ping":
            s.send_multipart([msg[0], b"pong"])
        elif msg[1].bytes == b"req":
            s.send_multipart([msg[0], b"model", *frames], copy=False)
        else:
            diffs += 1
            s.send_multipart([msg[0], b"ack"])
    while not Path(args.root, f"stop-{args.mode}-server").exists():  # connected, idle: measured too
        time.sleep(0.05)
    s.close(linger=1000)
    ctx.term()


# ---------------------------------------------------------------------------------------- part 2
def blobs(rng, n: int, classes: list[int], centres):
    y = rng.choice(classes, n)
    x = centres[y] + rng.normal(size=(n, centres.shape[1]))
    return x.astype(np.float32), y


def race(args, root: Path, mode: str) -> dict:
    import torch
    from bench_hosted_plan import BlobPlan

    from meshfl.crypto import Identity
    from meshfl.errors import MeshflError
    from meshfl.home import Home
    from meshfl.hosted import Backoff, Client, Host

    rng = np.random.default_rng(7)
    centres = rng.normal(size=(4, 8)) * 1.2
    xt, yt = blobs(rng, 2000, [0, 1, 2, 3], centres)
    xt, yt = torch.tensor(xt), torch.tensor(yt)
    n = args.race_clients
    path = root / f"race-{mode}"
    Home.init(path, "researcher", "host", listen=f"ipc://{root}/race-{mode}.sock").close()
    host = Host(path).start()
    server = {"mode": "cycle", "max_clients": n, "min_clients": n, "cycle_length": 3600} if mode == "sync" else \
        {"mode": "async", "buffer": args.buffer, "max_staleness": 4 * n // args.buffer, "max_clients": n}
    host.add_model("m", BlobPlan, server=server, training_args={"epochs": 1, "lr": 0.05, "batch_size": 16,
                                                                 "test_fraction": 0.0})
    ctx = zmq.Context()
    clients = []
    for i in range(n):
        x, y = blobs(rng, 40, [i % 4, (i + 1) % 4], centres)
        delay = args.delay * (1 + 9 * i / max(1, n - 1))
        clients.append(Client(host.endpoint, host.card, identity=Identity.generate(f"r{i}"), data=(
            torch.tensor(x), torch.tensor(y)), plans=[BlobPlan], context=ctx, delay=delay, timeout=60))
    host.enroll([c.card for c in clients])
    done = threading.Event()

    def loop(c) -> None:
        while not done.is_set():
            try:
                answer = c.train_once("m")
            except MeshflError:
                continue
            if isinstance(answer, Backoff):
                done.wait(min(answer.retry_in, 0.02))

    model = BlobPlan().init_model()
    start = time.monotonic()
    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    version, reached, acc = 0, None, 0.0
    while time.monotonic() - start < args.race_timeout:
        if not host.wait_version("m", version + 1, timeout=1.0):
            continue
        version = host.status("m")[0]["version"]
        model.load_state_dict(host.model("m", version))
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        if acc >= args.target:
            reached = time.monotonic() - start
            break
    done.set()
    for t in threads:
        t.join(timeout=30)
    for c in clients:
        c.close()
    host.close()
    ctx.term()
    return {"wall_s": None if reached is None else round(reached, 2), "versions": version, "accuracy": round(acc, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--max-transfers", type=int, default=2, help="the host's transfers in flight")
    p.add_argument("--turns", type=int, default=3, help="measured cycles (after one warm-up cycle)")
    p.add_argument("--race-clients", type=int, default=50)
    p.add_argument("--delay", type=float, default=0.02, help="training time of the fastest race client (s)")
    p.add_argument("--buffer", type=int, default=10)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--race-timeout", type=float, default=20.0)
    p.add_argument("--skip-race", action="store_true")
    p.add_argument("--role", default="main", choices=["main", "clients", "raw-server"], help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--card", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "clients":
        return clients_main(args)
    if args.role == "raw-server":
        return raw_server_main(args)
    import logging

    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="meshfl-bench-hosted-"))
    try:
        out = {"cycle": part1(args, root)}
        out.update(ratio_over_raw=out["cycle"]["ratio_over_raw"], host_peak_in_models=out["cycle"]["host_peak_in_models"])
        if not args.skip_race:
            import torch

            torch.set_num_threads(1)
            sync, fedbuff = race(args, root, "sync"), race(args, root, "fedbuff")
            out["race"] = {"clients": args.race_clients, "target": args.target, "sync": sync, "fedbuff": fedbuff}
            out["fedbuff_speedup"] = (round(sync["wall_s"] / fedbuff["wall_s"], 2)
                                      if sync["wall_s"] and fedbuff["wall_s"] else None)
        print(json.dumps(out, indent=2))
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
