"""Who may use the console: a random token, then a session cookie; a CSRF token per session.

As in Jupyter, the console prints a URL that carries ``?token=...``. A request with the right
token gets a session cookie (HttpOnly, SameSite=Strict) and is redirected to the same page
without the token, so the token does not linger in the address bar or the history. Every other
request without a live session gets 403, whatever its path. Actions are POSTs whose form carries
the session's CSRF token, compared in constant time on the server; a read-only console refuses
every POST. Responses forbid scripts, framing and caching (Content-Security-Policy and friends).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse

MAX_SESSIONS = 64  # logins kept; the oldest is forgotten first
MAX_FORM_BYTES = 16 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"
HEADERS = [
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                 b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_FORBIDDEN = """<!doctype html><html><head><meta charset="utf-8"><title>meshfl console: 403</title>
</head><body style="font-family: sans-serif; margin: 3em"><h1>403: not logged in</h1>
<p>{reason}. Open the console with the address that <code>meshfl node console</code> printed
when it started (it ends in <code>?token=...</code>).</p></body></html>"""


class Guard:
    """The console's token and its live sessions (session id -> CSRF token)."""

    def __init__(self, token: str):
        if len(token) < 16:
            raise ValueError("a console token has at least 16 characters")
        self._token = token.encode()
        # Named after the token: consoles on other ports of the same host keep their own cookie.
        self.cookie = "meshfl_console_" + hashlib.sha256(self._token).hexdigest()[:12]
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def login(self, token: str) -> str | None:
        """A new session id for the right token, None for any other."""
        if not hmac.compare_digest(token.encode(), self._token):
            return None
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session] = secrets.token_urlsafe(32)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session

    def csrf(self, session: str | None) -> str | None:
        """The CSRF token of a live session, None when there is no such session."""
        with self._lock:
            return self._sessions.get(session) if session else None

    def check_csrf(self, session: str | None, value: str | None) -> bool:
        expected = self.csrf(session)
        return bool(expected and value) and hmac.compare_digest(value.encode(), expected.encode())


class GuardMiddleware:
    """Lets a request through only with a live session (or logs it in with the token)."""

    def __init__(self, app, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + HEADERS
            await send(message)

        request = Request(scope)
        token = request.query_params.get("token")
        session = request.cookies.get(self.guard.cookie)
        if token is not None:
            session = self.guard.login(token)
            if session is None:
                response = forbidden("That token is not this console's")
            else:  # a redirect to a path of this console ("//host" would leave it): no Host header decides
                url = request.url.remove_query_params("token")
                path = "/" + url.path.lstrip("/")
                response = RedirectResponse(path + (f"?{url.query}" if url.query else ""), 303)
                response.set_cookie(self.guard.cookie, session, httponly=True, samesite="strict", path="/")
        elif self.guard.csrf(session) is None:
            response = forbidden("This request carries no token and no live session")
        else:
            scope.setdefault("state", {})["session"] = session
            return await self.app(scope, receive, send_with_headers)
        await response(scope, receive, send_with_headers)


def forbidden(reason: str) -> HTMLResponse:
    return HTMLResponse(_FORBIDDEN.format(reason=reason), status_code=403)


async def action_form(request: Request, guard: Guard, read_only: bool) -> dict[str, str]:
    """The fields of an action's form, once the console may act and the CSRF token matches;
    HTTPException 403 otherwise (nothing is done)."""
    if read_only:
        raise HTTPException(403, "this console is read-only (started with --read-only)")
    if request.headers.get("content-type", "").split(";")[0].strip() != FORM_TYPE:
        raise HTTPException(403, "an action is a form post")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    form = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    if not guard.check_csrf(request.state.session, form.get("csrf")):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return form
