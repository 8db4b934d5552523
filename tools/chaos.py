#!/usr/bin/env python
"""Chaos: run an experiment over N node processes on loopback while killing them at random.

Nodes (and, with --kill-researcher, the researcher) are SIGKILLed at random instants and started
again; once the kill budget is spent the experiment runs until a round has every node again, then
a few calm rounds. At the end the tool stops everything cleanly, inspects every home and prints
one JSON object:

  rounds_completed         rounds in the researcher's checkpointed history
  rounds_failed_then_resumed  rounds that lost every node (RoundFailed); the researcher resumed
  kills                    how many processes were killed (nodes / researcher)
  tasks_lost               tasks a node accepted that neither finished nor wait in its queue (must be 0)
  double_aggregated        updates aggregated more than once in a round, or a task in two rounds (must be 0)
  nodes_failed_to_rejoin   nodes missing from the final calm round
  audit_chains_verified    every home's hash-chained audit log verifies

With --dp the nodes' datasets have a privacy budget and the experiment trains with client-level
DP, so every result a node releases is debited in its privacy ledger (the release step: outbox,
debit and audit record in one commit). The kills then land in releases too, and the tool adds:

  released                 results the nodes' audit chains record as released
  ledger_entries           debits in the nodes' privacy ledgers
  unaccounted              released results without their debit, debits without a release, and
                           results the researcher aggregated that no ledger debited (must be 0)
  double_debits            results released (or debited) more than once (must be 0)

    python tools/chaos.py --nodes 5 --kills 20
    python tools/chaos.py --nodes 5 --kills 20 --kill-researcher
    python tools/chaos.py --nodes 3 --kills 20 --dp
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
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

from meshfl.home import Home  # noqa: E402

EXPERIMENT = "exp-chaos"
CALM_ROUNDS = 3


# ----------------------------------------------------------------------------- researcher child
def researcher_main(home: str, rounds: int, nodes: int, dp: bool) -> None:
    import logging

    from chaos_plan import ChaosPlan
    from meshfl.privacy import ClientDP
    from meshfl.researcher import Experiment, Researcher, RoundFailed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with Researcher(home) as researcher:
        researcher.wait_for_nodes(1, timeout=120)
        record = researcher.home.store.table("experiments").get(EXPERIMENT)
        report = lambda e: print(f"round {e['round']} nodes={len(e['nodes'])}", flush=True)  # noqa: E731
        if record is None:
            exp = Experiment(researcher, ChaosPlan, ["chaos"], rounds, training_args={"steps": 3, "lr": 0.05},
                             min_nodes=1, round_timeout=8.0, experiment_id=EXPERIMENT, on_round=report, progress=False,
                             dp=ClientDP(noise_multiplier=5.0, clip=1.0) if dp else None)
        else:
            exp = Experiment.resume(researcher, EXPERIMENT, on_round=report, progress=False)
        while True:
            try:
                exp.run()
                break
            except RoundFailed as exc:  # every node of a round was killed: what a user does is resume
                print(f"failed {exc.message}", flush=True)
                threading.Event().wait(0.5)  # let the dead links time out before the retry
                researcher.wait_for_nodes(1, timeout=120)
                exp = Experiment.resume(researcher, EXPERIMENT, on_round=report, progress=False)
    print("finished", flush=True)


# ----------------------------------------------------------------------------- setup and checks
def make_homes(root: Path, n: int, dp: bool) -> tuple[Path, list[Path]]:
    from chaos_plan import ChaosPlan
    from meshfl.node._datasets import DatasetRegistry
    from meshfl.node._plans import PlanRegistry, plan_hash
    from meshfl.plans import plan_source
    from meshfl.privacy import PolicyTable

    listen = f"ipc://{root}/researcher.sock"
    timing = {"heartbeat": 0.3, "dead_after": 2.0}
    r_home = Home.init(root / "researcher", "researcher", "researcher", listen=listen, **timing)
    source = plan_source(ChaosPlan)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"node{i}"
        y = rng.integers(0, 2, 80)
        x = rng.normal(size=(80, 4)) + 2.0 * y[:, None]
        np.savetxt(path.parent / f"node{i}.csv", np.column_stack([x, y]), delimiter=",",
                   header="a,b,c,d,target", comments="")
        with Home.init(path, "node", f"node{i}", task_timeout=30.0, **timing) as home:
            home.trust(r_home.identity.card, listen)
            r_home.trust(home.identity.card)
            DatasetRegistry(home.store, home.audit).add("chaos", ["chaos"], "csv", path.parent / f"node{i}.csv",
                                                        target="target")
            plans = PlanRegistry(home.store, home.audit)
            plans.submit(source)
            plans.approve(plan_hash(source))
            if dp:  # a budget no run of this tool spends: every release is debited, none refused
                PolicyTable(home.store, home.audit).set("chaos", epsilon=1e6)
        paths.append(path)
    r_home.close()
    return root / "researcher", paths


def start_node(path: Path) -> subprocess.Popen:
    log = open(path.parent / f"{path.name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "meshfl.cli", "-v", "node", "start", "--home", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def start_researcher(home: Path, rounds: int, nodes: int, dp: bool, lines: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "--researcher-child", str(home), str(rounds), str(nodes),
                             "dp" if dp else "plain"],
                            stdout=subprocess.PIPE, stderr=open(home.parent / "researcher.log", "ab"),
                            text=True, start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return proc


def sigkill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # with its training worker
        except ProcessLookupError:
            pass
    proc.wait()


def inspect_node(path: Path) -> dict:
    from meshfl.privacy import Ledger
    from meshfl.store import Outbox, TaskQueue

    with Home.open(path) as home:
        records = home.audit.records()
        accepted = {r.fields["task"] for r in records if r.event == "task.accepted"}
        queue, outbox = TaskQueue(home.store, "tasks"), Outbox(home.store, "outbox")
        lost = []
        for task_id in accepted:
            task = queue.get(task_id)
            if task is None:
                lost.append(task_id)
            elif task.state in ("done", "failed"):
                acked = any(r.event == "result.acknowledged" and r.fields.get("task") == task_id for r in records)
                if not acked and outbox.get(task_id) is None:
                    lost.append(task_id)
        released = [r.fields["task"] for r in records if r.event == "result.released"]
        debited = [e["task"] for e in Ledger(home.store).entries()]
        return {"lost": lost, "audit_ok": home.audit.verify().ok, "accepted": len(accepted),
                "released": released, "debited": debited}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--kill-researcher", action="store_true", help="also kill and resume the researcher")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    ap.add_argument("--keep", action="store_true", help="keep the homes and logs (printed as 'root')")
    ap.add_argument("--dp", action="store_true", help="client-level DP against a budget: check the privacy ledger")
    ap.add_argument("--researcher-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.researcher_child:
        home, rounds, nodes, mode = args.researcher_child
        researcher_main(home, int(rounds), int(nodes), mode == "dp")
        return

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="meshfl-chaos-"))
    lines: list[str] = []
    nodes: list[subprocess.Popen] = []
    researcher = None
    kills = {"nodes": 0, "researcher": 0}
    deadline = time.monotonic() + args.timeout
    try:
        r_path, node_paths = make_homes(root, args.nodes, args.dp)
        nodes = [start_node(p) for p in node_paths]
        rounds = 10_000  # chaos runs until the kill budget is spent, then CALM_ROUNDS more
        researcher = start_researcher(r_path, rounds, args.nodes, args.dp, lines)
        while not any(line.startswith("round") for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        while kills["nodes"] + kills["researcher"] < args.kills and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.2, 1.5))
            if args.kill_researcher and rng.random() < 0.2:
                sigkill(researcher)
                kills["researcher"] += 1
                researcher = start_researcher(r_path, rounds, args.nodes, args.dp, lines)
                continue
            i = rng.randrange(len(nodes))
            sigkill(nodes[i])
            kills["nodes"] += 1
            if rng.random() < 0.7:  # most come back soon; some stay down a while
                nodes[i] = start_node(node_paths[i])
            else:
                time.sleep(rng.uniform(0.5, 2.0))
                nodes[i] = start_node(node_paths[i])
        # Calm: every node is started again. Wait for a round that all of them joined (a node
        # takes seconds to start), then a few more rounds, then stop the researcher there.
        seen = len(lines)
        full = f"nodes={args.nodes}"
        while not any(line.endswith(full) for line in lines[seen:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = sum(line.startswith("round") for line in lines)
        while sum(line.startswith("round") for line in lines) < seen + CALM_ROUNDS and time.monotonic() < deadline:
            time.sleep(0.2)
        sigkill(researcher)
        for proc in nodes:
            proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sigkill(proc)

        with Home.open(r_path) as home:
            from meshfl.researcher import Experiment

            history = Experiment.saved_history(home.store, EXPERIMENT)
            researcher_audit_ok = home.audit.verify().ok
        tasks = [info["task"] for entry in history for info in entry["nodes"].values()]
        double = sum(entry["updates"] - len(entry["nodes"]) for entry in history) + (len(tasks) - len(set(tasks)))
        last = history[-1]["nodes"] if history else {}
        inspected = {p.name: inspect_node(p) for p in node_paths}
        out = {
            "nodes": args.nodes,
            "rounds_completed": len(history),
            "rounds_failed_then_resumed": sum(line.startswith("failed") for line in lines),
            "kills": kills,
            "tasks_accepted": sum(v["accepted"] for v in inspected.values()),
            "tasks_lost": sum(len(v["lost"]) for v in inspected.values()),
            "double_aggregated": double,
            "nodes_failed_to_rejoin": sorted(set(p.name for p in node_paths) - set(last)),
            "audit_chains_verified": researcher_audit_ok and all(v["audit_ok"] for v in inspected.values()),
            "timed_out": time.monotonic() >= deadline,
        }
        ok = True
        if args.dp:
            released = [t for v in inspected.values() for t in v["released"]]
            debited = [t for v in inspected.values() for t in v["debited"]]
            out.update(released=len(released), ledger_entries=len(debited),
                       unaccounted=len(set(released) ^ set(debited)) + len(set(tasks) - set(debited)),
                       double_debits=(len(released) - len(set(released))) + (len(debited) - len(set(debited))))
            ok = out["unaccounted"] == 0 and out["double_debits"] == 0
        print(json.dumps(out, indent=2))
        ok = ok and out["tasks_lost"] == 0 and double == 0 and not out["nodes_failed_to_rejoin"] \
            and out["audit_chains_verified"]
        sys.exit(0 if ok and not out["timed_out"] else 1)
    finally:
        for proc in [*nodes, *([researcher] if researcher else [])]:
            sigkill(proc)
        if args.keep:
            print(f"root: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
