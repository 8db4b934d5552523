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


#: The extra that installs each optional package a plan's own source may import.
EXTRA_OF = {"sklearn": "sklearn", "opacus": "dp", "matplotlib": "plot"}


def _missing(module: str, extra: str) -> MissingDependency:
    return MissingDependency(
        f"this needs the optional package {module.split('.')[0]!r}: pip install 'meshfl[{extra}]'",
        details={"extra": extra, "module": module},
    )


def missing_extra(exc: ModuleNotFoundError) -> Exception:
    """What to raise for code (a plan's source) that failed to import ``exc.name``: the coded
    error naming the extra when an extra provides it, else the import error itself."""
    top = (exc.name or "").split(".")[0]
    return _missing(exc.name, EXTRA_OF[top]) if top in EXTRA_OF else exc


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or :class:`MissingDependency` naming ``pip install meshfl[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(module, extra) from None
