#!/usr/bin/env python
"""Secure-aggregation benchmark: the same mesh and model, rounds with and without secagg.

K real node processes (CURVE, LMDB, warm workers) and tools/bench_round_plan.py's DeltaPlan (no
real training: this measures the protocol). Plain FedAvg rounds and secure rounds (key exchange,
shares sealed over the overlay and relayed by the researcher, masked vectors, unmasking)
alternate, so machine noise hits both alike; the first round of each is a warm-up. Prints JSON:
median round time of each and their ratio.

    python tools/bench_secagg.py                  # P = 1e6, K = 8
    python tools/bench_secagg.py --params 1e5 --nodes 4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_round import setup, stop_nodes  # noqa: E402
from bench_round_plan import DeltaPlan  # noqa: E402
from meshfl.researcher import Experiment, Researcher  # noqa: E402


def run(params: int, k: int, rounds: int, root: Path) -> dict:
    r_path, nodes = setup(root, k, mutual=True)
    try:
        with Researcher(r_path, peer_options={"dead_after": 60.0}) as researcher:
            researcher.wait_for_nodes(k, timeout=180)
            common = dict(model_args={"params": params}, min_nodes=k, round_timeout=600, progress=False)
            secure = Experiment(researcher, DeltaPlan, ["bench"], 0, secagg=True, **common)

            def one_secure_round(_entry: dict) -> None:
                secure.rounds += 1
                secure.run()

            plain = Experiment(researcher, DeltaPlan, ["bench"], 1 + rounds, on_round=one_secure_round, **common)
            plain.run()
            plain_s = [h["seconds"] for h in plain.history[1:]]
            secure_s = [h["seconds"] for h in secure.history[1:]]
    finally:
        stop_nodes(nodes)
    model_mb = params * 4 / 2**20
    return {
        "benchmark": "secagg",
        "params": params,
        "nodes": k,
        "rounds_timed": rounds,
        "model_mb": round(model_mb, 2),
        "threshold": secure.history[-1]["secagg"]["threshold"],
        "plain_median_round_s": round(statistics.median(plain_s), 4),
        "secagg_median_round_s": round(statistics.median(secure_s), 4),
        "ratio_secagg_over_plain": round(statistics.median(secure_s) / statistics.median(plain_s), 3),
        "secagg_median_phase_s": {
            phase: round(statistics.median(h["secagg"]["seconds"][phase] for h in secure.history[1:]), 4)
            for phase in ("setup", "unmask")
        },
        "plain_round_times_s": plain_s,
        "secagg_round_times_s": secure_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e6, help="P, float32 parameters (default 1e6)")
    ap.add_argument("--nodes", type=int, default=8, help="K node processes (default 8)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds of each kind, after one warm-up (default 20)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="meshfl-bench-secagg-"))
    try:
        print(json.dumps(run(int(args.params), args.nodes, args.rounds, root), indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
