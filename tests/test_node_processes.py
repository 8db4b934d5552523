"""Real `meshfl node start` processes, killed with SIGKILL: nothing acknowledged is lost."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import torch

from helpers.plans import HangingPlan, TinyPlan
from helpers.procs import kill, make_homes, start_node, stop
from meshfl.home import Home
from meshfl.plans import plan_source
from meshfl.researcher import Researcher
from meshfl.store import Outbox
from meshfl.wire import Message

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
HELPERS = Path(__file__).parent / "helpers"


def _train(plan, task_id: str, training_args: dict | None = None) -> Message:
    fields = {
        "task_id": task_id, "experiment": task_id.split(".")[0], "round": 1, "plan_source": plan_source(plan),
        "plan_class": plan.__name__, "dataset_tags": ["blobs"], "training_args": training_args or {}, "model_args": {},
    }
    return Message("train", fields, plan().init_model().state_dict())


def _next(inbox: queue.SimpleQueue, mtype: str, timeout: float = 60.0) -> Message:
    deadline = time.monotonic() + timeout
    while True:
        msg = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, Message) and msg.type == mtype:  # (the researcher also posts link events)
            return msg


def test_unacknowledged_result_is_delivered_after_a_node_restart(tmp_path):
    r_path, (n_path,) = make_homes(tmp_path, 1, plan=TinyPlan)
    node = start_node(n_path)
    researcher = Researcher(r_path).start()
    try:
        (node_id,) = researcher.wait_for_nodes(1, timeout=60)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        task_id = "exp-t.r1.a0.n"
        researcher._route([task_id], inbox)  # we take train.done ourselves and never acknowledge it
        accepted = researcher.peer.call(node_id, _train(TinyPlan, task_id, {"epochs": 1}), timeout=30)
        assert accepted.fields["state"] == "pending"
        first = _next(inbox, "train.done")
        assert first.fields["ok"] and first.fields["inline"]

        kill(node)  # SIGKILL with the result unacknowledged
        with Home.open(n_path) as home:
            assert [i.msg_id for i in Outbox(home.store, "outbox").pending()] == [task_id]
        node = start_node(n_path)
        again = _next(inbox, "train.done")  # re-sent by the restarted node, unasked
        assert again.fields["task_id"] == task_id
        for name, tensor in first.tensors.items():
            assert torch.equal(tensor, again.tensors[name])
        # Re-sending the same request is answered, never run twice.
        dup = researcher.peer.call(node_id, _train(TinyPlan, task_id, {"epochs": 1}), timeout=30)
        assert dup.fields["state"] == "done"
        researcher.send(node_id, Message("result.ack", {"task_id": task_id})).result(timeout=10)
        assert stop(node) == 0  # SIGTERM: a clean stop
        with Home.open(n_path) as home:
            assert len(Outbox(home.store, "outbox")) == 0
            assert home.audit.verify().ok
            events = [r.event for r in home.audit.records()]
            assert events.count("task.finished") == 1 and "result.acknowledged" in events
    finally:
        researcher.close()
        kill(node)


def test_resume_after_killing_the_researcher_between_rounds(tmp_path):
    r_path, node_paths = make_homes(tmp_path, 2, plan=TinyPlan)
    nodes = [start_node(p) for p in node_paths]
    script = [sys.executable, str(HELPERS / "run_experiment.py"), str(r_path), "4", "exp-resume"]
    first = subprocess.Popen([*script, "pause-after-2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "round 2 done" not in line and time.monotonic() < deadline:
            line = first.stdout.readline()
            assert line, "the researcher died before round 2"
        kill(first)  # the researcher dies after its round-2 checkpoint
        second = subprocess.run([*script, "resume"], capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, second.stderr[-2000:]
        result = orjson.loads(second.stdout.split("RESULT ", 1)[1])
        assert result["rounds"] == [1, 2, 3, 4] and result["attempt"] >= 1
        assert "round 3 done" in second.stdout and "round 2 done" not in second.stdout
        # With fixed seeds the resumed run ends with the same model as an uninterrupted one.
        straight_cmd = [sys.executable, str(HELPERS / "run_experiment.py"), str(r_path), "4", "exp-straight", "new"]
        straight = subprocess.run(straight_cmd, capture_output=True, text=True, timeout=180)
        assert straight.returncode == 0, straight.stderr[-2000:]
        expected = orjson.loads(straight.stdout.split("RESULT ", 1)[1])
        for name, value in expected["state"].items():
            assert torch.allclose(torch.tensor(result["state"][name]), torch.tensor(value), atol=1e-6), name
    finally:
        for proc in (first, *nodes):
            try:
                kill(proc)
            except Exception:  # keep killing the others
                pass


def test_a_task_running_when_the_node_dies_is_reported_failed_after_restart(tmp_path):
    r_path, (n_path,) = make_homes(tmp_path, 1, plan=HangingPlan)
    node = start_node(n_path)
    researcher = Researcher(r_path).start()
    try:
        (node_id,) = researcher.wait_for_nodes(1, timeout=60)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        task_id = "exp-h.r1.a0.n"
        researcher._route([task_id], inbox)
        researcher.peer.call(node_id, _train(HangingPlan, task_id), timeout=30)
        with Home.open(n_path) as home:  # wait until the runner has claimed it
            from meshfl.store import TaskQueue

            tasks = TaskQueue(home.store, "tasks")
            deadline = time.monotonic() + 30
            while tasks.get(task_id).state != "running" and time.monotonic() < deadline:
                threading.Event().wait(0.05)
            assert tasks.get(task_id).state == "running"
        kill(node)  # SIGKILL mid-training
        node = start_node(n_path)
        done = _next(inbox, "train.done")
        assert done.fields["task_id"] == task_id and not done.fields["ok"]
        assert done.fields["error"]["code"] == "interrupted"
    finally:
        researcher.close()
        kill(node)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "training"])
def test_ctrl_c_stops_a_node_without_a_traceback(tmp_path, busy):
    """Ctrl-C in a terminal signals the whole foreground process group: the node and its training
    worker. The node shuts down cleanly and stops the worker; the worker prints nothing."""
    r_path, (n_path,) = make_homes(tmp_path, 1, plan=HangingPlan)
    log = tmp_path / "terminal.log"
    with open(log, "wb") as out:  # its own process group, as a shell runs a foreground job
        node = subprocess.Popen([sys.executable, "-m", "meshfl", "-v", "node", "start", "--home", str(n_path)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    researcher = Researcher(r_path).start() if busy else None
    try:
        deadline = time.monotonic() + 60
        while "training worker started" not in log.read_text() and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        worker = int(log.read_text().split("training worker started (pid ", 1)[1].split(")")[0])
        if busy:  # the worker is inside the plan's code when the signal comes
            (node_id,) = researcher.wait_for_nodes(1, timeout=60)
            researcher.peer.call(node_id, _train(HangingPlan, "exp-c.r1.a0.n"), timeout=30)
            with Home.open(n_path) as home:
                from meshfl.store import TaskQueue

                tasks = TaskQueue(home.store, "tasks")
                while tasks.get("exp-c.r1.a0.n").state != "running" and time.monotonic() < deadline:
                    threading.Event().wait(0.05)
        os.killpg(node.pid, signal.SIGINT)
        assert node.wait(timeout=60) == 0
        while time.monotonic() < deadline and os.path.exists(f"/proc/{worker}") and \
                open(f"/proc/{worker}/stat").read().split()[2] != "Z":
            threading.Event().wait(0.05)
        assert not os.path.exists(f"/proc/{worker}") or open(f"/proc/{worker}/stat").read().split()[2] == "Z"
    finally:
        if researcher is not None:
            researcher.close()
        kill(node)
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "up;" in text  # it did start, and said so
