"""A link that breaks mid-round and comes straight back (loopback, through the impairment relay):
what was in flight on the old connection is sent again, so the round does not wait it out."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from helpers.plans import AddOnePlan
from helpers.procs import make_homes
from meshfl.launch.slurm import free_port
from meshfl.node import Node
from meshfl.researcher import Experiment, Researcher
from meshfl.testing.netns import ImpairmentRelay

pytestmark = pytest.mark.timeout(120)


def test_a_train_request_lost_in_a_reset_is_sent_again_when_the_node_reconnects(tmp_path):
    port = free_port("127.0.0.1")
    relay = ImpairmentRelay(tmp_path / "relay.sock")
    link = relay.add("node0", ("127.0.0.1", 0), ("127.0.0.1", port))
    r_path, (n_path,) = make_homes(tmp_path, 1, AddOnePlan, listen=f"tcp://127.0.0.1:{port}",
                                   endpoints=[link.endpoint])
    researcher = Researcher(r_path).start()
    node = Node(n_path).start()
    cut = threading.Thread(target=_reset_once_the_model_is_held, args=(link,), daemon=True)
    try:
        researcher.wait_for_nodes(1, timeout=30)

        def after(entry):
            if entry["round"] == 1:  # round 2's train request will be held by the relay, then lost
                link.set(blackhole=True)
                cut.start()

        exp = Experiment(researcher, AddOnePlan, ["blobs"], 2, model_args={"width": 2000}, min_nodes=1,
                         round_timeout=30, on_round=after, progress=False)
        initial = {k: v.clone() for k, v in exp.global_state.items()}
        history = exp.run()
        cut.join(timeout=30)
        assert link.stats()["connections"] == 1  # the node reconnected (the old connection was reset)
        assert list(history[1]["nodes"]) == ["node0"] and history[1]["dropped"] == []
        for name, value in exp.global_state.items():  # +1 per round: trained once, aggregated once
            assert torch.allclose(value, initial[name] + 2), name
    finally:
        node.stop()
        researcher.close()
        relay.close()


def _reset_once_the_model_is_held(link) -> None:
    """Wait until the relay holds round 2's model (56 KB), then reset the connection (the held
    bytes are lost, as with a connection that died) and let the new one through."""
    deadline = time.monotonic() + 20
    while link.stats()["down_queued"] < 50_000 and time.monotonic() < deadline:
        time.sleep(0.02)
    link.reset()
    link.set(blackhole=False)
