"""The ``meshfl`` command line: ``main`` is the console-script entry point."""

from . import _home, _launch, _misc, _node, _plan  # noqa: F401  (they register their commands)
from ._app import main

__all__ = ["main"]
