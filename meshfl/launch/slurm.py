"""A meshfl mesh inside a Slurm allocation: ``meshfl launch slurm [OPTIONS] SCRIPT [ARGS]``.

Run from a batch script (``sbatch``) or an interactive allocation (``salloc``) of N >= 2 tasks.
The launcher writes the run's settings to a *run folder* on the shared file system and starts
one ``srun`` step of N tasks (``python -m meshfl.launch.slurm RUN_DIR``); Slurm's block distribution
puts task 0 on the allocation's first host.

- Task 0 is the **researcher**. It makes a researcher home on node-local disk that listens on a
  TCP port of its host, publishes its card (public keys) and endpoint in the run folder, waits
  for every node's card, trusts them and runs SCRIPT with ``MESHFL_HOME`` (that home),
  ``MESHFL_NODES`` (how many nodes) and ``MESHFL_RUN_DIR`` set. When the script ends it marks the
  run finished (file ``finished``, holding the script's exit code) and exits with that code.
- Tasks 1..N-1 are the **nodes** ``node0`` .. ``node{N-2}``. Each makes a node home on its
  host's local disk, registers its data (the ``--data`` path with ``{index}`` filled in),
  approves the plans named at launch (or runs in development mode), publishes its card, waits
  for the researcher's card and its peers' (secure aggregation seals shares node to node),
  trusts them, dials the researcher over the cluster network and serves until the run is
  finished or Slurm sends SIGTERM (job end, time limit, ``scancel``); then it stops as ``meshfl
  node start`` does on SIGTERM, and removes its home.

Slurm sends SIGCONT then SIGTERM to every process of the job, and SIGKILL ``KillWait`` seconds
later: the tasks stop on SIGTERM (the researcher passes it on to the script) and are gone well
before that. A task that fails to set up publishes why (``cards/NAME.error``); the others stop at
once with that message instead of waiting for the set-up timeout.

The run folder holds only public material (cards, endpoints), the settings, the finish mark and
the tasks' logs (``logs/NAME.log``). It is created 0700: whoever can write there could slip in a
card of their own. Homes (secret keys, stores) never leave node-local disk.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from ..errors import LaunchError, MeshflError

log = logging.getLogger("meshfl.launch")

SPEC_FILE = "launch.json"
FINISHED_FILE = "finished"
CARDS_DIR = "cards"
LOGS_DIR = "logs"
RESEARCHER = "researcher"
DATASET_NAME = "data"
POLL_S = 0.2  # how often a task looks at the run folder during set-up (a few seconds)
FINISH_POLL_S = 1.0  # how often a serving node looks for the finish mark (gentle on a shared file system)
DEFAULT_SETUP_TIMEOUT_S = 300.0
SIOCGIFADDR = 0x8915


@dataclass
class LaunchSpec:
    """Everything the tasks need, written once by the launcher as ``launch.json``."""

    job_id: str
    nodes: int
    script: str
    script_args: list[str]
    data: str
    data_format: str
    tags: list[str]
    target: str | None = None
    plans: list[dict] = field(default_factory=list)  # {"name", "hash", "source"}, approved on every node
    dev: bool = False
    port: int = 0
    interface: str | None = None
    local_dir: str | None = None
    setup_timeout: float = DEFAULT_SETUP_TIMEOUT_S
    keep_homes: bool = False
    log_level: int = logging.INFO

    def data_path(self, index: int) -> str:
        return self.data.format(index=index, name=node_name(index))

    def save(self, path: Path) -> None:
        _publish(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> "LaunchSpec":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise LaunchError(f"cannot read the launch settings {path}: {exc}", code="bad_launch") from None


def node_name(index: int) -> str:
    return f"node{index}"


# ---------------------------------------------------------------------------------- the launcher
def allocation(env: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """This job's id and task count; LaunchError ``not_in_allocation`` outside one."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise LaunchError("not inside a Slurm allocation (no SLURM_JOB_ID): run `meshfl launch slurm` "
                          "from an sbatch script or an salloc shell", code="not_in_allocation")
    tasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or env.get("SLURM_JOB_NUM_NODES") or "0"
    ntasks = int(tasks) if tasks.isdigit() else 0
    if ntasks < 2:
        raise LaunchError(f"the allocation has {ntasks} task(s); a mesh needs 2 or more (1 researcher + "
                          f"nodes): ask for them with sbatch -n N or --ntasks-per-node", code="not_in_allocation")
    return job_id, ntasks


