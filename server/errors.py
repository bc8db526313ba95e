"""Domain exceptions and the one set of handlers that turns them into responses.

`/api/*` (and /health) answer JSON `{"error": ..., "detail": ...}`; other paths answer an HTML
page rendered from templates/error.html (plain text if that template is missing). The `error`
strings are constants so that tests and clients can rely on them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("gradwatch")

RUN_NOT_FOUND = "run not found"
TASKS_CONFLICT = "run exists with a different task list"
EPOCH_CONFLICT = "epoch already stored with different values"
VALIDATION_FAILED = "invalid request"
BODY_TOO_LARGE = "request body too large"
UNAUTHORIZED = "missing or wrong bearer token"
NOT_FOUND = "not found"
METHOD_NOT_ALLOWED = "method not allowed"
INTERNAL_ERROR = "internal server error"
DATABASE_REFUSED = "value refused by the database"
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


class GradwatchError(Exception):
    """Base of the domain errors: an HTTP status, a constant message and a detail."""

    status_code = 400
    error = "bad request"

    def __init__(self, detail: Any = None, error: str | None = None) -> None:
        super().__init__(error or self.error)
        self.detail = detail
        if error is not None:
            self.error = error


class RunNotFound(GradwatchError):
    status_code = 404
    error = RUN_NOT_FOUND


class TasksConflict(GradwatchError):
    status_code = 409
    error = TASKS_CONFLICT


class EpochConflict(GradwatchError):
    status_code = 409
    error = EPOCH_CONFLICT


class InvalidInput(GradwatchError):
    """422 for input that is well-formed JSON but wrong for this run; `detail` names the field."""

    status_code = 422
    error = VALIDATION_FAILED

    def __init__(self, field: str, message: str) -> None:
        super().__init__([{"field": field, "message": message}])


class BodyTooLarge(GradwatchError):
    status_code = 413
    error = BODY_TOO_LARGE


class Unauthorized(GradwatchError):
    status_code = 401
    error = UNAUTHORIZED


def wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api") or path in ("/health", "/openapi.json")


def error_response(
    request: Request,
    status_code: int,
    error: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """JSON for the API, an HTML page (or plain text) elsewhere."""
    if wants_json(request):
        return JSONResponse(
            {"error": error, "detail": detail}, status_code=status_code, headers=headers
        )
    try:
        from server.templating import templates

        return templates.TemplateResponse(
            request,
            "error.html",
            {"status_code": status_code, "error": error, "detail": detail},
            status_code=status_code,
            headers=headers,
        )
    except Exception:  # template missing or broken: never turn an error page into a 500
        return PlainTextResponse(
            f"{status_code}: {error}", status_code=status_code, headers=headers
        )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() and out else (f".{part}" if out else part)
    return out or ".".join(str(p) for p in loc)


async def _on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GradwatchError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return error_response(request, exc.status_code, exc.error, exc.detail, headers)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"field": _field_name(tuple(err.get("loc", ()))), "message": str(err.get("msg", ""))}
        for err in exc.errors()
    ]
    return error_response(request, 422, VALIDATION_FAILED, detail)


def _documented_methods(request: Request) -> str | None:
    """`Allow` for a path, from the OpenAPI document (Starlette lists only the first route)."""
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            return ", ".join(sorted(m.upper() for m in operations if m.upper() in HTTP_METHODS))
    return None


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 400:  # FastAPI: a body it could not decode; that is malformed input
        body = [{"field": "body", "message": str(exc.detail)}]
        return error_response(request, 422, VALIDATION_FAILED, body)
    if exc.status_code == 405:
        headers["Allow"] = _documented_methods(request) or headers.get("Allow", "")
    known = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}
    error = known.get(exc.status_code) or str(exc.detail)
    detail = None if exc.status_code in known else exc.detail
    return error_response(request, exc.status_code, error, detail, headers or None)


async def _on_data_error(request: Request, exc: Exception) -> Response:
    """A value the database refused (out of range, bad encoding) that validation let through:
    still the client's input, so a 422 rather than a 500."""
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300]
    return error_response(request, 422, DATABASE_REFUSED, [{"field": "body", "message": reason}])


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, INTERNAL_ERROR)


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GradwatchError, _on_domain_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(DataError, _on_data_error)
    app.add_exception_handler(Exception, _on_unexpected)
