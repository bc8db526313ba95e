"""Checks every request passes before the app sees it: the Host header (DNS rebinding), the
body's content type on JSON endpoints (cross-site "simple" requests), and a body that is
declared but never sent (a connection held with no answer).

A page on any site can make the user's browser POST `text/plain` to a loopback server without
a CORS preflight, and a DNS name rebound to 127.0.0.1 makes the browser send its own name as
Host. Refusing both closes these doors whether or not a token is set.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response

HOST_NOT_ALLOWED = "host not allowed"
UNSUPPORTED_MEDIA_TYPE = "unsupported media type"
BODY_TIMEOUT = "request body not received in time"
JSON_TYPE = "application/json"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def host_name(host_header: str) -> str:
    """`Example.org:8000` -> `example.org`, `[::1]:8000` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_json(content_type: str) -> bool:
    """application/json, or a `+json` type, with any parameters (charset)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_TYPE or (media.startswith("application/") and media.endswith("+json"))


async def _refuse(
    scope: Scope, receive: Receive, send: Send, status: int, error: str, detail: object
) -> None:
    response = error_response(
        Request(scope, receive), status, error, detail, headers={"Connection": "close"}
    )
    await response(scope, receive, send)


class HostCheckMiddleware:
    """400 unless the Host header names this server: a loopback name, the bind address, or
    one of GRADWATCH_ALLOWED_HOSTS (`*`: any)."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed
        self.any_host = "*" in allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any_host:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = host_name(header)
        if name in self.allowed:
            await self.app(scope, receive, send)
            return
        detail = [{"field": "Host", "message": f"{name!r} is not a name of this server; "
                   "add it to GRADWATCH_ALLOWED_HOSTS"}]  # fmt: skip
        await _refuse(scope, receive, send, 400, HOST_NOT_ALLOWED, detail)


def declares_body(headers: dict[bytes, bytes]) -> bool:
    """The request says a body follows (a non-zero Content-Length, or chunked)."""
    length = headers.get(b"content-length", b"0").strip()
    return length not in (b"0", b"") or b"transfer-encoding" in headers


class JsonBodyMiddleware:
    """415 for a body on an /api write that is not JSON (`text/plain` is what a cross-site
    page can send without a preflight). Requests without a body pass (a heartbeat, DELETE)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in BODY_METHODS
            or not scope["path"].startswith("/api/")
        ):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if not declares_body(headers) or is_json(content_type):
            await self.app(scope, receive, send)
            return
        detail = [{"field": "Content-Type", "message": f"expected {JSON_TYPE}, "
                   f"got {content_type or 'none'!r}"}]  # fmt: skip
        await _refuse(scope, receive, send, 415, UNSUPPORTED_MEDIA_TYPE, detail)


class BodyTimeoutMiddleware:
    """408 and close when the client stops sending a body it declared for `seconds` (uvicorn
    has no such timeout: the connection would wait forever). A request that declares no body
    passes untouched (a live stream keeps no wrappers of ours for its whole life)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not declares_body(dict(scope["headers"])):
            await self.app(scope, receive, send)
            return
        started = body_done = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:  # e.g. a streaming response waiting for the disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                raise _BodyTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        try:
            await self.app(scope, receive_in_time, send_tracking)
        except _BodyTimeout:
            if started:
                raise
            detail = [{"field": "body", "message": f"no bytes for {self.seconds:g} s"}]
            await _refuse(scope, receive, send, 408, BODY_TIMEOUT, detail)


class _BodyTimeout(Exception):
    pass