def plan_from_file(ref: str) -> dict:
    """``FILE.py:Class`` -> the plan's {"name", "hash", "source"}, as the researcher will send it.

    The file is imported (as ``multiprocessing`` imports a script: keep an experiment in it under
    ``if __name__ == "__main__":``)."""
    from ..node._plans import canonical_source, plan_hash
    from ..plans import TrainingPlan, plan_source

    path_text, _, class_name = ref.rpartition(":")
    path = Path(path_text).expanduser()
    if not path_text or not class_name or not path.is_file():
        raise LaunchError(f"--approve takes FILE.py:CLASS of an existing file, not {ref!r}", code="bad_launch")
    module_name = f"_meshfl_launch_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # plan_source finds the module's imports through it
    sys.path.insert(0, str(path.parent.absolute()))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise LaunchError(f"cannot import {path}: {type(exc).__name__}: {exc}", code="bad_launch") from None
    finally:
        sys.path.pop(0)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TrainingPlan)):
        raise LaunchError(f"{path} defines no training plan class {class_name!r}", code="bad_launch")
    source = canonical_source(plan_source(cls))
    return {"name": class_name, "hash": plan_hash(source), "source": source}


def prepare(spec: LaunchSpec, run_dir: Path) -> Path:
    """Check ``spec``, create the run folder (0700) and write the settings into it."""
    from ..node._datasets import FORMATS

    if spec.data_format not in FORMATS:
        raise LaunchError(f"unknown data format {spec.data_format!r}; use one of {', '.join(FORMATS)}",
                          code="bad_launch")
    try:
        spec.data_path(0)
    except (KeyError, IndexError, ValueError) as exc:
        raise LaunchError(f"--data may hold {{index}} and {{name}}, nothing else in braces: {exc}",
                          code="bad_launch") from None
    if not spec.plans and not spec.dev:
        raise LaunchError("nodes run only approved plans: give --approve FILE.py:CLASS for each training "
                          "plan the script uses, or --dev", code="bad_launch")
    if not Path(spec.script).is_file():
        raise LaunchError(f"no experiment script {spec.script}", code="bad_launch")
    run_dir = run_dir.expanduser().absolute()
    if (run_dir / SPEC_FILE).exists():
        raise LaunchError(f"{run_dir} holds another run already; choose a new --run-dir", code="bad_launch")
    for folder in (run_dir, run_dir / CARDS_DIR, run_dir / LOGS_DIR):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    spec.save(run_dir / SPEC_FILE)
    return run_dir


def srun_command(run_dir: Path, ntasks: int) -> list[str]:
    """One step of every task of the allocation, each running :func:`run_task`."""
    srun = shutil.which("srun")
    if srun is None:
        raise LaunchError("srun is not on PATH (is this a Slurm host?)", code="not_in_allocation")
    return [srun, f"--ntasks={ntasks}", "--kill-on-bad-exit=0", "--export=ALL",
            sys.executable, "-m", "meshfl.launch.slurm", str(run_dir)]


# ---------------------------------------------------------------------------------- the tasks
def run_task(run_dir: Path, env: Mapping[str, str] = os.environ) -> int:
    """One task of the step: task 0 the researcher, task i the node ``node{i-1}``; its exit code."""
    run_dir = Path(run_dir).absolute()
    _check_private(run_dir)
    spec = LaunchSpec.load(run_dir / SPEC_FILE)
    rank = int(env.get("SLURM_PROCID", "-1"))
    if not 0 <= rank <= spec.nodes:
        raise LaunchError(f"task {rank} is not part of this launch of {spec.nodes + 1} tasks", code="bad_launch")
    name = RESEARCHER if rank == 0 else node_name(rank - 1)
    home = _home_dir(spec, name)
    with _Signals() as signals, _log_to(run_dir / LOGS_DIR / f"{name}.log", spec.log_level):
        try:
            if rank == 0:
                return _researcher(run_dir, spec, home, signals)
            return _node(run_dir, spec, rank - 1, home, signals)
        finally:
            if not spec.keep_homes:
                shutil.rmtree(home, ignore_errors=True)
                _rmdir_if_empty(home.parent)


