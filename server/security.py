"""Bearer-token checks, the request-body size limit, and the security headers (CSP)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import Settings
from server.errors import BODY_TOO_LARGE, Unauthorized, error_response

bearer = HTTPBearer(auto_error=False, description="GRADWATCH_TOKEN, when the server has one.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _check(settings: Settings, creds: HTTPAuthorizationCredentials | None) -> None:
    token = settings.token
    if not token:
        return
    given = creds.credentials if creds is not None else ""
    # constant-time: the comparison does not reveal how many leading characters matched
    if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
        raise Unauthorized()


def require_write(request: Request, creds: Credentials) -> None:
    """Writes need the token whenever GRADWATCH_TOKEN is set."""
    _check(request.app.state.settings, creds)


def require_read(request: Request, creds: Credentials) -> None:
    """Reads need it only with GRADWATCH_PROTECT_READS as well."""
    settings: Settings = request.app.state.settings
    if settings.protect_reads:
        _check(settings, creds)


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


# No CDN, no inline scripts; Plotly needs inline styles. /docs (Swagger UI) loads its assets
# from a CDN, so it gets a looser policy of its own.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https:; "
    "frame-ancestors 'none'"
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
