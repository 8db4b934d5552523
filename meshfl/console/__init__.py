"""The operator's console: a local web page over a node's (or a researcher's) home.

``meshfl node console --home H`` serves it on 127.0.0.1, behind a token it prints (see
``_auth``). It needs the ``console`` extra (``pip install meshfl[console]``: Starlette, Uvicorn,
Jinja2, Pygments); without it, importing this package raises a coded error that says so.
"""

from ..errors import MeshflError

try:
    import jinja2  # noqa: F401
    import pygments  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ModuleNotFoundError as exc:
    raise MeshflError(f"the console needs {exc.name}, which is not installed: "
                      f"pip install meshfl[console]", code="missing_dependency") from None

from ._app import DEFAULT_PORT, create_app, serve  # noqa: E402

__all__ = ["DEFAULT_PORT", "create_app", "serve"]
