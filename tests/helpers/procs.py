"""Real node processes for reliability tests: homes made as an operator would, `meshfl node start`."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from meshfl.home import Home
from meshfl.node._datasets import DatasetRegistry
from meshfl.node._plans import PlanRegistry, plan_hash
from meshfl.plans import plan_source

from .data import write_blobs_csv


def make_homes(root: Path, n_nodes: int, plan=None, *, listen: str | None = None,
               endpoints: list[str] | None = None, mutual: bool = False,
               node_config: dict | None = None) -> tuple[Path, list[Path]]:
    """A researcher home and ``n_nodes`` node homes with mutual trust, a dataset and ``plan`` approved.

    Node i holds 50 + 10 i samples (so FedAvg weights differ). ``listen``: the researcher's
    endpoint (default an ipc socket under ``root``); ``endpoints``: what each node dials to reach
    it (default ``listen``); ``mutual``: nodes trust each other too (secure aggregation seals
    shares node to node); ``node_config``: extra settings for every node's config."""
    r_path = root / "researcher"
    listen = listen or f"ipc://{root}/r.sock"
    researcher = Home.init(r_path, "researcher", "researcher", listen=listen, heartbeat=0.3, dead_after=3.0)
    node_paths = []
    cards = []
    for i in range(n_nodes):
        path = root / f"node{i}"
        with Home.init(path, "node", f"node{i}", heartbeat=0.3, dead_after=3.0,
                       **(node_config or {})) as home:
            home.trust(researcher.identity.card, endpoints[i] if endpoints else listen)
            researcher.trust(home.identity.card)
            cards.append(home.identity.card)
            csv = write_blobs_csv(path / "blobs.csv", n=50 + 10 * i, seed=i)
            DatasetRegistry(home.store, home.audit).add("blobs", ["blobs"], "csv", csv, target="target")
            if plan is not None:
                plans = PlanRegistry(home.store, home.audit)
                source = plan_source(plan)
                plans.submit(source)
                plans.approve(plan_hash(source))
        node_paths.append(path)
    researcher.close()
    if mutual:
        for path in node_paths:
            with Home.open(path) as home:
                for card in cards:
                    if card.peer_id != home.identity.peer_id:
                        home.trust(card)
    return r_path, node_paths


NODE_COMMAND = [sys.executable, "-m", "meshfl.cli", "-v", "node", "start", "--home"]


def start_node(path: Path, env: dict | None = None) -> subprocess.Popen:
    log = open(path / "node.log", "ab")
    return subprocess.Popen(
        [*NODE_COMMAND, str(path)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})},
    )


def start_console(path: Path, *args: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`meshfl node console` on any free loopback port; returns it and the URL it printed."""
    log = open(path / "console.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshfl.cli", "node", "console", "--home", str(path), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
    )
    lines: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        for text in proc.stdout:
            lines.put(text)
        lines.put(None)  # it exited

    threading.Thread(target=read, daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = None
    if line is None:
        kill(proc)
        raise AssertionError(f"the console printed no URL: {(path / 'console.log').read_text()[-2000:]}")
    found = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
    assert found, line
    return proc, found.group(0)


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
