"""Optional extras: import one where its feature needs it, or say which extra to install.

The core never imports an extra at module level; a feature that needs one calls :func:`require`,
so a missing extra is a coded error naming the ``pip install`` that fixes it, on whichever side
(node or researcher) it is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MeshflError


class MissingDependency(MeshflError):
    code = "missing_dependency"


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or :class:`MissingDependency` naming ``pip install meshfl[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(
            f"this needs the optional package {module.split('.')[0]!r}: pip install 'meshfl[{extra}]'",
            details={"extra": extra, "module": module},
        ) from None
