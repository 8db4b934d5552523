"""The researcher of the network-namespace tests, run in its own namespace.

``netns_researcher.py HOME CONFIG``; CONFIG is JSON: ``plan`` (a class of helpers.plans),
``rounds``, ``nodes`` (how many to wait for before a round), ``min_nodes``, ``secagg``,
``training_args`` and ``pause_after`` (a round after which it waits for a line on stdin, then
for ``nodes`` nodes again). Prints one JSON line per round (its history entry), then
``{"initial": state, "final": state}``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import plans  # noqa: E402
from meshfl.researcher import Experiment, Researcher  # noqa: E402

home, config = sys.argv[1], json.loads(sys.argv[2])


def state(exp):
    return {k: v.tolist() for k, v in exp.global_state.items()}


with Researcher(home) as researcher:
    researcher.wait_for_nodes(config["nodes"], timeout=60)

    def report(entry):
        print(json.dumps(entry, default=str), flush=True)
        if entry["round"] == config.get("pause_after"):
            sys.stdin.readline()
            researcher.wait_for_nodes(config["nodes"], timeout=60)

    exp = Experiment(researcher, getattr(plans, config["plan"]), ["blobs"], config["rounds"],
                     training_args=config.get("training_args"), min_nodes=config["min_nodes"],
                     round_timeout=60, secagg=config.get("secagg", False), on_round=report, progress=False)
    initial = state(exp)
    exp.run()
    print(json.dumps({"initial": initial, "final": state(exp)}), flush=True)
    if config.get("hold"):  # stay connected until told (the test checks what reaches the nodes)
        sys.stdin.readline()
