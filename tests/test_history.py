"""Seeing what happened: History.plot, TensorBoard event files, `meshfl experiment ...`, `meshfl demo --plot`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import orjson
import pytest
import torch
from click.testing import CliRunner

from helpers.data import register_blobs
from helpers.plans import TinyPlan
from meshfl.cli import main
from meshfl.errors import MeshflError
from meshfl.researcher import Experiment
from meshfl.researcher._history import History
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(180)


def _entry(rnd, nodes=("a", "b"), failed=(), dropped=()):
    return {"round": rnd, "samples": 10 * len(nodes), "seconds": 0.1, "failed": {n: {"code": "timeout"} for n in failed},
            "dropped": list(dropped), "global": {"loss": 1.0 / rnd, "accuracy": 1 - 0.5 / rnd},
            "nodes": {n: {"samples": 10, "metrics": {"train_loss": 1.0 / rnd + i, "steps": 3}}
                      for i, n in enumerate(nodes)}}


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_history_is_the_list_it_was_and_plots_one_panel_per_metric(tmp_path):
    history = History([_entry(1), _entry(2, failed=["b"], nodes=["a"]), _entry(3, dropped=["b"], nodes=["a"])], "exp-x")
    assert isinstance(history, list) and history[1]["failed"] == {"b": {"code": "timeout"}}
    assert orjson.loads(orjson.dumps(history)) == list(history)  # serialises as the plain list
    wide = history.plot(tmp_path / "all.png")  # loss, accuracy, train_loss, and nodes per round
    calm = History(history[:1])  # no failure nor drop: no panel counting the nodes
    narrow = calm.plot(tmp_path / "one.png", metrics=["accuracy"], baselines={"central": {"accuracy": 0.9}})
    (w_all, h_all), (w_one, h_one) = _png_size(wide), _png_size(narrow)
    assert w_all > 2.5 * w_one and h_all > 1.5 * h_one  # a 3 x 2 grid against a single panel
    history.plot(tmp_path / "curves.svg")
    assert b"train_loss" in (tmp_path / "curves.svg").read_bytes()  # the panel titles are there as text
    with pytest.raises(MeshflError) as info:
        history.plot(tmp_path / "x.png", metrics=["nope"])
    assert info.value.code == "unknown_metric" and "train_loss" in info.value.message
    with pytest.raises(MeshflError) as info:
        History().plot(tmp_path / "x.png")
    assert info.value.code == "empty_history"


def test_missing_plot_extra_is_a_coded_error_naming_the_install(tmp_path):
    """matplotlib and tensorboard hidden, as on an install without meshfl[plot]."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None
        sys.modules["torch.utils.tensorboard"] = None
        import orjson
        from click.testing import CliRunner
        from meshfl.cli import main
        from meshfl.errors import MeshflError
        from meshfl.home import Home
        from meshfl.researcher import Experiment, Researcher
        from meshfl.researcher._history import History
        out = {{}}
        try:
            History([{{"round": 1, "global": {{"loss": 1.0}}}}]).plot("x.png")
        except MeshflError as exc:
            out["plot"] = [exc.code, exc.message]
        Home.init({str(tmp_path / "lab")!r}, "researcher", "lab", listen="ipc://{tmp_path}/r.sock").close()
        researcher = Researcher({str(tmp_path / "lab")!r})
        try:
            Experiment(researcher, "from meshfl.plans import TorchTrainingPlan\\nimport torch\\n"
                       "class P(TorchTrainingPlan):\\n    def init_model(self):\\n        return torch.nn.Linear(2, 2)\\n",
                       ["t"], 1, plan_class="P", tensorboard="runs")
        except MeshflError as exc:
            out["tensorboard"] = [exc.code, exc.message]
        researcher.home.close()
        result = CliRunner().invoke(main, ["demo", "--plot", "x.png"])
        out["demo"] = [result.exit_code, result.output]
        print(orjson.dumps(out).decode())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout.splitlines()[-1])
    assert out["plot"] == ["missing_dependency", "matplotlib is not installed: pip install meshfl[plot]"]
    assert out["tensorboard"] == ["missing_dependency", "TensorBoard is not installed: pip install meshfl[plot]"]
    assert out["demo"] == [1, "meshfl: error: matplotlib is not installed: pip install meshfl[plot]\n"]


