"""`meshfl launch ...`: start a researcher and its nodes together on a cluster (Slurm)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from ..launch.slurm import (
    DEFAULT_SETUP_TIMEOUT_S,
    LaunchSpec,
    allocation,
    plan_from_file,
    prepare,
    srun_command,
)
from ..node._datasets import FORMATS, normalize_tags
from ._app import main


@main.group()
def launch() -> None:
    """Start a whole mesh at once: a researcher and its nodes on a cluster's allocation."""


@launch.command("slurm", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
@click.argument("script", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--data", required=True, metavar="PATH",
              help="Each node's data file or folder. {index} (0, 1, ...) or {name} (node0, node1, ...) "
                   "in it picks the node's own part, e.g. /scratch/me/shards/part{index}.csv.")
@click.option("--format", "data_format", type=click.Choice(FORMATS), required=True,
              help="The data's format, as for `meshfl dataset add`.")
@click.option("--tags", required=True, metavar="A,B",
              help="Tags the nodes' data carries (the script searches by them).")
@click.option("--target", metavar="COLUMN", help="The label: a csv column, or the npz/torch array name if not y.")
@click.option("--approve", multiple=True, metavar="FILE.py:CLASS",
              help="Approve this training plan on every node (repeat for several). FILE is imported.")
@click.option("--dev", is_flag=True,
              help="Nodes run any plan from this run's researcher without approval (development).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="A new folder on the shared file system for cards, settings and logs "
                   "[default: ./meshfl-run-$SLURM_JOB_ID].")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Node-local folder for the homes [default: $TMPDIR, else /tmp].")
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="The researcher's TCP port on the first host [default: a free one].")
@click.option("--interface", metavar="NAME",
              help="Reach the researcher over this interface's address (e.g. ib0) [default: the host name].")
@click.option("--setup-timeout", type=click.FloatRange(min=1), default=DEFAULT_SETUP_TIMEOUT_S, show_default=True,
              help="Seconds every task may take to publish its card.")
@click.option("--keep-homes", is_flag=True, help="Leave the homes on node-local disk when the tasks end.")
def launch_slurm(script: Path, script_args: tuple[str, ...], data: str, data_format: str, tags: str,
                 target: str | None, approve: tuple[str, ...], dev: bool, run_dir: Path | None,
                 local_dir: Path | None, port: int, interface: str | None, setup_timeout: float,
                 keep_homes: bool) -> None:
    """Run SCRIPT as the researcher of a mesh that fills this Slurm allocation.

    Inside an sbatch script (or salloc) of N tasks: task 0, on the first host, runs SCRIPT
    [ARGS] with MESHFL_HOME (a researcher home on local disk), MESHFL_NODES (N-1) and
    MESHFL_RUN_DIR set; tasks 1..N-1 are nodes node0..node{N-2}, each serving its part of
    --data. Keys are exchanged through the run folder; the mesh stops when SCRIPT ends, the job
    ends, or on scancel. The job's exit code is SCRIPT's.

    \b
    #SBATCH --ntasks=5 --time=01:00:00
    meshfl launch slurm --data /scratch/me/part{index}.csv --format csv \\
        --tags cancer --target label --approve plan.py:Plan experiment.py --rounds 20
    """
    job_id, ntasks = allocation()
    plans = [plan_from_file(ref) for ref in approve]
    spec = LaunchSpec(
        job_id=job_id, nodes=ntasks - 1, script=str(script.absolute()), script_args=list(script_args),
        data=os.path.abspath(os.path.expanduser(data)), data_format=data_format, tags=normalize_tags(tags),
        target=target, plans=plans, dev=dev, port=port, interface=interface,
        local_dir=str(local_dir.absolute()) if local_dir else None, setup_timeout=setup_timeout,
        keep_homes=keep_homes, log_level=min(logging.INFO, logging.getLogger().getEffectiveLevel()),
    )
    run = prepare(spec, run_dir or Path(f"meshfl-run-{job_id}"))
    argv = srun_command(run, ntasks)
    for plan in plans:
        click.echo(f"meshfl launch: approving {plan['name']} ({plan['hash'][:16]}) on every node", err=True)
    click.echo(f"meshfl launch: job {job_id}: a researcher and {ntasks - 1} nodes; run folder {run}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # srun takes over this process: Slurm's signals reach it directly

