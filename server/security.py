"""Bearer-token checks, the dashboard's session cookie, the request-body size limit, and the
security headers (CSP).

With GRADWATCH_TOKEN set, writes need `Authorization: Bearer <token>`, always: a cookie never
authorises a write (a browser sends cookies on cross-site form posts; bearer headers it does not).
With GRADWATCH_PROTECT_READS as well, reads need the bearer header OR the session cookie that
`POST /login` (server/routes/login.py) sets for a browser, which cannot send the header.

The cookie is `<expires>.<HMAC-SHA256(key=token, "gradwatch-session-v1|<expires>")>`: it carries
no secret, expires on its own, and changing the token invalidates every cookie issued with the
old one.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.errors import BODY_TOO_LARGE, Unauthorized, error_response, wants_json

bearer = HTTPBearer(auto_error=False, description="GRADWATCH_TOKEN, when the server has one.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

SESSION_COOKIE = "gradwatch_session"
SESSION_SECONDS = 7 * 24 * 3600
_SESSION_LABEL = b"gradwatch-session-v1|"


class LoginRequired(Unauthorized):
    """A page (not /api) read without credentials; server/routes/login.py answers it with the
    login form. Where that handler is not installed it is an ordinary 401."""


def token_matches(token: str, given: str) -> bool:
    """Constant-time: the comparison does not reveal how many leading characters matched."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def _session_mac(token: str, expires: int) -> str:
    message = _SESSION_LABEL + str(expires).encode()
    return hmac.new(token.encode("utf-8"), message, hashlib.sha256).hexdigest()


def new_session(token: str, now: float | None = None) -> str:
    """A session cookie value for `token`, valid SESSION_SECONDS from `now`."""
    expires = int(now if now is not None else time.time()) + SESSION_SECONDS
    return f"{expires}.{_session_mac(token, expires)}"


def session_valid(token: str, value: str | None, now: float | None = None) -> bool:
    """Whether `value` is an unexpired session cookie issued with `token`."""
    if not value or len(value) > 128:
        return False
    expires_text, _, mac = value.partition(".")
    if not (expires_text.isascii() and expires_text.isdigit() and len(expires_text) < 16):
        return False
    expires = int(expires_text)
    if expires < (now if now is not None else time.time()):
        return False
    expected = _session_mac(token, expires)
    return hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii"))


def _check(settings: Settings, creds: HTTPAuthorizationCredentials | None) -> None:
    token = settings.token
    if not token:
        return
    if not token_matches(token, creds.credentials if creds is not None else ""):
        raise Unauthorized()


# The two checks are `async`: a plain `def` dependency costs every request a trip to a worker
# thread, for a comparison of a few bytes.
async def require_write(request: Request, creds: Credentials) -> None:
    """Writes need the bearer token whenever GRADWATCH_TOKEN is set; the cookie does not count."""
    _check(request.app.state.settings, creds)


def read_allowed(request: Request, creds: HTTPAuthorizationCredentials | None) -> bool:
    """Reads need the bearer token or the session cookie, only with GRADWATCH_PROTECT_READS.
    Sets `request.state.session_cookie` (a valid cookie came along) for the page header."""
    settings: Settings = request.app.state.settings
    token = settings.token
    by_cookie = bool(token) and session_valid(token or "", request.cookies.get(SESSION_COOKIE))
    request.state.session_cookie = by_cookie
    if not token or not settings.protect_reads or by_cookie:
        return True
    return creds is not None and token_matches(token, creds.credentials)


async def require_read(request: Request, creds: Credentials) -> None:
    """The dependency of every read route: `read_allowed`, or 401 (the login form for a page)."""
    if not read_allowed(request, creds):
        raise Unauthorized() if wants_json(request) else LoginRequired()


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: by Content-Length up front, and by counting the bytes
    actually received (chunked uploads have no Content-Length). The body is read here, in
    full, before the app sees it, so a refused request never reaches a route."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            if declared is not None and int(declared) > self.max_bytes:
                raise _TooLarge
            messages = await self._read(receive)
        except _TooLarge:
            await self._refuse(scope, receive, send)
            return
        except ValueError:  # unparsable Content-Length: let the server/app reject it
            messages = await self._read(receive)

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> list[Message]:
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                raise _TooLarge
            if not message.get("more_body", False):
                return messages

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = error_response(
            request,
            413,
            BODY_TOO_LARGE,
            {"limit_bytes": self.max_bytes},
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


# No CDN, no inline scripts; Plotly needs inline styles. /docs (Swagger UI, served locally by
# server/routes/api_docs.py) starts itself with one inline script, so it alone allows those.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """Content-Security-Policy and friends on every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"] in ("/docs", "/redoc", "/docs/oauth2-redirect")
        policy = (DOCS_CSP if docs else CSP).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"content-security-policy", policy),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