@pytest.fixture(scope="module")
def mesh():
    with FederatedMesh(2) as m:
        yield register_blobs(m, plan=TinyPlan)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_experiment_commands_show_plot_and_resume_from_the_researchers_records(mesh, tmp_path):
    home = mesh.researcher.home.path
    torch.manual_seed(0)
    exp = Experiment(mesh.researcher, TinyPlan, ["blobs"], 3, training_args={"epochs": 2, "lr": 0.05}, min_nodes=1,
                     round_timeout=60, progress=False, experiment_id="exp-cli")
    honest = mesh.nodes[1]._result
    mesh.nodes[1]._result = lambda task_id: {k: v[:1] for k, v in honest(task_id).items()}  # a bad update
    checkpoint = exp._checkpoint

    def crash():
        checkpoint()
        if exp.round == 2:
            raise RuntimeError("the researcher's script dies after round 2")

    exp._checkpoint = crash
    with pytest.raises(RuntimeError):
        exp.run()
    mesh.nodes[1]._result = honest
    mesh.researcher.close()  # the CLI runs the researcher from here on, in its place
    mesh.researcher = None

    listed = orjson.loads(cli("experiment", "list", "--home", home, "--json"))
    assert [(e["id"], e["round"], e["rounds"]) for e in listed] == [("exp-cli", 2, 3)]
    shown = cli("experiment", "show", "--home", home, "exp-c")  # a unique prefix will do
    assert "TinyPlan" in shown and "2 of 3 done" in shown and "node1:bad_update" in shown
    assert f"resume it:   meshfl experiment resume --home {home} exp-cli" in shown
    assert "wrote" in cli("experiment", "plot", "--home", home, "exp-cli", "-o", tmp_path / "two.png")

    out = cli("experiment", "resume", "--home", home, "exp-cli", "--wait", "60", "--nodes", "2", "--rounds", "4",
              "--plot", tmp_path / "four.png", "--tensorboard", tmp_path / "runs")
    assert "round   3  nodes 2" in out and "round   4  nodes 2" in out and "4 of 4 rounds done" in out
    full = orjson.loads(cli("experiment", "show", "--home", home, "exp-cli", "--json"))
    assert [e["round"] for e in full["history"]] == [1, 2, 3, 4] and full["attempts"] == 2
    assert full["history"][1]["failed"]["node1"]["code"] == "bad_update" and not full["history"][3]["failed"]
    assert "--rounds 14" in full["resume"]  # finished: the command trains longer
    assert _png_size(tmp_path / "four.png")[0] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "exp-cli"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"global/test_accuracy", "train_loss/node0", "train_loss/node1", "round/seconds", "round/nodes"} <= set(tags)
    assert [e.step for e in events.Scalars("global/test_accuracy")] == [3, 4]  # the rounds this run trained
    assert [e.value for e in events.Scalars("round/nodes")] == [2.0, 2.0]


def test_resume_of_a_finished_experiment_asks_for_more_rounds(tmp_path):
    home = tmp_path / "lab"
    CliRunner().invoke(main, ["init", "--home", home, "--role", "researcher", "--name", "lab"])
    from meshfl.home import Home

    with Home.open(home) as h:
        h.store.table("experiments").put("exp-done", {"id": "exp-done", "round": 3, "rounds": 3})
    result = CliRunner().invoke(main, ["experiment", "resume", "--home", str(home), "exp-done"])
    assert result.exit_code == 1 and "give --rounds N, more than 3" in result.output
    result = CliRunner().invoke(main, ["experiment", "show", "--home", str(home), "exp-nope"])
    assert result.exit_code == 1 and "no experiment 'exp-nope'" in result.output


def test_demo_writes_its_curves_next_to_its_table(tmp_path):
    from meshfl.demo import run_demo

    result = run_demo(nodes=1, rounds=2, json_output=True, plot=tmp_path / "demo.png")
    assert result["plot"] == str(tmp_path / "demo.png") and _png_size(tmp_path / "demo.png")[0] > 1000
