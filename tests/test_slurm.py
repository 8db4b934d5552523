"""`meshfl launch slurm` against a real Slurm: slurmctld, slurmd and munge from Debian's packages,
a private single-host cluster started here (root, as in CI), batch jobs submitted with sbatch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from helpers.data import write_blobs_csv
from helpers.slurm import SlurmCluster, missing
from helpers.system import require

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
HELPERS = Path(__file__).parent / "helpers"
NODES = 2


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require(missing())
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _job_script(tmp: Path, *script_args: str, nodes: int = NODES) -> Path:
    """A batch script as a user would write it: one `meshfl launch slurm` line."""
    for i in range(nodes):
        write_blobs_csv(tmp / f"part{i}.csv", n=60, seed=i)
    script = tmp / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"exec {sys.executable} -m meshfl.cli launch slurm --run-dir {tmp}/run --local-dir {tmp}/local "
        f"--data '{tmp}/part{{index}}.csv' --format csv --tags blobs --target target "
        f"--approve {HELPERS}/plans.py:TinyPlan {HELPERS}/slurm_experiment.py {' '.join(script_args)}\n")
    return script


def _sbatch(slurm: SlurmCluster, tmp: Path, script: Path, nodes: int = NODES) -> str:
    """Submit ``script`` as a batch job of 1 + ``nodes`` tasks; its job id."""
    job = slurm.run(["sbatch", "--parsable", f"--ntasks={nodes + 1}", "--time=5", f"--chdir={tmp}",
                     f"--output={tmp}/job.out", str(script)], check=False)
    assert job.returncode == 0, job.stderr
    return job.stdout.strip().split(";")[0]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_batch_job_runs_an_experiment_across_its_tasks(slurm, tmp_path):
    result = tmp_path / "result.json"
    job_id = _sbatch(slurm, tmp_path, _job_script(tmp_path, str(result), "2"))
    state = slurm.wait_job(job_id, 120)
    output = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), f"{output}\n{slurm.logs()}"
    rounds = json.loads(result.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    nodes = [f"node{i}" for i in range(NODES)]
    assert all(r["nodes"] == nodes for r in rounds)  # one node per remaining task, all in each round
    assert all(r["samples"] == 48 * NODES for r in rounds)  # 60 rows each, 20% held out for testing
    assert rounds[-1]["accuracy"] > 0.8  # the blobs are separable: the shared model learned them
    run = tmp_path / "run"
    assert json.loads((run / "finished").read_text()) == {"exit": 0}
    hosts = {json.loads((run / "cards" / f"{n}.json").read_text())["host"] for n in ["researcher", *nodes]}
    assert hosts == {slurm.host}
    assert list((tmp_path / "local").iterdir()) == []  # homes on local disk, removed at the end
    assert slurm.job_processes(job_id) == []


def test_scancel_stops_every_process_of_the_mesh(slurm, tmp_path):
    online, nodes = tmp_path / "online.json", 1
    job_id = _sbatch(slurm, tmp_path, _job_script(tmp_path, str(online), "hold", nodes=nodes), nodes=nodes)
    _wait_for(online.exists, 90, f"the mesh of job {job_id} to come up: {slurm.logs()}")
    assert sorted(json.loads(online.read_text())["online"]) == [f"node{i}" for i in range(nodes)]
    assert len(slurm.job_processes(job_id)) >= 3  # at least the researcher's task, its script and the node

    slurm.run(["scancel", job_id])
    assert slurm.wait_job(job_id, 60)["JobState"] == "CANCELLED"
    _wait_for(lambda: not slurm.job_processes(job_id), 30, "every process of the job to end")
    logs = tmp_path / "run" / "logs"
    for i in range(nodes):  # each node stopped on SIGTERM, cleanly, before any SIGKILL
        assert "stopped (signal)" in (logs / f"node{i}.log").read_text()
    assert json.loads((tmp_path / "run" / "finished").read_text())["exit"] == 128 + 15
    assert list((tmp_path / "local").iterdir()) == []
