#!/usr/bin/env python
"""Round benchmark: one FedAvg round through meshfl vs the same bytes through plain pyzmq.

K real node processes (`meshfl node start`, CURVE links, LMDB homes, warm training worker) run a
plan that returns the received model plus a small delta (no real training: this measures the
framework). In the same run, K plain-pyzmq DEALER processes echo the same bytes as 1 MB
copy=False frames under CURVE (tools/bench_wire.py's raw side); meshfl and raw rounds alternate,
so machine noise hits both alike. Prints JSON: median round time of each and their ratio, the
researcher's peak RSS above its baseline in model sizes, and the fixed cost of a small round;
with each series' quartiles and extremes, and those of the per-round ratio (each meshfl round
over the raw round trip right after it), since one median hides how noisy these machines are.
Each case also reports the CPU a round costs by kind of process (a node, its worker, the
researcher; the floor's alike): on a small machine the round is CPU-bound, so this says where
its time goes, and it is steadier than wall time.

Right after the small case, the same round runs as tools/bench_floor.py: a lean script that does
only the durable work the design requires (a synced commit of each task, of its result and of
its ack, a warm worker process, a checkpoint), with no framework. Raw pyzmq only moves bytes; the
floor is what such a round costs on this machine at least, and ``ratio_meshfl_over_floor`` what
meshfl adds. (Its rounds are not interleaved with meshfl's: each side's commits after a round
would slow the other's next round.)

    python tools/bench_round.py                       # P = 5e7 and P = 1e5, K = 8
    python tools/bench_round.py --params 1e7 --nodes 4 --rounds 3
    python tools/bench_round.py --small-only          # only P = 1e5 and its floor (a quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_floor import CpuPerRound, run_floor  # noqa: E402
from bench_wire import RawSide, rss_mb  # noqa: E402
from meshfl.home import Home  # noqa: E402
from meshfl.node._datasets import DatasetRegistry  # noqa: E402
from meshfl.node._plans import PlanRegistry, plan_hash  # noqa: E402
from meshfl.plans import plan_source  # noqa: E402
from meshfl.researcher import Experiment, Researcher  # noqa: E402
from bench_round_plan import DeltaPlan  # noqa: E402


class PeakRss:
    """Samples this process's RSS every few ms while active (peak over what it saw)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            if self.active.is_set():
                self.peak = max(self.peak, rss_mb())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def setup(root: Path, k: int, mutual: bool = False, prepare=None):
    """A researcher home and ``k`` started node processes; ``mutual``: nodes trust each other too
    (secure aggregation seals shares node to node); ``prepare(i, home)``: more set-up of node i's
    home before it starts."""
    listen = f"ipc://{root}/researcher.sock"
    r_home = Home.init(root / "researcher", "researcher", "bench", listen=listen, dead_after=60.0)
    source = plan_source(DeltaPlan)
    csv = root / "tiny.csv"
    np.savetxt(csv, np.column_stack([np.arange(20.0), np.arange(20) % 2]), delimiter=",", header="x,target", comments="")
    paths = []
    for i in range(k):
        path = root / f"node{i}"
        with Home.init(path, "node", f"node{i}", dead_after=60.0, task_timeout=600.0) as home:
            home.trust(r_home.identity.card, listen)
            r_home.trust(home.identity.card)
            DatasetRegistry(home.store, home.audit).add("tiny", ["bench"], "csv", csv, target="target")
            plans = PlanRegistry(home.store, home.audit)
            plans.submit(source)
            plans.approve(plan_hash(source))
            if prepare is not None:
                prepare(i, home)
        paths.append(path)
    if mutual:
        homes = [Home.open(p) for p in paths]
        for home in homes:
            for other in homes:
                if other is not home:
                    home.trust(other.identity.card)
        for home in homes:
            home.close()
    r_home.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MESHFL_WORKER_THREADS": "1"}
    import subprocess

    nodes = [
        subprocess.Popen([sys.executable, "-m", "meshfl.cli", "node", "start", "--home", str(p)],
                         stdout=subprocess.DEVNULL, stderr=open(p / "node.log", "wb"), env=env)
        for p in paths
    ]
    return root / "researcher", nodes


