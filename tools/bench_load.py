#!/usr/bin/env python
"""Load: many nodes, many rounds, in one process; no reply may be lost and memory must stay flat.

An in-process mesh (``meshfl.testing.FederatedMesh``: real homes, LMDB, CURVE over ipc, one warm
worker process per node) of N nodes runs R rounds of a small model. After every round the tool
samples this process's RSS (the researcher and the N nodes' I/O share it; the workers are other
processes). Prints JSON: replies expected and received per round, replies lost (must be 0), and
memory after each round: RSS, and its anonymous part (heap: what a leak would grow). File-backed
pages are LMDB and pack-file maps, which grow with the durable queue, audit log and history by
design. Growth is reported from round 2 to the last round, and per round, next to the growth of
the experiment's in-memory history (one entry per node per round, kept by design): flat memory
means the heap grows by about the history and no more.

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
import orjson
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from chaos_plan import ChaosPlan  # noqa: E402
from meshfl.researcher import Experiment  # noqa: E402
from meshfl.testing import FederatedMesh  # noqa: E402


def memory_mb() -> dict[str, float]:
    """This process's RSS and its anonymous (heap) and file-backed parts, in MB."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def deep_size_mb(value) -> float:
    """Memory held by a tree of dicts, lists and scalars (the experiment's history)."""
    seen: set[int] = set()

    def size(v) -> int:
        if id(v) in seen:
            return 0
        seen.add(id(v))
        n = sys.getsizeof(v)
        if isinstance(v, dict):
            n += sum(size(k) + size(x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            n += sum(size(x) for x in v)
        return n

    return size(value) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--secagg", action="store_true", help="secure aggregation in every round")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    memory: list[dict[str, float]] = []
    history_mb: list[float] = []
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
                memory.append(memory_mb())
                history_mb.append(deep_size_mb(exp.history))

            exp = Experiment(mesh.researcher, ChaosPlan, ["load"], args.rounds, training_args={"steps": 2},
                             min_nodes=args.nodes, round_timeout=300, progress=False, on_round=sample,
                             secagg=args.secagg)
            history = exp.run()
    received = [len(h["nodes"]) for h in history]
    anon = [m["RssAnon"] for m in memory]
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
        "rss_mb_after_round": [m["VmRSS"] for m in memory],
        "anon_mb_after_round": anon,
        "file_mb_after_round": [m["RssFile"] for m in memory],
        "anon_growth_round2_to_last_mb": round(anon[-1] - anon[1], 1) if len(anon) > 1 else None,
        "anon_growth_per_round_after_round2_mb": round((anon[-1] - anon[1]) / max(1, len(anon) - 2), 3)
        if len(anon) > 2 else None,
        "history_json_bytes_per_round": round(len(orjson.dumps(history)) / max(1, len(history))),
        "history_in_memory_growth_round2_to_last_mb": round(history_mb[-1] - history_mb[1], 2) if len(history_mb) > 1 else None,
        "anon_growth_beyond_history_mb": round((anon[-1] - anon[1]) - (history_mb[-1] - history_mb[1]), 2)
        if len(anon) > 1 else None,
        "anon_growth_over_round1_rss": round((anon[-1] - anon[1]) / memory[0]["VmRSS"], 4) if len(anon) > 1 else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
