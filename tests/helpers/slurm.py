"""A private single-host Slurm cluster for tests: munged, slurmctld and slurmd from Debian's
packages (slurm-wlm, munge), each with its own key, socket, ports, state and pid files under one
folder, so it coexists with any other Slurm on the machine. Commands reach it through
SLURM_CONF (:attr:`SlurmCluster.env`). Daemons are stopped by the pids in their pid files."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from meshfl.launch.slurm import free_port

COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "sinfo", "squeue")
START_TIMEOUT_S = 30.0
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def missing() -> str | None:
    """Why no Slurm cluster can be started here, or None."""
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root"
    absent = [c for c in COMMANDS if shutil.which(c) is None]
    if absent:
        return f"Slurm/munge commands missing ({', '.join(absent)}): apt-get install slurm-wlm munge"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.name = f"mfl{os.urandom(3).hex()}"
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    def _config(self) -> str:
        r = self.root
        return f"""\
ClusterName={self.name}
SlurmctldHost={self.host}
SlurmctldPort={free_port("")}
SlurmdPort={free_port("")}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
KillWait=10
NodeName={self.host} CPUs=8 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def start(self) -> "SlurmCluster":
        munge = self.root / "munge"
        for folder in (munge, self.root / "state", self.root / "spool"):
            folder.mkdir(mode=0o700, parents=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(self._config())
        try:
            self._daemon(["munged", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                          f"--log-file={munge}/munged.log", f"--pid-file={munge}/munged.pid",
                          f"--seed-file={munge}/munged.seed"], munge / "munged.pid")
            self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid")
            self._daemon(["slurmd", "-f", str(self.conf)], self.root / "slurmd.pid")
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        return self

    def _daemon(self, argv: list[str], pid_file: Path) -> None:
        """Start a daemon (it forks) and wait for its pid file."""
        self._pid_files.append(pid_file)
        subprocess.run(argv, check=True, capture_output=True, timeout=START_TIMEOUT_S, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (pid_file.exists() and pid_file.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no pid file in {START_TIMEOUT_S:g}s: {self.logs()}")
            time.sleep(0.05)

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            state = self.run(["sinfo", "-h", "-n", self.host, "-o", "%t"], check=False).stdout.strip()
            if state == "idle":
                return
            if state.startswith(("unk", "down", "drain")):
                self.run(["scontrol", "update", f"nodename={self.host}", "state=resume"], check=False)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm node is {state!r}, not idle, after {START_TIMEOUT_S:g}s: {self.logs()}")
            time.sleep(0.1)

    def run(self, argv: list[str], check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env, check=check)

    def wait_job(self, job_id: str, timeout: float) -> dict:
        """Wait for job ``job_id`` to end; its ``scontrol show job`` fields (JobState, ExitCode...).

        (``sbatch --wait`` polls with growing sleeps: it returned 25 s after a job's end.)"""
        deadline = time.monotonic() + timeout
        while True:
            line = self.run(["scontrol", "show", "job", "--oneliner", job_id], check=False).stdout
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if fields.get("JobState") in ENDED:
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {fields.get('JobState')} after {timeout:g}s: {self.logs()}")
            time.sleep(0.1)

    def job_processes(self, job_id: str) -> list[int]:
        """Pids of processes that run in job ``job_id`` of this cluster (by their environment)."""
        marks = (f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={self.conf}".encode())
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone, or not readable
            if all(mark in environ for mark in marks):
                found.append(int(entry.name))
        return found

    def logs(self) -> str:
        out = []
        for path in (self.root / "slurmctld.log", self.root / "slurmd.log"):
            if path.exists():
                out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons by the pids in their pid files."""
        if self.conf.exists() and (self.root / "slurmctld.pid").exists():
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.monotonic() + 30
            while self.run(["squeue", "-h"], check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        pids = []
        for pid_file in reversed(self._pid_files):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue  # never started, or gone
            pids.append(pid)
        deadline = time.monotonic() + 15
        while any(map(_pid_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in filter(_pid_alive, pids):
            os.kill(pid, signal.SIGKILL)
        self._pid_files.clear()
