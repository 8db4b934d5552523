"""A host as a real process (`meshfl host start`), set up from the CLI, SIGKILLed mid-cycle and restarted."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import torch
import zmq
from click.testing import CliRunner

from helpers import plans as plan_module
from helpers.hosted import blobs, make_host_home
from helpers.procs import kill, stop
from meshfl.cli import main
from meshfl.crypto import Identity, PeerCard
from meshfl.errors import RequestTimeout
from meshfl.hosted import Backoff, Client
from meshfl.node._plans import plan_hash

PLAN_FILE = Path(plan_module.__file__)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def start_host(home: Path) -> subprocess.Popen:
    log = open(home / "host.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "meshfl.cli", "-v", "host", "start", "--home", str(home)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def ticket_when_up(client: Client, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the host exited"
        try:
            answer = client.request("m")
            assert not isinstance(answer, Backoff), answer
            return answer.fields
        except RequestTimeout:
            assert time.monotonic() < deadline, "the host did not come up"


def test_a_host_killed_mid_cycle_restarts_with_every_acknowledged_diff_counted_once(tmp_path):
    home = make_host_home(tmp_path)
    ids = [Identity.generate(f"c{i}") for i in range(3)]
    (tmp_path / "cards.txt").write_text("# ward 3\n" + "\n".join(i.card.to_text() for i in ids) + "\n")
    assert "3 new" in cli("host", "enroll", "--home", home, "--cards", tmp_path / "cards.txt")
    cli("host", "add-model", "m", "--home", home, "--plan", PLAN_FILE, "--class", "TinyPlan",
        "--max-clients", "3", "--cycle-length", "600", "--training-args", '{"epochs": 1}')
    approved = plan_hash(PLAN_FILE.read_text())
    ctx = zmq.Context()
    cs = [Client(f"ipc://{tmp_path}/host.sock", PeerCard.from_text((home / "keys" / "identity.card").read_text()),
                 identity=i, data=blobs(30 + 10 * n, n), plans=[approved], context=ctx, timeout=1.0)
          for n, i in enumerate(ids)]
    proc = start_host(home)
    try:
        tickets = [ticket_when_up(c, proc) for c in cs]
        v0 = cs[0].pull("m", 0)["tensors"]
        fill = lambda x: {k: torch.full_like(v, x) for k, v in v0.items()}  # noqa: E731
        cs[0].push("m", tickets[0]["ticket"], 0, fill(1.0), 10, diff_id="a")
        cs[1].push("m", tickets[1]["ticket"], 0, fill(2.0), 30, diff_id="b")
        kill(proc)  # SIGKILL, mid-cycle: two diffs acknowledged, one to come
        proc = start_host(home)
        assert ticket_when_up(cs[2], proc)["ticket"] == tickets[2]["ticket"]  # its slot survived too
        assert cs[1].push("m", tickets[1]["ticket"], 0, fill(2.0), 30, diff_id="b").fields["duplicate"]
        cs[2].push("m", tickets[2]["ticket"], 0, fill(-1.0), 20, diff_id="c")
        status = orjson.loads(cli("host", "status", "--home", home, "m", "--json"))
        [m] = status
        assert m["version"] == 1 and [v["version"] for v in m["versions"]] == [0, 1]
        assert m["versions"][1]["diffs"] == 3 and m["versions"][1]["clients"] == 3
        v1 = cs[0].pull("m", 1)["tensors"]
        for k in v0:
            torch.testing.assert_close(v1[k], v0[k] + (10 * 1.0 + 30 * 2.0 - 20 * 1.0) / 60)
        assert "VERSION" in cli("host", "status", "--home", home)
    finally:
        for c in cs:
            c.close()
        ctx.term()
        assert stop(proc) == 0


def test_token_commands(tmp_path):
    home = make_host_home(tmp_path)
    created = orjson.loads(cli("host", "token", "create", "--home", home, "--uses", "3", "--label", "lab", "--json"))
    assert created["token"].startswith(created["id"] + ".")
    [row] = orjson.loads(cli("host", "token", "list", "--home", home, "--json"))
    assert row["uses_left"] == 3 and not row["revoked"] and "secret_sha256" not in row
    cli("host", "token", "revoke", "--home", home, created["id"])
    [row] = orjson.loads(cli("host", "token", "list", "--home", home, "--json"))
    assert row["revoked"]
    result = CliRunner().invoke(main, ["host", "status", "--home", str(home), "nope"])
    assert result.exit_code == 1 and "no hosted model" in result.output
