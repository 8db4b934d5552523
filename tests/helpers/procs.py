"""Real node processes for reliability tests: homes made as an operator would, `meshfl node start`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from meshfl.home import Home
from meshfl.node._datasets import DatasetRegistry
from meshfl.node._plans import PlanRegistry, plan_hash
from meshfl.plans import plan_source

from .data import write_blobs_csv


def make_homes(root: Path, n_nodes: int, plan=None) -> tuple[Path, list[Path]]:
    """A researcher home and ``n_nodes`` node homes with mutual trust, a dataset and ``plan`` approved."""
    r_path = root / "researcher"
    researcher = Home.init(r_path, "researcher", "researcher", listen=f"ipc://{root}/r.sock", heartbeat=0.3, dead_after=3.0)
    node_paths = []
    for i in range(n_nodes):
        path = root / f"node{i}"
        with Home.init(path, "node", f"node{i}", heartbeat=0.3, dead_after=3.0) as home:
            home.trust(researcher.identity.card, researcher.config.listen)
            researcher.trust(home.identity.card)
            csv = write_blobs_csv(path / "blobs.csv", n=50, seed=i)
            DatasetRegistry(home.store, home.audit).add("blobs", ["blobs"], "csv", csv, target="target")
            if plan is not None:
                plans = PlanRegistry(home.store, home.audit)
                source = plan_source(plan)
                plans.submit(source)
                plans.approve(plan_hash(source))
        node_paths.append(path)
    researcher.close()
    return r_path, node_paths


def start_node(path: Path, env: dict | None = None) -> subprocess.Popen:
    log = open(path / "node.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "meshfl.cli", "node", "start", "--home", str(path)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})},
    )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (the node and its worker), then reap."""
    if proc.poll() is None:
        try:
            if os.getpgid(proc.pid) == proc.pid:  # its own group: take its children along
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
    return proc.returncode
