"""Hosts and light clients for the hosted-model tests: a researcher home, enrolled in-memory clients."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from meshfl.crypto import Identity
from meshfl.home import Home
from meshfl.hosted import Client, Host


def blobs(n: int, seed: int, features: int = 4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, features)) + y[:, None] * 2.0
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Until ``predicate()`` holds: a bounded wait (an assertion error when it runs out)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def make_host_home(root: Path) -> Path:
    path = root / "host"
    Home.init(path, "researcher", "host", listen=f"ipc://{root}/host.sock", heartbeat=0.3, dead_after=3.0).close()
    return path


def clients(host: Host, n: int, plan, *, context: zmq.Context, samples: int = 40, enroll: bool = True,
            timeout: float = 10.0, **kw) -> list[Client]:
    out = []
    for i in range(n):
        ident = Identity.generate(f"c{i}")
        out.append(Client(host.endpoint, host.card, identity=ident, data=blobs(samples + 5 * i, i), plans=[plan],
                          context=context, timeout=timeout, **kw))
    if enroll:
        host.enroll([c.card for c in out])
    return out


def host_cli(*args) -> str:
    """Run ``meshfl ARGS`` in this process (click's runner); fails the test on a non-zero exit."""
    from click.testing import CliRunner

    from meshfl.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def start_host(home: Path) -> subprocess.Popen:
    """``meshfl host start`` as its own process (its own session: the test kills it by pid)."""
    log = open(home / "host.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "meshfl.cli", "-v", "host", "start", "--home", str(home)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