def spread(values: list[float]) -> dict:
    """Quartiles and extremes: one median hides how noisy these machines are."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {"min": round(min(values), 4), "p25": round(q1, 4), "median": round(q2, 4), "p75": round(q3, 4),
            "max": round(max(values), 4)}


def run_case(params: int, k: int, rounds: int, root: Path) -> dict:
    r_path, nodes = setup(root, k)
    raw = None
    try:
        researcher = Researcher(r_path, peer_options={"dead_after": 60.0}).start()
        researcher.wait_for_nodes(k, timeout=180)
        raw = RawSide(k, True, "tcp://127.0.0.1:0")
        # Round 1 warms up; rounds 2-3 run alone, the sampler tracking the researcher's RSS (the
        # raw side's buffers would otherwise stay in this process's heap); then the timed rounds
        # alternate with raw-pyzmq round trips.
        rss_rounds = 2
        exp = Experiment(researcher, DeltaPlan, ["bench"], 1 + rss_rounds + rounds, model_args={"params": params},
                         min_nodes=k, round_timeout=600, progress=False)
        model_mb = sum(t.numel() * t.element_size() for t in exp.global_state.values()) / 2**20
        peak = PeakRss()
        base = rss_mb()
        raw_times: list[float] = []
        cpu: list[CpuPerRound] = []

        def between_rounds(entry: dict) -> None:
            if entry["round"] == 1 + rss_rounds:
                peak.active.clear()
            if entry["round"] >= 1 + rss_rounds:
                spent = time.process_time()
                raw_times.append(raw.round_trip(exp.global_state, entry["round"]))
                if cpu:
                    cpu[0].exclude(time.process_time() - spent)
            if entry["round"] == 1 + rss_rounds:  # the timed rounds start
                cpu.append(CpuPerRound([node.pid for node in nodes]))

        peak.active.set()
        exp.on_round = between_rounds
        history = exp.run()
        cpu_ms = cpu[0].figures(rounds)
        peak.close()
        raw_times = raw_times[1:]  # the first raw round trip warms up too
        mesh_times = [h["seconds"] for h in history[1 + rss_rounds :]]
        researcher.close()
        return {
            "params": params,
            "nodes": k,
            "rounds_timed": rounds,
            "model_mb": round(model_mb, 2),
            "meshfl_median_round_s": round(statistics.median(mesh_times), 4),
            "raw_pyzmq_median_round_s": round(statistics.median(raw_times), 4),
            "ratio_meshfl_over_raw": round(statistics.median(mesh_times) / statistics.median(raw_times), 3),
            # each meshfl round over the raw round trip right after it: the ratio's own spread
            "ratio_meshfl_over_raw_spread": spread([m / r for m, r in zip(mesh_times, raw_times)]),
            "meshfl_round_s_spread": spread(mesh_times),
            "raw_round_s_spread": spread(raw_times),
            "researcher_rss_baseline_mb": round(base),
            "researcher_peak_rss_above_baseline_mb": round(peak.peak - base),
            "researcher_peak_above_baseline_in_models": round((peak.peak - base) / model_mb, 2) if model_mb else None,
            # CPU per round by kind of process: the round is CPU-bound here, so this is where its time goes
            "meshfl_cpu_ms_per_round": cpu_ms,
            "meshfl_round_times_s": mesh_times,
            "raw_round_times_s": [round(t, 4) for t in raw_times],
        }
    finally:
        if raw is not None:
            raw.close()
        stop_nodes(nodes)


def stop_nodes(nodes) -> None:
    """SIGTERM every node process (a clean stop), SIGKILL those that do not stop in 30 s."""
    for node in nodes:
        node.terminate()
    for node in nodes:
        try:
            node.wait(timeout=30)
        except Exception:
            node.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=5e7, help="P for the large case (default 5e7)")
    ap.add_argument("--small-params", type=float, default=1e5, help="P for the fixed-cost case (default 1e5)")
    ap.add_argument("--nodes", type=int, default=8, help="K node processes (default 8)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds of the large case (the small one: 20)")
    ap.add_argument("--small-only", action="store_true", help="run only the fixed-cost case and its floor")
    args = ap.parse_args()
    out = {"benchmark": "round", "curve": True, "cases": []}
    cases = [(int(args.small_params), max(args.rounds, 20))]
    if not args.small_only:
        cases.append((int(args.params), args.rounds))
    for params, rounds in cases:
        root = Path(tempfile.mkdtemp(prefix="meshfl-bench-round-"))
        try:
            out["cases"].append(run_case(params, args.nodes, rounds, root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    small = out["cases"][0]
    floor = run_floor(int(args.small_params), args.nodes, small["rounds_timed"])
    small.update(floor, ratio_meshfl_over_floor=round(small["meshfl_median_round_s"] / floor["floor_median_round_s"], 3),
                 floor_round_s_spread=spread(floor["floor_round_times_s"]))
    out["summary"] = {
        "ratio_small_over_floor": small["ratio_meshfl_over_floor"],
        "small_round_ms": round(small["meshfl_median_round_s"] * 1000, 2),
        "small_round_floor_ms": round(floor["floor_median_round_s"] * 1000, 2),
        "small_round_cpu_ms": small["meshfl_cpu_ms_per_round"]["total"],
        "small_round_floor_cpu_ms": floor["floor_cpu_ms_per_round"]["total"],
    }
    if not args.small_only:
        large = out["cases"][1]
        out["summary"].update({
            "ratio_at_large_P": large["ratio_meshfl_over_raw"],
            "ratio_at_large_P_p25_p75": [large["ratio_meshfl_over_raw_spread"]["p25"],
                                         large["ratio_meshfl_over_raw_spread"]["p75"]],
            "researcher_peak_above_baseline_in_models": large["researcher_peak_above_baseline_in_models"],
        })
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
