"""A small REST client for the gradwatch server (standard library only: urllib + json).

Errors are split the way a retrying sender needs them (as in sentry_sdk's transport):
`RetryableError` for connection failures, timeouts, 5xx, 408 and 429 (with the server's
``Retry-After`` when it sent one) and `RefusedError` for every other 4xx, which a retry cannot fix.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from client_hook.spool import RunSpool, dumps

URL_ENV = "GRADWATCH_URL"
TOKEN_ENV = "GRADWATCH_TOKEN"
MAX_BATCH = 100


class DeliveryError(Exception):
    """Base class of the errors a delivery attempt can end with."""


class RetryableError(DeliveryError):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RefusedError(DeliveryError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def check_url(url: str) -> str:
    """Return the URL without a trailing slash; ValueError with one clear line if it is unusable."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"not an http(s) server URL: {url!r} (expected e.g. http://127.0.0.1:8000)"
        )
    return url.rstrip("/")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ApiClient:
    """JSON over HTTP with a per-request timeout and an optional bearer token."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 5.0) -> None:
        self.base_url = check_url(base_url)
        self.token = token
        self.timeout = timeout

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        data = dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", "User-Agent": "gradwatch-client"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace").strip()
            if exc.code in (408, 429) or exc.code >= 500:
                raise RetryableError(
                    f"HTTP {exc.code}", parse_retry_after(exc.headers.get("Retry-After"))
                ) from None
            raise RefusedError(exc.code, detail or exc.reason) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
            raise RetryableError(f"{type(exc).__name__}: {exc}") from None
        return json.loads(raw) if raw else None


class RunUploader:
    """Idempotent delivery of one run: create (or resume) it, send epochs, set the final status."""

    def __init__(self, client: ApiClient, run: dict) -> None:
        self.client = client
        self.run = run
        self.run_id = str(run["id"])
        self.created = False
        self.batch_size = MAX_BATCH

    def ensure_run(self, timeout: float | None = None) -> None:
        if not self.created:
            self.client.request("POST", "/api/runs", self.run, timeout=timeout)
            self.created = True

    def send_epochs(self, records: list[dict], timeout: float | None = None) -> dict:
        """POST one batch; a 404 means the run vanished server-side: create it again, then retry."""
        self.ensure_run(timeout)
        try:
            return self.client.request(
                "POST", f"/api/runs/{self.run_id}/epochs", {"epochs": records}, timeout=timeout
            )
        except RefusedError as exc:
            if exc.status == 404:
                self.created = False
                raise RetryableError("run unknown to the server; creating it again", 0.0) from None
            if exc.status == 413 and len(records) > 1:
                self.batch_size = max(1, len(records) // 2)
                raise RetryableError("batch too large; sending smaller batches", 0.0) from None
            raise

    def send_status(self, status: str, timeout: float | None = None) -> None:
        """Set the final status; a server older than the `interrupted` status (422) gets
        `crashed` instead, the nearest it knows."""
        self.ensure_run(timeout)
        try:
            self.client.request(
                "PATCH", f"/api/runs/{self.run_id}", {"status": status}, timeout=timeout
            )
        except RefusedError as exc:
            if status != "interrupted" or exc.status != 422:
                raise
            self.send_status("crashed", timeout)

    def send_heartbeat(self, timeout: float | None = None) -> None:
        """The process is alive (204); RefusedError 404/405 from a server without heartbeats."""
        self.ensure_run(timeout)
        self.client.request("POST", f"/api/runs/{self.run_id}/heartbeat", {}, timeout=timeout)


def upload(uploader: RunUploader, records: list[dict], status: str | None) -> tuple[int, int]:
    """Send everything synchronously (no retries); return (accepted, duplicates)."""
    uploader.ensure_run()
    accepted = duplicates = 0
    position = 0
    while position < len(records):
        batch = records[position : position + uploader.batch_size]
        try:
            result = uploader.send_epochs(batch)
        except RetryableError as exc:
            if exc.retry_after == 0.0:  # a 404/413 the uploader already adapted to: go again
                continue
            raise
        accepted += int(result.get("accepted", 0))
        duplicates += int(result.get("duplicates", 0))
        position += len(batch)
    if status:
        uploader.send_status(status)
    return accepted, duplicates


def deliver_spool(spool: RunSpool, url: str | None, token: str | None) -> tuple[int, int, str]:
    """Deliver one spooled run (`gradwatch sync` and a later run's worker).

    A spool without a final status belongs to a process that died without closing the monitor:
    the run is marked ``crashed``. Returns (accepted, duplicates, status sent).
    """
    meta = spool.read_meta()
    target = url or meta.get("server_url") or os.environ.get(URL_ENV)
    if not target:
        raise ValueError(f"no server URL for spooled run {spool.run_id}; pass --server")
    files = spool.spooled()
    status = spool.read_status() or "crashed"
    uploader = RunUploader(ApiClient(target, token), meta["run"])
    accepted, duplicates = upload(uploader, spool.load_epochs(files), status)
    from client_hook import scalars  # it builds on this module

    scalars.deliver_spooled(spool, uploader)
    spool.remove_files(path for path, _ in files)  # the files read: not one written since
    spool.clear_status()
    spool.discard()
    return accepted, duplicates, status
