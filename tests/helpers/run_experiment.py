"""Run (or resume) an experiment in its own process; prints one line per finished round."""

import sys

import orjson
import torch

from meshfl.researcher import Experiment, Researcher

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from helpers.plans import TinyPlan  # noqa: E402

home, rounds, exp_id, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
with Researcher(home) as researcher:
    researcher.wait_for_nodes(2, timeout=60)

    def report(entry):
        print(f"round {entry['round']} done", flush=True)
        if mode == "pause-after-2" and entry["round"] == 2:
            sys.stdin.readline()  # the parent kills us here, between rounds 2 and 3

    torch.manual_seed(0)  # the same initial model in every run

    if mode == "resume":
        exp = Experiment.resume(researcher, exp_id, on_round=report, progress=False)
    else:
        exp = Experiment(researcher, TinyPlan, ["blobs"], rounds, training_args={"epochs": 1, "seed": 7},
                         min_nodes=2, round_timeout=60, experiment_id=exp_id, on_round=report, progress=False)
    history = exp.run()
    state = {k: v.tolist() for k, v in exp.global_state.items()}
    print("RESULT " + orjson.dumps({"rounds": [h["round"] for h in history], "attempt": exp.attempt, "state": state}).decode(), flush=True)
