"""The console's web application (Starlette) and :func:`serve`, which runs it under Uvicorn.

Pages are plain GETs that read the home (``_views``) and render a template; the only actions
are POSTs that call what the CLI calls, with ``by=`` the console's operator, so they land in the
audit chain the same way: approving and rejecting a plan (:class:`PlanRegistry`, as ``meshfl plan
approve/reject``), releasing and denying a held result (:func:`meshfl.node._review.decide`, as
``meshfl result release/deny``). A node home gets the operator's pages, a researcher home its
experiments.
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import os
import secrets
import signal
import socket
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse
from starlette.routing import Route

from .. import __version__
from ..errors import MeshflError, PlanError
from ..home import Home
from ..node._plans import PlanRegistry
from ..node._review import OUTCOMES
from ..node._review import decide as decide_result
from . import _views
from ._auth import Guard, GuardMiddleware, action_form
from ._render import environment

log = logging.getLogger("meshfl.console")

DEFAULT_PORT = 8470
ACTIONS = ("approve", "reject")  # on a plan
RESULT_ACTIONS = {"release": True, "deny": False}  # on a held result: release it?
REFRESH_S = 5  # a page that shows work in progress reloads itself this often (no script)
NODE_NAV = [("/", "Overview"), ("/datasets", "Datasets"), ("/plans", "Plans"),
            ("/results", "Results awaiting release"), ("/audit", "Audit")]
RESEARCHER_NAV = [("/", "Experiments"), ("/audit", "Audit")]


def create_app(home: Home, *, token: str, by: str, read_only: bool = False) -> Starlette:
    """The console for an open `home`; `token` logs a browser in, `by` names who acts."""
    if not by.strip():
        raise MeshflError("the console needs an operator name (--by)", code="bad_argument")
    guard = Guard(token)
    env = environment()
    node = home.config.role == "node"
    plans = PlanRegistry(home.store, home.audit)

    def page(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        html = env.get_template(template).render(
            home=home, node=node, nav=NODE_NAV if node else RESEARCHER_NAV, path=request.url.path,
            read_only=read_only, by=by, csrf=guard.csrf(request.state.session), version=__version__,
            refresh=context.pop("refresh", False) and REFRESH_S, **context)
        return HTMLResponse(html, status_code=status)

    def view(template: str, build: Callable[[Request], dict], *, role: str | None = None):
        def endpoint(request: Request) -> HTMLResponse:  # sync: Starlette runs it in a thread
            if role is not None and home.config.role != role:
                raise HTTPException(404, f"a {home.config.role} home has no such page")
            try:
                context = build(request)
            except MeshflError as exc:  # e.g. missing_dependency: a spent budget's epsilon needs meshfl[dp]
                raise HTTPException(500, exc.message) from None
            return page(request, template, **context)

        return endpoint

    def audit_context(request: Request) -> dict:
        before = request.query_params.get("before")
        if before is not None and not before.isdigit():
            raise HTTPException(400, "before is a record number")
        event = request.query_params.get("event", "").strip()[:64]
        return {"audit": _views.audit_page(home, event, int(before) if before else None)}

    def plan_context(request: Request) -> dict:
        try:
            plan = _views.node_plan(home, request.path_params["hash"])
        except PlanError as exc:
            raise HTTPException(404, exc.message) from None
        return {"plan": plan, "done": request.query_params.get("done")}

    def experiment_context(request: Request) -> dict:
        exp = _views.experiment(home, request.path_params["exp_id"])
        if exp is None:
            raise HTTPException(404, f"no experiment {request.path_params['exp_id']!r} in this home")
        return {"exp": exp, "refresh": exp["state"] == "unfinished"}

    def overview_context(request: Request) -> dict:
        if node:
            info = _views.node_overview(home)
            return {"info": info, "refresh": info["tasks"]["running"] > 0 or info["tasks"]["pending"] > 0}
        exps = _views.experiments(home)
        return {"experiments": exps, "refresh": any(e["state"] == "unfinished" for e in exps)}

    def results_context(request: Request) -> dict:
        done = request.query_params.get("done")
        flash = None
        if done in OUTCOMES:
            flash = {"outcome": done, "task": request.query_params.get("task", "")[:128],
                     "nudged": request.query_params.get("nudged") == "1"}
        return {"held": _views.node_review(home), "results": _views.node_results(home), "flash": flash}

    async def decide_plan(request: Request) -> RedirectResponse:
        action = request.path_params["action"]
        if action not in ACTIONS or not node:
            raise HTTPException(404, "no such action")
        await action_form(request, guard, read_only)
        try:
            record = await run_in_threadpool(getattr(plans, action), request.path_params["hash"], by=by)
        except PlanError as exc:
            raise HTTPException(404, exc.message) from None
        log.info("console: training plan %s %s by %s", record["hash"], record["status"], by)
        return RedirectResponse(f"/plans/{record['hash']}?done={record['status']}", 303)

    async def decide_held(request: Request) -> RedirectResponse:
        action, task = request.path_params["action"], request.path_params["task"]
        if action not in RESULT_ACTIONS or not node:
            raise HTTPException(404, "no such action")
        await action_form(request, guard, read_only)
        try:
            done = await run_in_threadpool(decide_result, home, task, RESULT_ACTIONS[action], by)
        except MeshflError as exc:
            raise HTTPException(404 if exc.code == "unknown_result" else 500, exc.message) from None
        log.info("console: result of task %s %s by %s", task, done["outcome"], by)
        query = urlencode({"done": done["outcome"], "task": task, "nudged": int(done["node_running"])})
        return RedirectResponse(f"/results?{query}", 303)

    async def error(request: Request, exc: HTTPException) -> HTMLResponse:  # after login only
        return await run_in_threadpool(page, request, "error.html", exc.status_code,
                                       code=exc.status_code, message=exc.detail)

    routes = [
        Route("/", view("overview.html" if node else "experiments.html", overview_context)),
        Route("/datasets", view("datasets.html", lambda r: {"datasets": _views.node_datasets(home)}, role="node")),
        Route("/plans", view("plans.html", lambda r: {"plans": _views.node_plans(home)}, role="node")),
        Route("/plans/{hash}", view("plan.html", plan_context, role="node")),
        Route("/plans/{hash}/{action}", decide_plan, methods=["POST"]),
        Route("/results", view("results.html", results_context, role="node")),
        Route("/results/{task}/{action}", decide_held, methods=["POST"]),
        Route("/audit", view("audit.html", audit_context)),
        Route("/experiments/{exp_id}", view("experiment.html", experiment_context, role="researcher")),
    ]
    return Starlette(routes=routes, middleware=[Middleware(GuardMiddleware, guard=guard)],
                     exception_handlers={HTTPException: error})


def serve(home_path: str | os.PathLike, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          read_only: bool = False, by: str | None = None, echo: Callable[[str], None] = print) -> None:
    """Serve the console for the home at `home_path` until SIGINT/SIGTERM; `echo` gets the URL
    to open (it carries the login token) and any warning."""
    import uvicorn

    by = by or _login_name()
    token = secrets.token_urlsafe(24)
    with Home.open(Path(home_path)) as home:
        app = create_app(home, token=token, by=by, read_only=read_only)
        sock = _bind(host, port)
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        warning = _exposure_warning(host)
        if warning:
            log.warning("%s", warning)
            echo(f"warning: {warning}")
        mode = " (read-only)" if read_only else f", acting as {by}"
        echo(f"meshfl console for {home.config.role} {home.config.name}{mode}: "
             f"http://{shown}:{sock.getsockname()[1]}/?token={token}")
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        if threading.current_thread() is threading.main_thread():
            # Uvicorn stops gracefully on SIGINT/SIGTERM, then raises the signal again to the
            # handlers it found: these, so that the console ends quietly, as `node start` does.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MeshflError(f"the console cannot listen on {host}:{port}: {exc.strerror}; choose "
                          f"another --port", code="bind_failed") from None
    sock.listen(64)
    return sock


def _exposure_warning(host: str) -> str | None:
    """What to tell an operator who binds the console beyond loopback; None on loopback."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    return (f"the console listens on {host}, reachable from other machines over plain HTTP: its "
            f"token and pages travel unencrypted. Prefer the default (127.0.0.1) and an SSH tunnel "
            f"(ssh -L {DEFAULT_PORT}:127.0.0.1:{DEFAULT_PORT} ...).")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no LOGNAME: say so rather than guess
        return "operator"
