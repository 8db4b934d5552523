"""Runs training tasks in a warm child process with a time limit (see ``_worker``).

One worker is kept alive between tasks, because starting Python and importing torch for every
task would cost more than a small round. It is replaced when it dies or overruns its limit; the
task it was running fails with a code the researcher can read (``timeout``, ``worker_died``),
and the node carries on.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import threading

import orjson

from ..errors import MeshflError

log = logging.getLogger("meshfl.node")


class TaskFailed(MeshflError):
    code = "task_failed"


# The worker ignores SIGINT (Ctrl-C reaches the whole process group; the node stops the worker):
# ignored before its imports start, so a Ctrl-C during start-up prints no traceback either.
_WORKER = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); from meshfl.node._worker import main; main()"


class Executor:
    def __init__(self, *, name: str = "node", env: dict | None = None) -> None:
        self.name = name
        self._env = {**os.environ, **(env or {})}
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
        )
        line = self._read_line(proc, timeout=120)
        if not line or not orjson.loads(line).get("ready"):
            self._kill(proc)
            raise TaskFailed("the training worker did not start", code="worker_died")
        log.info("[%s] training worker started (pid %d)", self.name, proc.pid)
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> bytes | None:
        """One result line; b"" if the worker died (end of file), None if the time ran out."""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
            return proc.stdout.readline()

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f:
                f.close()

    def start(self) -> None:
        """Start the warm worker ahead of the first task."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._spawn()

    def run(self, job: dict, timeout: float) -> dict:
        """Run one job; returns the worker's result dict or raises :class:`TaskFailed`."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._spawn()
            proc = self._proc
            try:
                proc.stdin.write(orjson.dumps(job) + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # the worker is dead: the read below sees it
            line = self._read_line(proc, timeout)
            if not line:
                self._kill(proc)
                self._proc = None
                if line is None:
                    raise TaskFailed(f"training did not finish within {timeout:g} s", code="timeout")
                raise TaskFailed(
                    f"the training process died (exit {proc.returncode}): crash or out of memory", code="worker_died"
                )
            return orjson.loads(line)

    def cancel(self) -> None:
        """Kill the running task's worker (a fresh one starts for the next task)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._kill(self._proc)
                self._proc = None
