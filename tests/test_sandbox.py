"""The plan sandbox: hostile plans fail their task with ``plan_violation``, audited, and the node
goes on (real node worker processes, each confined as in production)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from helpers.data import write_blobs_csv
from helpers.hostile_plans import GreedyPlan, ScratchPlan, ShellPlan, SnoopPlan, SocketPlan, SpinPlan, UncapPlan, WreckPlan
from helpers.plans import TinyPlan
from meshfl.node._sandbox import protections
from meshfl.researcher import Experiment, RoundFailed
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(180)

CAP_MB = 1536


@pytest.fixture(scope="module")
def mesh():
    with FederatedMesh(1, node_config={"plan_memory_mb": CAP_MB, "plan_cpu_seconds": 3.0}) as m:
        node = m.nodes[0]
        node.datasets.add("blobs", ["blobs"], "csv", write_blobs_csv(node.home.path / "blobs.csv", n=40), target="target")
        for plan in (TinyPlan, GreedyPlan, SocketPlan, SnoopPlan, ShellPlan, SpinPlan, ScratchPlan, WreckPlan,
                     UncapPlan):
            m.approve(plan)
        yield m


def _round(mesh, plan, **args):
    exp = Experiment(mesh.researcher, plan, ["blobs"], 1, training_args=args, round_timeout=60, progress=False)
    return exp.run()


def _violation(mesh, plan, **args) -> str:
    with pytest.raises(RoundFailed) as caught:
        _round(mesh, plan, **args)
    (error,) = caught.value.details["failed"].values()
    assert error["code"] == "plan_violation", error
    node = mesh.nodes[0]
    last = [r for r in node.audit.records(start=max(0, len(node.audit) - 10)) if r.event == "plan.violation"]
    assert last and last[-1].fields["what"] == error["message"]  # audited, saying what the plan did
    _round(mesh, TinyPlan)  # and the node goes on: the next task trains in a fresh worker
    return error["message"]


def test_the_worker_reports_its_protections(mesh):
    protections = mesh.nodes[0].executor.protections
    assert protections["network"] == "namespace"  # root here, as in CI: user + network namespace
    assert protections["memory_mb"] == CAP_MB and protections["audit_hook"] and protections["scratch"]
    started = [r for r in mesh.nodes[0].audit.records() if r.event == "node.started"][-1]
    assert started.fields["sandbox"] == protections


def test_a_plan_that_allocates_ten_times_the_cap_fails(mesh):
    assert "memory cap" in _violation(mesh, GreedyPlan, megabytes=10 * CAP_MB)


def test_a_plan_that_opens_a_socket_fails_even_if_it_swallows_the_refusal(mesh):
    with socket.socket() as listener:  # a real listener on the host's loopback: nothing may reach it
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        message = _violation(mesh, SocketPlan, port=listener.getsockname()[1])
        with pytest.raises(socket.timeout):
            listener.accept()
    assert "socket" in message


def test_a_plan_that_reads_etc_passwd_fails(mesh):
    assert "/etc/passwd" in _violation(mesh, SnoopPlan)


def test_a_plan_that_deletes_a_file_of_the_node_fails_and_the_file_stays(mesh):
    victim = mesh.nodes[0].home.path / "victim.txt"
    victim.write_text("the operator's")
    assert "os.remove" in _violation(mesh, WreckPlan, victim=str(victim))
    assert victim.read_text() == "the operator's"


def test_a_plan_that_forks_a_shell_fails(mesh):
    assert "process" in _violation(mesh, ShellPlan)


def test_a_plan_that_burns_cpu_past_its_cap_fails(mesh):
    assert "CPU-time cap" in _violation(mesh, SpinPlan)


def test_a_plan_that_lifts_its_own_cpu_cap_fails(mesh):
    assert "resource limits" in _violation(mesh, UncapPlan)


def test_a_plan_writes_only_in_its_scratch_folder_which_is_removed_after(mesh):
    history = _round(mesh, ScratchPlan)
    (info,) = history[0]["nodes"].values()
    assert info["metrics"]["in_scratch"] == 1.0 and info["metrics"]["wrote"] == 1.0
    scratch = mesh.nodes[0].home.path / "scratch"
    assert not any(any(folder.iterdir()) for folder in scratch.iterdir())  # what the plan wrote went with it


def test_the_network_namespace_is_enforced_by_the_kernel_not_only_by_the_hook(tmp_path):
    """Without the audit hook, a confined process still cannot reach the host's loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        code = (
            "import json, socket, sys; from meshfl.node._sandbox import isolate; "
            "done = isolate(json.loads(sys.argv[1])); "
            "s = socket.socket(); s.settimeout(2)\n"
            "try:\n    s.connect(('127.0.0.1', int(sys.argv[2]))); print(json.dumps([done, 'connected']))\n"
            "except OSError as e:\n    print(json.dumps([done, type(e).__name__]))"
        )
        port = str(listener.getsockname()[1])
        confined = subprocess.run([sys.executable, "-c", code, json.dumps({"network": True}), port],
                                  capture_output=True, text=True, timeout=60, check=True)
        free = subprocess.run([sys.executable, "-c", code, json.dumps({"network": False}), port],
                              capture_output=True, text=True, timeout=60, check=True)
    done, outcome = json.loads(confined.stdout)
    assert done["network"] == "namespace" and outcome != "connected"
    assert json.loads(free.stdout)[1] == "connected"


def test_the_protections_shown_to_the_operator_are_only_those_this_machine_gives():
    settings = {"memory_mb": 512, "cpu_seconds": 60.0, "read_paths": ["/srv/reference"]}
    full = {r["name"]: r for r in protections(settings, {"network": "namespace", "memory_cap": True, "audit_hook": True})}
    assert all(r["on"] for r in full.values()) and "512 MiB" in full["Memory cap"]["note"]
    assert "60 s per task" in full["CPU-time cap"]["note"] and "1 more folder" in full["Audit hook"]["note"]
    bare = {r["name"]: r for r in protections(settings, {"network": "none", "memory_cap": False, "audit_hook": True})}
    assert bare["No network"]["on"] is False and "NOT isolated" in bare["No network"]["note"]
    assert bare["Memory cap"]["on"] is False and bare["Audit hook"]["on"] is True
    (off,) = protections(None, None)  # config.toml: sandbox = false
    assert off["on"] is False and "sandbox = false" in off["note"]
