"""A login form for the dashboard when reads are protected (GRADWATCH_PROTECT_READS).

A browser cannot send `Authorization: Bearer`, so a page read without credentials answers 401
with a form (templates/login.html) instead of the requested page. `POST /login` checks the
token (constant time) and sets the session cookie (server/security.py: HttpOnly, Secure over
https, SameSite=Lax so that a link from chat or email keeps the session - safe because the
cookie never authorises a write; its value is an HMAC keyed by the token, never the token), then
redirects back to the page, only ever to a path on this site. The cookie grants reads (pages,
/api GETs, the SSE streams), never writes. `POST /logout` drops it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from server.errors import error_response
from server.routes.pages import VERSION, settings_of
from server.security import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    LoginRequired,
    new_session,
    token_matches,
)
from server.templating import templates

router = APIRouter(include_in_schema=False)

WRONG_TOKEN = "Wrong token: it does not match the GRADWATCH_TOKEN of this server."
MAX_FORM_BYTES = 8192
_NOT_BACK_TO = ("/login", "/logout")


def local_path(target: str | None) -> str:
    """`target` if it is a path on this site, else "/" (no open redirect: no scheme, no host,
    no `//host` or `/\\host`, no control characters a browser would strip)."""
    if not target or len(target) > 2048 or not target.startswith("/"):
        return "/"
    if target.startswith("//") or "\\" in target or any(ord(ch) < 0x20 or ord(ch) == 0x7F
                                                       for ch in target):  # fmt: skip
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path.startswith(_NOT_BACK_TO):
        return "/"
    return target


def login_page(request: Request, next_path: str, status_code: int, message: str = "") -> Response:
    context: dict[str, Any] = {
        "version": VERSION,
        "asset_version": VERSION,
        "nav": "login",
        "next_path": next_path,
        "message": message,
    }
    headers = {"Cache-Control": "no-store"}
    if status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return templates.TemplateResponse(
        request, "login.html", context, status_code=status_code, headers=headers
    )


@router.get("/login")
def login_form(request: Request, next: str = "/") -> Response:
    """The form on its own (e.g. from a bookmark); without a token there is nothing to log in to."""
    target = local_path(next)
    if not settings_of(request).token:
        return RedirectResponse(target, status_code=303)
    return login_page(request, target, 200)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the form's token; on success set the session cookie and go back to `next`."""
    body = await request.body()
    try:
        if len(body) > MAX_FORM_BYTES:
            raise ValueError("form too large")
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    except ValueError:  # too large, too many fields: no token in it
        form = {}
    given = form.get("token", [""])[0]
    target = local_path(form.get("next", ["/"])[0])
    token = settings_of(request).token
    if not token:
        return RedirectResponse(target, status_code=303)
    if not token_matches(token, given):
        return login_page(request, target, 401, WRONG_TOKEN)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        new_session(token),
        max_age=SESSION_SECONDS,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="lax",
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="lax",
    )
    return response


async def on_login_required(request: Request, exc: Exception) -> Response:
    """A page read without credentials: the login form, with the page to come back to."""
    if request.method not in ("GET", "HEAD"):
        assert isinstance(exc, LoginRequired)
        return error_response(request, 401, exc.error, headers={"WWW-Authenticate": "Bearer"})
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return login_page(request, local_path(here), 401)


def install(app: FastAPI) -> None:
    """Add the login routes and the handler that turns LoginRequired into the form."""
    app.include_router(router)
    app.add_exception_handler(LoginRequired, on_login_required)
