"""Helpers for tests with several real server processes: a TCP fail-over proxy, an SSE reader,
plain JSON requests."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from tests.support import free_port


def request(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def ok(url: str, method: str, path: str, body: Any = None) -> Any:
    status, data = request(url, method, path, body)
    assert status < 300, (method, path, status, data)
    return data


class FailoverProxy:
    """A loopback TCP proxy in front of several servers, the way a load balancer with health
    checks behaves: each new connection goes to the first backend that accepts one."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = [(urlsplit(b).hostname or "", urlsplit(b).port or 0) for b in backends]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FailoverProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            upstream = self._connect()
            if upstream is None:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _connect(self) -> socket.socket | None:
        for address in self.backends:
            try:
                return socket.create_connection(address, timeout=1)
            except OSError:
                continue
        return None

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.5)
        try:
            while not self.closed.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


class SseReader(threading.Thread):
    """Follows /api/runs/{id}/stream on one server until `end` (reconnecting with
    Last-Event-ID, as EventSource does), recording every epoch it receives and when."""

    def __init__(self, url: str, run_id: str, timeout: float = 60.0, since: int | None = 0) -> None:
        super().__init__(daemon=True)
        self.parts = urlsplit(url)
        self.run_id = run_id
        self.query = "" if since is None else f"?since={since}"
        self.summaries = 0  # `run` events received
        self.deadline = time.monotonic() + timeout
        self.epochs: list[int] = []
        self.arrivals: dict[int, float] = {}
        self.ended: dict[str, Any] | None = None
        self.last_id: str | None = None
        self.connected = threading.Event()

    def run(self) -> None:
        while self.ended is None and time.monotonic() < self.deadline:
            try:
                self._follow()
            except OSError:
                time.sleep(0.2)

    def _follow(self) -> None:
        conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=20)
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        conn.request("GET", f"/api/runs/{self.run_id}/stream{self.query}", headers=headers)
        r = conn.getresponse()
        assert r.status == 200, r.status
        self.connected.set()
        event: dict[str, str] = {}
        while time.monotonic() < self.deadline:
            line = r.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if line:
                key, _, value = line.partition(": ")
                event[key] = value
                continue
            self._handle(event)
            event = {}
            if self.ended is not None:
                conn.close()
                return

    def _handle(self, event: dict[str, str]) -> None:
        if "id" in event:
            self.last_id = event["id"]
        if event.get("event") == "metrics":
            got = json.loads(event["data"])["epochs"]
            now = time.monotonic()
            self.epochs += got
            for e in got:
                self.arrivals.setdefault(e, now)
        elif event.get("event") == "run":
            self.summaries += 1
        elif event.get("event") == "end":
            self.ended = json.loads(event["data"])
