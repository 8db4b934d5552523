"""meshfl.cli: every command through click's runner, plus one run of the real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import click
import numpy as np
import orjson
import pytest
from click.testing import CliRunner

import meshfl
from meshfl.cli import main
from meshfl.cli._home import DEFAULT_RESEARCHER_LISTEN
from meshfl.home import Home
from meshfl.node._plans import PlanRegistry

PLAN = "class Plan:\n    pass\n"


def run(*args, ok=True, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if ok:
        assert result.exit_code == 0, (result.output, result.stderr, result.exception)
    return result


def run_json(*args):
    return orjson.loads(run(*args, "--json").stdout)


@pytest.fixture
def node(tmp_path):
    home = tmp_path / "node"
    run("init", "--home", home, "--role", "node", "--name", "site-a")
    return home


@pytest.fixture
def researcher(tmp_path):
    home = tmp_path / "lab"
    run("init", "--home", home, "--role", "researcher", "--name", "lab")
    return home


def all_commands(group=main, path=()):
    for name, command in group.commands.items():
        yield path + (name,)
        if isinstance(command, click.Group):
            yield from all_commands(command, path + (name,))


def test_every_command_has_help():
    commands = list(all_commands())
    assert len(commands) >= 20
    for path in [()] + commands:
        result = run(*path, "--help")
        assert "Usage:" in result.output
    for path in commands:
        command = main
        for name in path:
            command = command.commands[name]
        assert command.help, path
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, (path, param.name)


def test_commands_that_read_the_home_start_without_torch(tmp_path):
    """`import meshfl.cli` leaves torch (most of a second to import) to the commands that train."""
    Home.init(tmp_path / "n", "node", "n").close()
    probe = ("import sys; from meshfl.cli import main; sys.argv = ['meshfl', 'dataset', 'list', '--home', sys.argv[1]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "n")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "no datasets" in out.stdout, out.stderr


def test_version():
    assert run("--version").output.strip() == f"meshfl {meshfl.__version__}"


def test_init_and_peer_id(tmp_path):
    home = tmp_path / "h"
    info = run_json("init", "--home", home, "--role", "researcher", "--name", "lab")
    assert info["listen"] == DEFAULT_RESEARCHER_LISTEN and info["card"].startswith("meshfl1:")  # written, not bound
    assert run_json("peer", "id", "--home", home)["peer_id"] == info["peer_id"]
    text = run("peer", "id", env={"MESHFL_HOME": str(home)}).output
    assert info["peer_id"] in text and info["card"] in text
    result = run("init", "--home", home, "--role", "node", "--name", "x", ok=False)
    assert result.exit_code == 1 and "already a meshfl home" in result.stderr
    other = run_json("init", "--home", tmp_path / "r2", "--role", "researcher", "--name", "lab2",
                     "--listen", "tcp://127.0.0.1:6543")
    assert other["listen"] == "tcp://127.0.0.1:6543"


def test_user_errors_are_one_line(tmp_path):
    result = run("node", "status", "--home", tmp_path / "missing", ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("meshfl: error: no meshfl home")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert "meshfl init" in result.stderr
    result = run("peer", "trust", "--home", tmp_path, "--key", "meshfl1:garbage", ok=False)
    assert result.exit_code == 1 and result.stderr.startswith("meshfl: error:")


def test_trust_list_revoke(node, researcher):
    card = run_json("peer", "id", "--home", researcher)["card"]
    entry = run_json("peer", "trust", "--home", node, "--key", card, "--name", "the-lab",
                     "--endpoint", "tcp://127.0.0.1:5555")
    assert entry["name"] == "the-lab" and entry["card"] == card
    [listed] = run_json("peer", "list", "--home", node)
    assert listed["peer_id"] == entry["peer_id"]
    assert "the-lab" in run("peer", "list", "--home", node).output
    assert run_json("peer", "revoke", "--home", node, "the-lab")["revoked"] is True
    assert run_json("peer", "list", "--home", node) == []
    result = run("peer", "revoke", "--home", node, "the-lab", ok=False)
    assert result.exit_code == 1 and "no trusted peer" in result.stderr


def test_datasets(node, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((30, 5)), y=np.zeros(30))
    (tmp_path / "d.csv").write_text("a,b\n1,2\n3,4\n")
    record = run_json("dataset", "add", "--home", node, "--name", "arr", "--tags", "A, b",
                      "--format", "npz", "--path", tmp_path / "d.npz", "--description", "zeros")
    assert record["samples"] == 30 and record["shape"] == [30, 5] and record["tags"] == ["a", "b"]
    result = run("dataset", "add", "--home", node, "--name", "tiny", "--tags", "t", "--format",
                 "csv", "--path", tmp_path / "d.csv", "--target", "b")
    assert "minimum_samples" in result.stderr
    assert [r["name"] for r in run_json("dataset", "list", "--home", node)] == ["arr", "tiny"]
    assert "arr" in run("dataset", "list", "--home", node).output
    assert run_json("dataset", "show", "--home", node, "tiny")["columns"] == ["a", "b"]
    assert "columns:" in run("dataset", "show", "--home", node, "tiny").output
    assert run_json("dataset", "remove", "--home", node, "tiny")["removed"] is True
    result = run("dataset", "show", "--home", node, "tiny", ok=False)
    assert result.exit_code == 1 and "no dataset named 'tiny'" in result.stderr
    result = run("dataset", "add", "--home", node, "--name", "arr", "--tags", "t", "--format",
                 "npz", "--path", tmp_path / "d.npz", ok=False)
    assert result.exit_code == 1 and "already registered" in result.stderr


def test_node_commands_need_a_node_home(researcher):
    result = run("dataset", "list", "--home", researcher, ok=False)
    assert result.exit_code == 1 and "needs a node home" in result.stderr


def test_plans(node):
    with Home.open(node) as home:
        digest = PlanRegistry(home.store, home.audit).submit(PLAN, name="p", requester="lab")["hash"]
    [listed] = run_json("plan", "list", "--home", node, "--status", "pending")
    assert listed["hash"] == digest and "source" not in listed
    shown = run("plan", "show", "--home", node, digest[:8]).output
    assert digest in shown and shown.endswith(PLAN)
    assert run_json("plan", "show", "--home", node, digest[:8])["source"] == PLAN
    assert run_json("plan", "approve", "--home", node, digest[:10], "--by", "ann")["status"] == "approved"
    assert run_json("plan", "list", "--home", node, "--status", "pending") == []
    assert "rejected" in run("plan", "reject", "--home", node, digest).output
    assert run_json("plan", "remove", "--home", node, digest[:8])["removed"] is True
    result = run("plan", "approve", "--home", node, digest[:8], ok=False)
    assert result.exit_code == 1 and "no training plan" in result.stderr
    result = run("plan", "show", "--home", node, "abc", ok=False)
    assert result.exit_code == 1 and "8 or more" in result.stderr


def test_plan_diff_against_the_approved_plan_it_replaces(node):
    changed = PLAN.replace("pass", "x = 1")
    with Home.open(node) as home:
        plans = PlanRegistry(home.store, home.audit)
        old = plans.submit(PLAN, name="p")["hash"]
        plans.approve(old, by="ann")
        new = plans.submit(changed, name="p")["hash"]
    [listed] = run_json("plan", "list", "--home", node, "--status", "pending")
    assert listed["changes"] == f"+1 -1 against {old[:8]}"
    assert "CHANGES" in run("plan", "list", "--home", node).output
    shown = run("plan", "show", "--home", node, new[:8], "--diff").output
    assert f"changes against {old} (p, approved by ann" in shown
    assert shown.endswith("-    pass\n+    x = 1\n") and "class Plan:" in shown  # context lines
    data = run_json("plan", "show", "--home", node, new[:8], "--diff")
    assert data["diff"]["base"]["hash"] == old and data["diff"]["added"] == 1 and data["source"] == changed
    first = run("plan", "show", "--home", node, old[:8], "--diff").output
    assert "no approved plan with the same name or class" in first and first.endswith(PLAN)


def test_console_that_cannot_listen_is_a_one_line_error(node):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("node", "console", "--home", node, "--port", port, ok=False)
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_node_status(node):
    info = run_json("node", "status", "--home", node)
    assert info["name"] == "site-a" and info["dev"] is False and info["datasets"] == 0
    assert info["running"] is None  # no node process holds the home
    assert info["tasks"]["pending"] == 0 and info["outbox"] == 0 and info["audit"] >= 1
    assert set(info["plans"]) == {"pending", "approved", "rejected"}
    assert "site-a" in run("node", "status", "--home", node).output


def test_audit_verify_detects_tampering(node, researcher):
    card = run_json("peer", "id", "--home", researcher)["card"]
    run("peer", "trust", "--home", node, "--key", card)
    run("peer", "revoke", "--home", node, "lab")
    records = run_json("audit", "list", "--home", node)
    assert [r["event"] for r in records] == ["home.init", "peer.trust", "peer.revoke"]
    assert len(run_json("audit", "list", "--home", node, "--limit", "2")) == 2
    assert run_json("audit", "verify", "--home", node)["ok"] is True
    assert "audit log ok: 3 records" in run("audit", "verify", "--home", node).output

    with Home.open(node) as home:  # rewrite history: pretend the trusted peer had another name
        table = home.store.table("audit")
        key, record = table.items()[1]
        record["fields"]["name"] = "someone-else"
        table.put(key, record)
    result = run("audit", "verify", "--home", node, ok=False)
    assert result.exit_code == 1
    assert result.stderr.strip() == ("meshfl: error: audit log tampered: record 1 fails "
                                     "(hash mismatch); 1 records before it verify")
    result = run("audit", "verify", "--home", node, "--json", ok=False)
    assert result.exit_code == 1
    assert orjson.loads(result.stdout)["first_bad"] == 1


def test_node_start_and_demo_are_wired(node, monkeypatch):
    calls = []

    class FakeNode:
        def __init__(self, home, dev=False):
            calls.append(("node", str(home), dev))

        def run(self):
            calls.append("run")

    import meshfl.node

    monkeypatch.setattr(meshfl.node, "Node", FakeNode, raising=False)
    run("node", "start", "--home", node, "--dev")
    run("node", "start", "--home", node)  # without --dev, config.toml decides
    assert calls == [("node", str(node), True), "run", ("node", str(node), None), "run"]

    def run_demo(**kwargs):
        return {"called_with": kwargs}

    monkeypatch.setitem(sys.modules, "meshfl.demo", types.SimpleNamespace(run_demo=run_demo))
    out = run_json("demo", "--nodes", "2", "--rounds", "1", "--secagg")
    assert out == {"called_with": {"nodes": 2, "rounds": 1, "secagg": True, "json_output": True, "plot": None}}
    assert run_json("demo", "--plot", "c.png")["called_with"]["plot"] == "c.png"


def test_real_entry_point(tmp_path):
    env = {**os.environ, "MESHFL_HOME": str(tmp_path / "h")}
    cmd = [sys.executable, "-m", "meshfl.cli"]
    done = subprocess.run(cmd + ["init", "--role", "node", "--name", "n", "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    peer_id = orjson.loads(done.stdout)["peer_id"]
    done = subprocess.run([sys.executable, "-m", "meshfl", "peer", "id", "--json"], env=env, capture_output=True,
                          text=True, timeout=60)  # python -m meshfl is the same command
    assert done.returncode == 0 and orjson.loads(done.stdout)["peer_id"] == peer_id
    done = subprocess.run(cmd + ["plan", "approve", "deadbeef"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.startswith("meshfl: error:")
    assert "Traceback" not in done.stderr
