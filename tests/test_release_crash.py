"""A node killed (SIGKILL) at its release step never releases a result without its privacy debit,
and never debits one twice; a held result is released by `meshfl result release` to a running
node process, which the command nudges."""

from __future__ import annotations

import queue
import subprocess
import sys
import time

import pytest

from helpers.plans import TinyPlan
from helpers.procs import kill, make_homes, start_node, stop
from helpers.waiting import wait_until
from meshfl.home import Home
from meshfl.plans import plan_source
from meshfl.privacy import ClientDP, Ledger, PolicyTable
from meshfl.researcher import Researcher
from meshfl.store import Outbox
from meshfl.wire import Message

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _train(task_id: str) -> Message:
    fields = {"task_id": task_id, "experiment": "exp-c", "round": 1, "plan_source": plan_source(TinyPlan),
              "plan_class": "TinyPlan", "dataset_tags": ["blobs"], "training_args": {"epochs": 1}, "model_args": {},
              "dp": ClientDP(1.0, clip=1.0).to_wire()}
    return Message("train", fields, TinyPlan().init_model().state_dict())


def _next_done(inbox: queue.SimpleQueue, timeout: float = 60.0) -> Message:
    deadline = time.monotonic() + timeout
    while True:
        msg = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, Message) and msg.type == "train.done":  # (the researcher also posts link events)
            return msg


def _homes(tmp_path, **rules):
    r_path, (n_path,) = make_homes(tmp_path, 1, plan=TinyPlan)
    with Home.open(n_path) as home:
        PolicyTable(home.store, home.audit).set("blobs", epsilon=100.0, **rules)
    return r_path, n_path


@pytest.mark.parametrize("point", ["release.before_commit", "release.after_commit"])
def test_a_node_killed_at_its_release_keeps_results_and_debits_in_step(tmp_path, point):
    r_path, n_path = _homes(tmp_path)
    node = start_node(n_path, env={"MESHFL_CRASH_POINT": point})
    researcher = Researcher(r_path).start()
    try:
        (node_id,) = researcher.wait_for_nodes(1, timeout=60)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        task_id = "exp-c.r1.a0.n"
        researcher._route([task_id], inbox)
        researcher.peer.call(node_id, _train(task_id), timeout=30)
        assert node.wait(timeout=60) == -9  # killed itself at the crash point
        node = start_node(n_path)  # no crash point this time
        done = _next_done(inbox)
        if point == "release.before_commit":  # nothing of the release was committed
            assert not done.fields["ok"] and done.fields["error"]["code"] == "interrupted"
        else:  # all of it was: the result is re-sent, with the cost it was debited
            assert done.fields["ok"] and done.fields["privacy"]["epsilon"] > 0
        researcher.send(node_id, Message("result.ack", {"task_id": task_id})).result(timeout=10)
        assert stop(node) == 0
        with Home.open(n_path) as home:
            entries = Ledger(home.store).entries()
            released = [r for r in home.audit.records() if r.event == "result.released"]
            assert len(entries) == len(released) == (1 if done.fields["ok"] else 0)
            assert Ledger(home.store).reserved() == {}  # the interrupted task's reservation went too
            assert home.audit.verify().ok
    finally:
        researcher.close()
        kill(node)


def test_meshfl_result_release_nudges_the_running_node(tmp_path):
    r_path, n_path = _homes(tmp_path, review=True)
    node = start_node(n_path)
    researcher = Researcher(r_path).start()
    try:
        (node_id,) = researcher.wait_for_nodes(1, timeout=60)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        task_id = "exp-c.r1.a0.n"
        researcher._route([task_id], inbox)
        researcher.peer.call(node_id, _train(task_id), timeout=30)
        with Home.open(n_path) as home:  # LMDB: this process reads what the node process writes
            outbox = Outbox(home.store, "outbox")
            assert wait_until(lambda: [i.msg_id for i in outbox.held()] == [task_id], timeout=60)
        with pytest.raises(queue.Empty):
            _next_done(inbox, timeout=0.5)  # held: nothing reached the researcher
        out = subprocess.run([sys.executable, "-m", "meshfl.cli", "result", "release", task_id, "--home", str(n_path),
                              "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and '"node_running": true' in out.stdout, out.stdout + out.stderr
        done = _next_done(inbox, timeout=30)
        assert done.fields["ok"] and done.fields["privacy"]["epsilon"] > 0
    finally:
        researcher.close()
        kill(node)
