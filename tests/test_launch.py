"""meshfl.launch.slurm without Slurm: what the launcher checks before it starts anything, and how
a task that cannot set up stops the whole launch at once (tests/test_slurm.py runs real jobs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers.data import write_blobs_csv
from helpers.plans import TinyPlan
from meshfl.cli import main
from meshfl.errors import LaunchError
from meshfl.launch.slurm import FINISHED_FILE, LaunchSpec, allocation, plan_from_file, prepare, run_task
from meshfl.node._plans import plan_hash
from meshfl.plans import plan_source

HELPERS = Path(__file__).parent / "helpers"


def _spec(tmp_path: Path, **changes) -> LaunchSpec:
    fields = dict(job_id="42", nodes=1, script=str(HELPERS / "slurm_experiment.py"), script_args=[],
                  data=str(tmp_path / "part{index}.csv"), data_format="csv", tags=["blobs"], target="target",
                  dev=True, local_dir=str(tmp_path / "local"), setup_timeout=60)
    return LaunchSpec(**{**fields, **changes})


def test_outside_an_allocation_the_launcher_says_how_to_run_it():
    with pytest.raises(LaunchError) as exc:
        allocation({})
    assert exc.value.code == "not_in_allocation" and "sbatch" in exc.value.message
    with pytest.raises(LaunchError, match="needs 2 or more"):
        allocation({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    assert allocation({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == ("7", 4)
    result = CliRunner().invoke(main, ["launch", "slurm", "--data", "x", "--format", "csv", "--tags", "a",
                                       str(HELPERS / "slurm_experiment.py")], env={"SLURM_JOB_ID": ""})
    assert result.exit_code == 1 and "not inside a Slurm allocation" in result.stderr


def test_approve_takes_the_hash_the_researcher_will_send():
    plan = plan_from_file(f"{HELPERS / 'plans.py'}:TinyPlan")
    assert plan["name"] == "TinyPlan" and plan["hash"] == plan_hash(plan_source(TinyPlan))
    with pytest.raises(LaunchError, match="no training plan class"):
        plan_from_file(f"{HELPERS / 'plans.py'}:NoSuchPlan")
    with pytest.raises(LaunchError, match="FILE.py:CLASS"):
        plan_from_file("TinyPlan")


def test_prepare_refuses_what_could_not_run(tmp_path):
    with pytest.raises(LaunchError, match="--approve"):
        prepare(_spec(tmp_path, dev=False), tmp_path / "run")
    with pytest.raises(LaunchError, match="in braces"):
        prepare(_spec(tmp_path, data=str(tmp_path / "part{rank}.csv")), tmp_path / "run")
    with pytest.raises(LaunchError, match="unknown data format"):
        prepare(_spec(tmp_path, data_format="xls"), tmp_path / "run")
    run = prepare(_spec(tmp_path), tmp_path / "run")
    assert run.stat().st_mode & 0o777 == 0o700  # only the user may put cards there
    assert LaunchSpec.load(run / "launch.json") == _spec(tmp_path)
    with pytest.raises(LaunchError, match="another run"):
        prepare(_spec(tmp_path), run)


def test_a_node_that_cannot_set_up_ends_the_launch_at_once_naming_it(tmp_path):
    write_blobs_csv(tmp_path / "part0.csv")  # node0 has its data; node1's file is missing
    run = prepare(_spec(tmp_path, nodes=2), tmp_path / "run")
    with pytest.raises(LaunchError) as failed:
        run_task(run, {"SLURM_PROCID": "2"})
    assert failed.value.code == "setup_failed" and "node1" in failed.value.message
    assert list((tmp_path / "local").iterdir()) == []  # its half-made home is gone
    # The researcher does not wait out its set-up timeout (60 s): it stops now, saying why.
    with pytest.raises(LaunchError) as researcher:
        run_task(run, {"SLURM_PROCID": "0"})
    assert "node1 could not start" in researcher.value.message and "part1.csv" in researcher.value.message
    assert json.loads((run / FINISHED_FILE).read_text()) == {"exit": 1}  # so the other nodes stop too
    with pytest.raises(LaunchError, match="node1 could not start"):
        run_task(run, {"SLURM_PROCID": "1"})
    assert list((tmp_path / "local").iterdir()) == []  # every task removed its home


def test_a_node_whose_part_is_too_small_to_be_offered_fails_its_set_up(tmp_path):
    write_blobs_csv(tmp_path / "part0.csv", n=5)  # below minimum_samples (10): never offered
    run = prepare(_spec(tmp_path), tmp_path / "run")
    with pytest.raises(LaunchError, match="5 samples, fewer than minimum_samples = 10"):
        run_task(run, {"SLURM_PROCID": "1"})
    assert "fewer than minimum_samples" in (run / "cards" / "node0.error").read_text()