def _researcher(run: Path, spec: LaunchSpec, home_path: Path, signals: "_Signals") -> int:
    from ..crypto import PeerCard
    from ..home import Home

    code = 1
    try:
        bind = interface_address(spec.interface) if spec.interface else "0.0.0.0"
        port = spec.port or free_port(bind)
        address = bind if spec.interface else socket.gethostname()
        with Home.init(home_path, "researcher", RESEARCHER, listen=f"tcp://{bind}:{port}") as home:
            _publish(run / CARDS_DIR / f"{RESEARCHER}.json",
                     {"card": home.identity.card.to_text(), "endpoint": f"tcp://{address}:{port}",
                      "host": socket.gethostname()})
            names = [node_name(i) for i in range(spec.nodes)]
            for entry in _wait_cards(run, names, spec.setup_timeout, signals):
                home.trust(PeerCard.from_text(entry["card"]))
        _say(f"{spec.nodes} nodes set up; the researcher listens on tcp://{address}:{port}; running {spec.script}")
        code = _run_script(spec, home_path, run, signals)
        log.info("the experiment script exited with %d", code)
    except MeshflError as exc:
        log.error("%s", exc.message)  # the command line prints it too
        raise
    finally:
        _publish(run / FINISHED_FILE, {"exit": code})
    return code


def _run_script(spec: LaunchSpec, home: Path, run: Path, signals: "_Signals") -> int:
    env = {**os.environ, "MESHFL_HOME": str(home), "MESHFL_NODES": str(spec.nodes), "MESHFL_RUN_DIR": str(run)}
    proc = subprocess.Popen([sys.executable, spec.script, *spec.script_args], env=env)
    signals.forward_to(proc)
    code = proc.wait()
    return 128 - code if code < 0 else code


def _node(run: Path, spec: LaunchSpec, index: int, home_path: Path, signals: "_Signals") -> int:
    from ..crypto import PeerCard
    from ..home import Home
    from ..node import Node

    name = node_name(index)
    try:
        card = _make_node_home(home_path, name, spec, index)
    except MeshflError as exc:
        _publish(run / CARDS_DIR / f"{name}.error", {"error": exc.message})
        raise LaunchError(f"{name}: {exc.message}", code="setup_failed") from None
    _publish(run / CARDS_DIR / f"{name}.json", {"card": card, "host": socket.gethostname()})
    names = [RESEARCHER] + [node_name(i) for i in range(spec.nodes)]
    researcher, *nodes = _wait_cards(run, names, spec.setup_timeout, signals)
    with Home.open(home_path) as home:
        home.trust(PeerCard.from_text(researcher["card"]), researcher["endpoint"])
        for entry in nodes:
            other = PeerCard.from_text(entry["card"])
            if other.peer_id != home.identity.peer_id:
                home.trust(other)
    node = Node(home_path)
    try:
        node.start()
        while not signals.stop.wait(FINISH_POLL_S) and not (run / FINISHED_FILE).exists():
            pass
    except MeshflError:
        if not signals.stop.is_set():
            raise
        # Slurm's SIGTERM reaches every process of the job: it ended the training worker the
        # node was starting. A stop all the same.
    finally:
        node.stop()
    log.info("[%s] stopped (%s)", name, "signal" if signals.stop.is_set() else "the run finished")
    return 0


def _make_node_home(path: Path, name: str, spec: LaunchSpec, index: int) -> str:
    """A node home with its data and approvals; returns its card's text."""
    from ..home import Home
    from ..node._datasets import DatasetRegistry
    from ..node._plans import PlanRegistry

    with Home.init(path, "node", name, dev=spec.dev) as home:
        record = DatasetRegistry(home.store, home.audit).add(DATASET_NAME, spec.tags, spec.data_format,
                                                             spec.data_path(index), target=spec.target)
        if (record["samples"] or 0) < home.config.minimum_samples:  # it would never be offered
            raise LaunchError(f"{record['path']} holds {record['samples']} samples, fewer than "
                              f"minimum_samples = {home.config.minimum_samples}", code="setup_failed")
        plans = PlanRegistry(home.store, home.audit)
        for plan in spec.plans:
            plans.submit(plan["source"], plan["name"])
            plans.approve(plan["hash"], by="meshfl launch slurm")
        return home.identity.card.to_text()


