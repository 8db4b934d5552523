"""The researcher's script of the Slurm tests, as `meshfl launch slurm` runs it.

``slurm_experiment.py OUT ROUNDS``: train TinyPlan over every node, write the history to OUT.
``slurm_experiment.py OUT hold``: once every node is online, write OUT and wait to be stopped.
"""

import json
import os
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.plans import TinyPlan  # noqa: E402
from meshfl.researcher import Experiment, Researcher  # noqa: E402

out, mode = Path(sys.argv[1]), sys.argv[2]
nodes = int(os.environ["MESHFL_NODES"])
with Researcher(os.environ["MESHFL_HOME"]) as researcher:
    researcher.wait_for_nodes(nodes, timeout=60)
    if mode == "hold":
        out.write_text(json.dumps({"online": [researcher.node_name(n) for n in researcher.nodes()]}))
        threading.Event().wait()  # until Slurm stops the job
    torch.manual_seed(0)  # the same initial model in every run
    history = Experiment(researcher, TinyPlan, ["blobs"], int(mode), training_args={"epochs": 10, "lr": 0.1},
                         min_nodes=nodes, round_timeout=60, progress=False).run()
    out.write_text(json.dumps({
        "home": os.environ["MESHFL_HOME"],
        "rounds": [{"round": h["round"], "nodes": sorted(h["nodes"]), "samples": h["samples"],
                    "accuracy": h["global"].get("test_accuracy")} for h in history],
    }))
