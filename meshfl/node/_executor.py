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
import signal
import subprocess
import sys
import threading

import orjson

from ..errors import MeshflError
from ._sandbox import ENV as SANDBOX_ENV

log = logging.getLogger("meshfl.node")


class TaskFailed(MeshflError):
    code = "task_failed"


class Executor:
    """``sandbox``: the worker's confinement (see ``_sandbox``); None runs plans unconfined."""

    def __init__(self, *, name: str = "node", env: dict | None = None, sandbox: dict | None = None) -> None:
        self.name = name
        self._env = {**os.environ, **(env or {})}
        if sandbox is not None:
            self._env[SANDBOX_ENV] = orjson.dumps(sandbox).decode()
        self.protections: dict | None = None  # what the last worker achieved (its ready line)
        self._proc: subprocess.Popen | None = None
        self._selectors: dict[int, selectors.BaseSelector] = {}  # pid -> its pipe's selector, made once
        self._lock = threading.Lock()

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshfl.node._worker_main"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self._env,
        )
        line = self._read_line(proc, timeout=120, sel=self._selector(proc))
        ready = orjson.loads(line) if line else {}
        if not ready.get("ready"):
            self._kill(proc)
            raise TaskFailed("the training worker did not start", code="worker_died")
        if ready.get("protections") != self.protections:
            log.info("[%s] plan sandbox: %s", self.name, ready.get("protections"))
        self.protections = ready.get("protections")
        log.info("[%s] training worker started (pid %d)", self.name, proc.pid)
        return proc

    def _selector(self, proc: subprocess.Popen) -> selectors.BaseSelector:
        """The selector on ``proc``'s result pipe, one per worker (not one per task: an epoll
        instance each time showed in a small round's profile)."""
        sel = self._selectors.get(proc.pid)
        if sel is None:
            sel = self._selectors[proc.pid] = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
        return sel

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float, sel: selectors.BaseSelector) -> bytes | None:
        """One result line; b"" if the worker died (end of file), None if the time ran out."""
        if not sel.select(timeout):
            return None
        return proc.stdout.readline()

    def _kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        sel = self._selectors.pop(proc.pid, None)
        if sel is not None:
            sel.close()
        for f in (proc.stdin, proc.stdout):
            if f:
                f.close()

    def start(self) -> None:
        """Start the warm worker ahead of the first task."""
        with self._lock:
            self._live()

    def _live(self) -> subprocess.Popen:
        """The warm worker, a fresh one if it is gone (a dead one's pipes and selector closed)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._kill(self._proc)
            self._proc = None
        if self._proc is None:
            self._proc = self._spawn()
        return self._proc

    def run(self, job: dict, timeout: float) -> dict:
        """Run one job; returns the worker's result dict or raises :class:`TaskFailed`."""
        with self._lock:
            proc = self._live()
            try:
                proc.stdin.write(orjson.dumps(job) + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # the worker is dead: the read below sees it
            line = self._read_line(proc, timeout, self._selector(proc))
            if not line:
                self._kill(proc)
                self._proc = None
                if line is None:
                    raise TaskFailed(f"training did not finish within {timeout:g} s", code="timeout")
                if proc.returncode == -signal.SIGXCPU:
                    raise TaskFailed("the plan went over its CPU-time cap", code="plan_violation")
                raise TaskFailed(
                    f"the training process died (exit {proc.returncode}): crash or out of memory", code="worker_died"
                )
            result = orjson.loads(line)
            if (result.get("error") or {}).get("code") == "plan_violation":
                self._kill(proc)  # it exits by itself too: no later task shares its interpreter
                self._proc = None
            return result

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
