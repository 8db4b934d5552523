"""The sandbox a plan runs in: the training worker confines itself before it runs any plan.

Protections, from strongest to weakest (docs/security.md says what each one covers):

* **No network, no privileges** - at start, before it imports anything heavy, the worker moves
  into a new user and network namespace (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``): it has no
  network interface but a loopback that is down, and no capability outside, so it cannot lift
  its own limits. Where the kernel refuses user namespaces, a network namespace alone (root), else
  nothing: then only the audit hook below stands between a plan and the network.
* **Memory cap** - ``RLIMIT_DATA`` (the process's private writable memory: heap, anonymous and
  copy-on-write mappings; unlike ``RLIMIT_AS`` it leaves room for CUDA's address-space
  reservations). An allocation beyond it fails inside the plan.
* **CPU-time cap** - ``RLIMIT_CPU``, reset before each task to what the worker has used plus the
  task's allowance: the kernel stops the worker (SIGXCPU) when a task exceeds it. It is the soft
  limit (a hard one could not be raised for the next task), so the audit hook refuses a plan's
  own ``setrlimit``.
* **Audit hook** (PEP 578) - refuses, and records, socket creation, starting processes (fork,
  exec, spawn, system), loading native libraries with ctypes, signalling other processes, making
  links, opening or listing files outside the task's dataset, its scratch folder, its model
  pack, the folders the operator allowed and Python's own installation (read-only), and
  removing, renaming, or changing modes, owners or sizes anywhere but in what the task may write
  (its scratch folder, its pack and its state). This is a
  tripwire, not a boundary: code in the same interpreter can get around it (with ctypes already
  loaded by a library, say). It catches careless or naive plans and leaves evidence; the
  namespaces and limits above are what the kernel enforces.
* **Scratch folder** - each task runs in the node's scratch folder (the working directory and
  ``TMPDIR``), which the node empties after every task.

A plan that trips any of these fails its task with ``plan_violation`` (audited); the worker then
exits, so no later task shares its interpreter.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from contextlib import contextmanager, nullcontext
from typing import Any

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
ENV = "MESHFL_SANDBOX"  # the settings, as JSON, passed from the node to its worker

_BLOCKED = {
    "socket.__new__": "opened a network socket",
    "subprocess.Popen": "started a process",
    "os.system": "started a shell",
    "os.exec": "replaced its process (exec)",
    "os.posix_spawn": "started a process",
    "os.spawn": "started a process",
    "os.fork": "forked its process",
    "os.forkpty": "forked its process",
    "pty.spawn": "started a process",
    "ctypes.dlopen": "loaded a native library",
    "os.symlink": "made a symbolic link",
    "os.link": "made a hard link",
    "resource.setrlimit": "changed its resource limits (the CPU-time cap is one)",
    "resource.prlimit": "changed or read resource limits with prlimit",
}
#: Events that destroy or alter what is there without opening a file, and where in each one's
#: arguments its paths are, each with the index of its ``dir_fd`` (None: it has none; CPython
#: reports an absent ``dir_fd`` as -1).
#: Making a folder is not among them: libraries make cache folders of their own (torch's
#: inductor makes one in /tmp), and an empty folder harms nobody.
_CHANGES = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
            "os.truncate": ((0, None),), "os.rename": ((0, 2), (1, 3))}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_SYSTEM_READS = ("/proc/self/", f"/proc/{os.getpid()}/", "/sys/devices/system/cpu/", "/sys/fs/cgroup/",
                 "/dev/null", "/dev/urandom", "/dev/random", "/proc/cpuinfo", "/proc/meminfo", "/etc/localtime")


def isolate(settings: dict) -> dict:
    """Confine this process (call first thing in the worker, while it has one thread); returns the
    protections in force, for the node's log and ``meshfl node status``."""
    network = "none"
    if settings.get("network", True):
        network = _unshare()
    memory = None
    if settings.get("memory_mb"):
        limit = int(settings["memory_mb"]) << 20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        memory = int(settings["memory_mb"])
    return {"network": network, "memory_mb": memory, "cpu_seconds": settings.get("cpu_seconds"),
            "audit_hook": bool(settings.get("audit_hook", True)), "scratch": True}


def _unshare() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        return "namespace"  # no interfaces, and no capabilities outside the namespace
    if libc.unshare(CLONE_NEWNET) == 0:
        return "namespace (network only)"
    return "none"


def probe() -> dict:
    """What the sandbox can do on this machine, tried in a child process (for ``node status``)."""
    import subprocess

    code = ("import json, meshfl.node._sandbox as s; "
            "print(json.dumps(s.isolate({'network': True, 'memory_mb': 64})))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
        import json

        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"network": "none", "memory_cap": False, "audit_hook": True}
    return {"network": found["network"], "memory_cap": found["memory_mb"] == 64, "audit_hook": True}


_NETWORK = {"namespace": "user + network namespace: no interface, no privileges outside it",
            "namespace (network only)": "network namespace (no user namespace on this machine)"}


