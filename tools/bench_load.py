#!/usr/bin/env python
"""Load: many nodes, many rounds, in one process; no reply may be lost and memory must stay flat.

An in-process mesh (``meshfl.testing.FederatedMesh``: real homes, LMDB, CURVE over ipc, one warm
worker process per node) of N nodes runs R rounds of a small model. After every round the tool
samples this process's RSS (the researcher and the N nodes' I/O share it; the workers are other
processes). Prints JSON: replies expected and received per round, replies lost (must be 0), RSS
after each round, and the growth from round 2 to the last round, next to the same growth measured
over the first half of the run (a leak grows in both halves; a warm-up shows only in the first).

    python tools/bench_load.py                      # 50 nodes x 20 rounds
    python tools/bench_load.py --nodes 10 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_wire import rss_mb  # noqa: E402
from chaos_plan import ChaosPlan  # noqa: E402
from meshfl.researcher import Experiment  # noqa: E402
from meshfl.testing import FederatedMesh  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--secagg", action="store_true", help="secure aggregation in every round")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rss: list[float] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshfl-bench-load-") as tmp:
        with FederatedMesh(args.nodes, root=tmp, dead_after=30.0) as mesh:
            setup_s = time.monotonic() - started
            rng = np.random.default_rng(0)
            for node in mesh.nodes:
                y = rng.integers(0, 2, 40)
                x = rng.normal(size=(40, 4)) + 2.0 * y[:, None]
                path = node.home.path / "data.csv"
                np.savetxt(path, np.column_stack([x, y]), delimiter=",", header="a,b,c,d,target", comments="")
                node.datasets.add("load", ["load"], "csv", path, target="target")
            mesh.approve(ChaosPlan)
            torch.manual_seed(0)

            def sample(_entry: dict) -> None:
                gc.collect()
                rss.append(round(rss_mb(), 1))

            exp = Experiment(mesh.researcher, ChaosPlan, ["load"], args.rounds, training_args={"steps": 2},
                             min_nodes=args.nodes, round_timeout=300, progress=False, on_round=sample,
                             secagg=args.secagg)
            history = exp.run()
    received = [len(h["nodes"]) for h in history]
    half = max(2, len(rss) // 2)
    out = {
        "benchmark": "load",
        "nodes": args.nodes,
        "rounds": len(history),
        "secagg": args.secagg,
        "mesh_setup_s": round(setup_s, 1),
        "median_round_s": round(float(np.median([h["seconds"] for h in history])), 4),
        "replies_expected_per_round": args.nodes,
        "replies_received_per_round": received,
        "replies_lost": sum(args.nodes - r for r in received),
        "rss_mb_after_round": rss,
        "rss_growth_round2_to_last_mb": round(rss[-1] - rss[1], 1) if len(rss) > 1 else None,
        "rss_growth_round2_to_half_mb": round(rss[half - 1] - rss[1], 1) if len(rss) > 1 else None,
        "rss_growth_per_round_after_round2_mb": round((rss[-1] - rss[1]) / max(1, len(rss) - 2), 2)
        if len(rss) > 2 else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
