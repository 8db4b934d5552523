#!/usr/bin/env python
"""Network benchmark: rounds over real links with latency and limited bandwidth (root only).

One researcher and K nodes, each a real process in its own network namespace
(meshfl.testing.netns). Each node's link to the switch is shaped to --rate-mbit both ways (tbf),
and each node reaches the researcher through the impairment relay with RTT/2 of delay each way.
The researcher's own link is not shaped: K nodes' links, not the researcher's, are the limit.
The plan is tools/bench_round_plan.py's DeltaPlan (no real training: this measures the
protocol). Plain FedAvg rounds alternate with secure-aggregation rounds; the first of each is a
warm-up.

The figure of merit is ``ratio_over_model`` = measured median round time / the protocol's own
minimum on this network, ``round_trips x RTT + bytes_per_link / bandwidth``, where, per round
and per node link:

- plain round: 1 round trip (the train request goes out with the model, ``train.done`` comes
  back with the update inline; the acceptance reply and the acknowledgement overlap other work),
  4 P bytes down (the model) then 4 P bytes up (the update);
- secure round: 2 round trips (the set-up and train requests go out together, the masked update
  comes back; then the unmasking request and its answer), 4 P bytes down and the masked vector
  up (4 P bytes for float32 parameters in the 32-bit ring, plus a few bytes of 64-bit slots).

Bytes are the tensors' payload at the nominal rate: TCP/IP headers (~4.6% at MTU 1500),
ZeroMQ/CURVE framing and envelopes are meshfl's or the network's overhead and count against the
ratio. The relay counts what really crossed each link (``wire_bytes_per_round``).

    sudo python tools/bench_network.py                 # P = 1e6, K = 3, 50 ms, 100 Mbit/s
    sudo python tools/bench_network.py --params 1e5 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402

RESEARCHER_PORT = 5555


def researcher_main(home: str, params: int, k: int, rounds: int) -> None:
    """Inside the researcher's namespace: alternate plain and secure rounds; one JSON line per
    round on stdout, then wait for a line on stdin (the parent reads the relay's counters)."""
    from bench_round_plan import DeltaPlan
    from meshfl.researcher import Experiment, Researcher

    with Researcher(home, peer_options={"dead_after": 60.0}) as researcher:
        researcher.wait_for_nodes(k, timeout=180)
        common = dict(model_args={"params": params}, min_nodes=k, round_timeout=120, progress=False)

        def report(kind: str, entry: dict) -> None:
            print(json.dumps({"kind": kind, "round": entry["round"], "seconds": entry["seconds"]}), flush=True)
            sys.stdin.readline()

        secure = Experiment(researcher, DeltaPlan, ["bench"], 0, secagg=True,
                            on_round=lambda e: report("secure", e), **common)

        def after_plain(entry: dict) -> None:
            report("plain", entry)
            secure.rounds += 1
            secure.run()

        Experiment(researcher, DeltaPlan, ["bench"], 1 + rounds, on_round=after_plain, **common).run()
    print(json.dumps({"kind": "end"}), flush=True)


def make_homes(root: Path, k: int, researcher_listen: str, endpoints: list[str]) -> tuple[Path, list[Path]]:
    from bench_round_plan import DeltaPlan
    from meshfl.home import Home
    from meshfl.node._datasets import DatasetRegistry
    from meshfl.node._plans import PlanRegistry, plan_hash
    from meshfl.plans import plan_source

    source = plan_source(DeltaPlan)
    csv = root / "tiny.csv"
    np.savetxt(csv, np.column_stack([np.arange(20.0), np.arange(20) % 2]), delimiter=",",
               header="x,target", comments="")
    r_path = root / "researcher"
    paths = [root / f"node{i}" for i in range(k)]
    with Home.init(r_path, "researcher", "bench", listen=researcher_listen, dead_after=60.0) as r_home:
        homes = [Home.init(p, "node", p.name, dead_after=60.0, task_timeout=600.0) for p in paths]
        try:
            for home, endpoint in zip(homes, endpoints):
                home.trust(r_home.identity.card, endpoint)
                r_home.trust(home.identity.card)
                for other in homes:  # secure aggregation seals shares node to node
                    if other is not home:
                        home.trust(other.identity.card)
                DatasetRegistry(home.store, home.audit).add("tiny", ["bench"], "csv", csv, target="target")
                plans = PlanRegistry(home.store, home.audit)
                plans.submit(source)
                plans.approve(plan_hash(source))
        finally:
            for home in homes:
                home.close()
    return r_path, paths


def run(params: int, k: int, rounds: int, rtt_ms: float, rate_mbit: float, root: Path) -> dict:
    from meshfl.testing.netns import Network

    with Network() as net:
        r_host = net.add_host("researcher")
        hosts = [net.add_host(f"node{i}", rate_mbit=rate_mbit) for i in range(k)]
        links = [net.relay(h, r_host, RESEARCHER_PORT, delay_ms=rtt_ms / 2) for h in hosts]
        r_path, paths = make_homes(root, k, f"tcp://{r_host.address}:{RESEARCHER_PORT}", [l.endpoint for l in links])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MESHFL_WORKER_THREADS": "1"}
        for host, path in zip(hosts, paths):
            net.popen(host, [sys.executable, "-m", "meshfl.cli", "-v", "node", "start", "--home", str(path)],
                      stdout=subprocess.DEVNULL, stderr=open(path / "node.log", "wb"), env=env)
        researcher = net.popen(r_host, [sys.executable, __file__, "--researcher", str(r_path), str(params), str(k),
                                        str(rounds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        times: dict[str, list[float]] = {"plain": [], "secure": []}
        wire: dict[str, list[tuple[int, int]]] = {"plain": [], "secure": []}
        last = [(0, 0)] * k
        while True:
            line = researcher.stdout.readline()
            if not line:
                raise RuntimeError(f"the researcher ended early (exit {researcher.wait(timeout=30)})")
            event = json.loads(line)
            if event["kind"] == "end":
                break
            counts = [(s["down_bytes"], s["up_bytes"]) for s in (l.stats() for l in links)]
            if event["round"] > 1:  # the first of each kind warms up
                times[event["kind"]].append(event["seconds"])
                wire[event["kind"]].append(max((d - d0, u - u0) for (d, u), (d0, u0) in zip(counts, last)))
            last = counts
            researcher.stdin.write("\n")
            researcher.stdin.flush()
        researcher.wait(timeout=60)
    return summary(params, k, rtt_ms, rate_mbit, times, wire)


def summary(params: int, k: int, rtt_ms: float, rate_mbit: float, times: dict, wire: dict) -> dict:
    model_bytes = 4 * params
    rtt, rate = rtt_ms / 1000, rate_mbit * 1e6 / 8
    out = {
        "benchmark": "network",
        "params": params,
        "nodes": k,
        "rtt_ms": rtt_ms,
        "rate_mbit_per_link": rate_mbit,
        "rounds_timed": len(times["plain"]),
        "model": {
            "formula": "round_trips * RTT + (bytes_down + bytes_up) / bandwidth, per node link (links in parallel)",
            "bytes": "tensor payload only: 4 P down (model) + 4 P up (update or masked vector)",
        },
    }
    for kind, round_trips in (("plain", 1), ("secure", 2)):
        model_s = round_trips * rtt + 2 * model_bytes / rate
        median = statistics.median(times[kind])
        down, up = (statistics.median(w[i] for w in wire[kind]) for i in (0, 1))
        out[kind] = {
            "round_trips": round_trips,
            "bytes_down_per_link": model_bytes,
            "bytes_up_per_link": model_bytes,
            "model_round_s": round(model_s, 4),
            "median_round_s": round(median, 4),
            "ratio_over_model": round(median / model_s, 3),
            "wire_bytes_per_round": {"down": int(down), "up": int(up)},
            "round_times_s": times[kind],
        }
    out["ratio_over_model"] = out["plain"]["ratio_over_model"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e6, help="P, float32 parameters (default 1e6)")
    ap.add_argument("--nodes", type=int, default=3, help="K node processes (default 3)")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds of each kind, after one warm-up (default 10)")
    ap.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time node <-> researcher (default 50)")
    ap.add_argument("--rate-mbit", type=float, default=100.0, help="bandwidth of each node's link (default 100)")
    ap.add_argument("--researcher", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.researcher:
        home, params, k, rounds = args.researcher
        researcher_main(home, int(params), int(k), int(rounds))
        return
    root = Path(tempfile.mkdtemp(prefix="meshfl-bench-network-"))
    try:
        print(json.dumps(run(int(args.params), args.nodes, args.rounds, args.rtt_ms, args.rate_mbit, root), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
