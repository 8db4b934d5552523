"""A host as a real process (`meshfl host start`), set up from the CLI, SIGKILLed mid-cycle and restarted."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import orjson
import torch
import zmq
from click.testing import CliRunner

from helpers import plans as plan_module
from helpers.hosted import blobs, host_cli, make_host_home, start_host
from helpers.procs import kill, stop
from meshfl.cli import main
from meshfl.crypto import Identity, PeerCard
from meshfl.errors import RequestTimeout
from meshfl.hosted import Backoff, Client
from meshfl.node._plans import plan_hash

PLAN_FILE = Path(plan_module.__file__)


cli = host_cli


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


def _hosted_tasks(node, state):
    return [t for t in node.queue.list() if t.state == state and t.payload.get("kind") == "hosted"]


def test_a_node_whose_host_is_killed_delivers_its_diff_after_the_restart_or_moves_on(tmp_path):
    """A joined node (GatedPlan: it waits at the test's gate; its dataset's policy holds each diff
    for review) and its host, SIGKILLed three times and restarted on the same home:
    A. while the node trains: its ticket still holds after the restart, the diff is counted once;
    B. while it holds its diff: the restarted host forgot the node's slot and a light client took it
       and closed the cycle, so the node's diff is refused (stale_version), dropped with an audit
       record, and the node trains the next cycle;
    C. with its push of that diff in flight (the host hung, then killed): the node gives the push up
       when the link goes down, and the outbox delivers the diff after the restart. The host's history is intact: every version is exactly one diff."""
    import fcntl
    import os
    import signal

    from helpers.data import write_blobs_csv
    from meshfl.home import Home
    from meshfl.node import Node
    from meshfl.node._datasets import DatasetRegistry
    from meshfl.node._joins import Joins
    from meshfl.node._plans import PlanRegistry
    from meshfl.privacy import PolicyTable
    from meshfl.wire import Message

    home = make_host_home(tmp_path)
    gates = tmp_path / "gates"
    gates.mkdir()
    gate = gates / "gate"
    gate.write_bytes(b"")
    source = PLAN_FILE.read_text()
    cli("host", "add-model", "m", "--home", home, "--plan", PLAN_FILE, "--class", "GatedPlan", "--max-clients", "1",
        "--cycle-length", "600", "--training-args", orjson.dumps({"gate": str(gate), "test_fraction": 0}).decode())
    host_card = PeerCard.from_text((home / "keys" / "identity.card").read_text())
    with Home.init(tmp_path / "node", "node", "node", heartbeat=0.3, dead_after=3.0,
                   sandbox_read_paths=[str(gates)]) as h:
        h.trust(host_card, f"ipc://{tmp_path}/host.sock")
        DatasetRegistry(h.store, h.audit).add("blobs", ["blobs"], "csv", write_blobs_csv(tmp_path / "b.csv"),
                                              target="target")
        PolicyTable(h.store, h.audit).set("blobs", review=True)
        Joins(h.store, h.audit).join(host_card.peer_id, "host", "m", "blobs")
        plans = PlanRegistry(h.store, h.audit)
        plans.submit(source, "GatedPlan")
        plans.approve(plan_hash(source))
        node_card = h.identity.card
    light = Identity.generate("light")
    (tmp_path / "cards.txt").write_text(node_card.to_text() + "\n" + light.card.to_text() + "\n")
    cli("host", "enroll", "--home", home, "--cards", tmp_path / "cards.txt")
    ctx = zmq.Context()
    client = Client(f"ipc://{tmp_path}/host.sock", host_card, identity=light, plans=[plan_hash(source)],
                    context=ctx, timeout=2.0)

    def versions():
        while True:
            try:
                [m] = client.call(Message("hosted.status", {"model": "m"})).fields["models"]
                return m["versions"]
            except RequestTimeout:
                assert proc.poll() is None, "the host exited"

    def wait_for(predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.05)

    def held_diff(number):
        """The node's ``number``-th diff, held for review (the node trained it)."""
        wait_for(lambda: len(_hosted_tasks(node, "done")) == number and node.outbox.held(buffers=False))
        [item] = node.outbox.held(buffers=False)
        return item.msg_id

    def release(task_id):
        node.release.decide(task_id, True)
        node.notify_released()

    def audit(kind):
        return [r.fields for r in node.audit.records() if r.event == kind]

    held = open(gate, "rb")
    fcntl.flock(held, fcntl.LOCK_EX)  # the plan waits here
    proc = start_host(home)
    node = Node(tmp_path / "node").start()
    try:
        wait_for(lambda: _hosted_tasks(node, "running"))
        kill(proc)  # A. while the node trains
        proc = start_host(home)
        fcntl.flock(held, fcntl.LOCK_UN)  # from here on the gate stays open
        first = held_diff(1)
        release(first)
        wait_for(lambda: len(versions()) == 2)
        wait_for(lambda: [a["task"] for a in audit("result.acknowledged")] == [first])

        second = held_diff(2)  # B. the node asked again, trained on version 1 and holds its diff
        kill(proc)
        proc = start_host(home)
        ticket = ticket_when_up(client, proc)  # the restarted host has room in the cycle again
        assert ticket["cycle"] == 1 and ticket["version"] == 1
        v1 = client.pull("m", 1)["tensors"]
        client.push("m", ticket["ticket"], 1, {k: torch.full_like(v, 0.5) for k, v in v1.items()}, 10)
        release(second)
        wait_for(lambda: audit("hosted.diff_dropped"))
        assert [(d["task"], d["reason"]) for d in audit("hosted.diff_dropped")] == [(second, "stale_version")]

        third = held_diff(3)  # C. it moved on to the next cycle and holds that diff
        os.kill(proc.pid, signal.SIGSTOP)  # the host hangs...
        release(third)
        wait_for(lambda: any(p.type == "hosted.push" for p in list(node.peer._pending.values())))
        kill(proc)  # ...and dies with the node's push unanswered: the outbox keeps the diff
        proc = start_host(home)
        wait_for(lambda: len(versions()) == 4)
        wait_for(lambda: [a["task"] for a in audit("result.acknowledged")] == [first, third])
        assert not node.outbox.pending(buffers=False)  # (it trains on: a fourth diff may wait for review)
        assert not {first, second, third} & {i.msg_id for i in node.outbox.held(buffers=False)}
        assert not _hosted_tasks(node, "failed") and node.hosted._thread.is_alive()
        history = versions()
        assert [v["version"] for v in history] == [0, 1, 2, 3]
        assert [v["diffs"] for v in history[1:]] == [1, 1, 1]
        models = [client.pull("m", v)["tensors"] for v in range(4)]
    finally:
        node.stop()
        held.close()
        client.close()
        ctx.term()
        assert stop(proc) == 0
    step = history[1]["samples"] / 100  # GatedPlan adds samples / 100; the light client's diff is 0.5
    assert history[3]["samples"] == history[1]["samples"]
    for k in models[0]:
        torch.testing.assert_close(models[1][k], models[0][k] + step)
        torch.testing.assert_close(models[2][k], models[1][k] + 0.5)
        torch.testing.assert_close(models[3][k], models[2][k] + step)
