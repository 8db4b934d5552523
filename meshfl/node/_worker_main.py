"""The training worker's entry point: confine the process first, then load torch and serve.

Namespaces can only be entered by a process with one thread, and the limits must hold before any
plan runs, so this module imports nothing heavy before :func:`~meshfl.node._sandbox.isolate`.
The worker ignores SIGINT from its first line: Ctrl-C reaches the terminal's whole process group,
and stopping the worker is the node's job (no traceback from it, even during start-up).
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

import json  # noqa: E402
import os  # noqa: E402

from ._sandbox import ENV, isolate

settings = json.loads(os.environ.get(ENV) or "{}") or None
protections = isolate(settings) if settings else None

from ._worker import main  # noqa: E402  (after isolation, on purpose)

main(settings, protections)
