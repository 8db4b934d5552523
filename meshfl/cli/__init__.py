"""The ``meshfl`` command line: ``main`` is the console-script entry point."""

from . import _directory, _experiment, _home, _host, _lan, _launch, _misc, _node, _plan, _result  # noqa: F401  (they register their commands)
from ._app import main

__all__ = ["main"]