def protections(settings: dict | None, box: dict | None) -> list[dict]:
    """What the sandbox gives a plan on this machine, one row per protection (name, on, note), as
    ``meshfl node status`` and the console show it. ``settings``: the home's
    (``Config.sandbox_settings()``, None when the sandbox is off); ``box``: :func:`probe`'s."""
    if settings is None or box is None:
        return [{"name": "Plan sandbox", "on": False, "note": "config.toml says sandbox = false: plans run unconfined"}]
    isolated, extra = box["network"] in _NETWORK, settings["read_paths"]
    return [
        {"name": "No network", "on": isolated,
         "note": _NETWORK.get(box["network"], "NOT isolated by the kernel here (only the audit hook refuses sockets)")},
        {"name": "Memory cap", "on": bool(box["memory_cap"]),
         "note": f"{settings['memory_mb']} MiB (RLIMIT_DATA)" if box["memory_cap"] else "the kernel refused RLIMIT_DATA"},
        {"name": "CPU-time cap", "on": True, "note": f"{settings['cpu_seconds']:g} s per task (RLIMIT_CPU)"},
        {"name": "Audit hook", "on": True,
         "note": "files beyond the task's own, processes, sockets, native libraries: refused (a tripwire, not a boundary)"
                 + (f"; {len(extra)} more folder(s) readable (sandbox_read_paths)" if extra else "")},
        {"name": "Scratch folder", "on": True, "note": "one per task, removed after it"},
    ]


class Jail:
    """The audit hook's rules and what it caught, for the task now running (one per worker)."""

    def __init__(self, read_roots: list[str], extra_reads: list[str]) -> None:
        self.read_roots = _roots(read_roots) + _roots(extra_reads)
        self.task_reads: tuple[str, ...] = ()
        self.task_writes: tuple[str, ...] = ()
        self.violations: list[str] = []
        self.armed = False

    def begin(self, *, reads: list[str], writes: list[str], cpu_seconds: float | None) -> None:
        """Arm the rules for one task: it may read ``reads`` and write ``writes`` (files or folders)."""
        self.task_reads, self.task_writes = _roots(reads), _roots(writes)
        self.violations = []
        if cpu_seconds:
            used = resource.getrusage(resource.RUSAGE_SELF)
            soft = int(used.ru_utime + used.ru_stime + cpu_seconds) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))
        self.armed = True

    def end(self) -> list[str]:
        self.armed = False
        return self.violations

    @contextmanager
    def lifted(self):
        """Disarm the rules around the worker's own imports (a library that loads libc with
        ctypes as it is imported, say); never around plan code."""
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = armed

    def hook(self, event: str, args: tuple) -> None:
        if not self.armed:
            return
        if event in _BLOCKED:
            self._refuse(f"the plan {_BLOCKED[event]} ({event})")
        elif event == "open":
            self._check_open(args)
        elif event in _CHANGES:
            for path_at, dir_fd_at in _CHANGES[event]:
                path = args[path_at]
                dir_fd = args[dir_fd_at] if dir_fd_at is not None else -1
                if isinstance(path, (str, bytes)) and not _under(_real(path, dir_fd), self.task_writes):
                    self._refuse(f"the plan changed {_show(path)} ({event}), outside its scratch folder")
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args else "."
            if isinstance(path, (str, bytes)) and not self._may_read(_real(path)):
                self._refuse(f"the plan listed {_show(path)}, outside what it may read")
        elif event == "os.kill" and args and args[0] not in (0, os.getpid()):
            self._refuse(f"the plan signalled process {args[0]}")

    def _check_open(self, args: tuple) -> None:
        path, mode, flags = (list(args) + [None, None, None])[:3]
        if not isinstance(path, (str, bytes)):
            return  # an open file descriptor: already allowed when it was opened
        real = _real(path)
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and not _under(real, self.task_writes):
            self._refuse(f"the plan opened {_show(path)} for writing, outside its scratch folder")
        elif not writing and not self._may_read(real):
            self._refuse(f"the plan read {_show(path)}, outside its dataset and scratch folder")

    def _may_read(self, real: str) -> bool:
        return _under(real, self.read_roots + self.task_reads + self.task_writes) or real.startswith(_SYSTEM_READS) \
            or real in (r.rstrip("/") for r in _SYSTEM_READS)

    def _refuse(self, what: str) -> None:
        self.violations.append(what)
        raise PermissionError(f"meshfl sandbox: {what}")


_installed: Jail | None = None


def install(jail: Jail) -> None:
    """Add the jail's audit hook (for the life of the process: hooks cannot be removed)."""
    global _installed
    sys.dont_write_bytecode = True  # importing writes no .pyc beside the libraries
    sys.addaudithook(jail.hook)
    _installed = jail


def lifted():
    """:meth:`Jail.lifted` of the installed jail (a no-op without one)."""
    return _installed.lifted() if _installed is not None else nullcontext()


def python_roots() -> list[str]:
    """Where this interpreter's own code lives (read-only for plans)."""
    import meshfl

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.dirname(meshfl.__file__))}
    roots.update(p for p in sys.path if p and os.path.isabs(p))
    return sorted(roots)


def _roots(paths: list[str]) -> tuple[str, ...]:
    return tuple(_real(p) for p in paths if p)


def _real(path: Any, dir_fd: int = -1) -> str:
    """The real path of ``path``; one relative to an open folder (``dir_fd``, as ``shutil.rmtree``
    removes) is taken from where that folder is."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if dir_fd != -1 and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.realpath(path)


def _under(real: str, roots) -> bool:
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


def _show(path: Any) -> str:
    return repr(os.fsdecode(path) if isinstance(path, bytes) else path)[:200]