def _wait_cards(run: Path, names: list[str], timeout: float, signals: "_Signals") -> list[dict]:
    """The published cards of ``names``, once all are there; a task's failure, the run's end, a
    signal or the timeout end the wait with a LaunchError."""
    cards = run / CARDS_DIR
    deadline = time.monotonic() + timeout
    while True:
        for failure in sorted(cards.glob("*.error")):
            reason = _read(failure).get("error", "no detail")
            raise LaunchError(f"{failure.stem} could not start: {reason}", code="setup_failed")
        if (run / FINISHED_FILE).exists():
            raise LaunchError("the run ended during set-up", code="setup_failed")
        paths = [cards / f"{n}.json" for n in names]
        missing = [p.stem for p in paths if not p.exists()]
        if not missing:
            return [_read(p) for p in paths]
        if time.monotonic() >= deadline:
            raise LaunchError(f"no card from {', '.join(missing)} within {timeout:g}s (see {run / LOGS_DIR})",
                              code="setup_timeout")
        if signals.stop.wait(POLL_S):
            raise LaunchError("stopped by a signal during set-up", code="setup_failed")


# ---------------------------------------------------------------------------------- plumbing
class _Signals:
    """SIGTERM / SIGINT set :attr:`stop` (and reach a child given to :meth:`forward_to`); the
    handlers in place before are restored on exit. SIGCONT, which Slurm sends first, changes
    nothing."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._child: subprocess.Popen | None = None
        self._before: dict = {}

    def _handle(self, signum, frame) -> None:
        self.stop.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def forward_to(self, child: subprocess.Popen) -> None:
        self._child = child
        if self.stop.is_set():  # the signal came while the child was starting
            child.send_signal(signal.SIGTERM)

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


def interface_address(name: str) -> str:
    """The IPv4 address of network interface ``name`` (e.g. ``ib0``)."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            raise LaunchError(f"no IPv4 address on interface {name!r}: {exc.strerror}", code="bad_launch") from None
    return socket.inet_ntoa(packed[20:24])


def free_port(bind: str) -> int:
    """A port free on ``bind`` now, for a listener that binds it later.

    It is drawn below the kernel's ephemeral range: a port from that range (what a bind to
    port 0 gives) may meanwhile go to any outgoing connection on the host, and the listener's
    bind then fails with "Address already in use".
    """
    low = _ephemeral_low()
    below = range(max(1024, low - 8192), low)
    for port in random.sample(below, min(64, len(below))):
        with socket.socket() as sock:
            try:
                sock.bind((bind, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no free port below the range: the old way, racy but working
        sock.bind((bind, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _home_dir(spec: LaunchSpec, name: str) -> Path:
    local = spec.local_dir or os.environ.get("TMPDIR") or "/tmp"
    parent = Path(local).expanduser().absolute() / f"meshfl-{spec.job_id}"
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return parent / name


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # another task's home is still there


def _check_private(run_dir: Path) -> None:
    try:
        mode = run_dir.stat().st_mode
    except OSError:
        raise LaunchError(f"no run folder {run_dir}", code="bad_launch") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise LaunchError(f"{run_dir} is writable by others: anyone could slip a card in; chmod 700 it",
                          code="bad_launch")


def _publish(path: Path, data: dict) -> None:
    """Write JSON so that readers on other hosts see all of it or nothing (rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read {path}: {exc}", code="setup_failed") from None


@contextmanager
def _log_to(path: Path, level: int) -> Iterator[None]:
    """The task's log into the run folder; what went to stderr (the job's output) stays as it was."""
    root = logging.getLogger()
    before = root.level, [(h, h.level) for h in root.handlers]
    for handler in root.handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(root.level)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.setLevel(level)
    root.addHandler(to_file)
    root.setLevel(min(root.level, level))
    try:
        yield
    finally:
        root.removeHandler(to_file)
        to_file.close()
        root.setLevel(before[0])
        for handler, handler_level in before[1]:
            handler.setLevel(handler_level)


def _say(message: str) -> None:
    log.info("%s", message)
    print(f"meshfl launch: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m meshfl.launch.slurm RUN_DIR``: one task of the step, as srun starts it (not
    through the ``meshfl`` command line, which imports torch: the researcher's task needs none)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 1:
        print("usage: python -m meshfl.launch.slurm RUN_DIR (srun runs it for `meshfl launch slurm`)",
              file=sys.stderr)
        return 2
    try:
        return run_task(Path(args[0]))
    except MeshflError as exc:
        print(f"meshfl launch: error: {exc.message}", file=sys.stderr)
    except OSError as exc:  # a folder that cannot be made, a file that cannot be read
        print(f"meshfl launch: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
    return 1


__all__ = ["LaunchSpec", "allocation", "interface_address", "main", "plan_from_file", "prepare", "run_task",
           "srun_command"]


if __name__ == "__main__":
    sys.exit(main())
