"""A tiny stdlib HTTP server speaking the part of the gradwatch API the client uses, with
scripted faults (status codes, Retry-After, hangs). Only for failure modes the real server cannot
be asked to produce; everything else is tested against the real `gradwatch serve`."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeApi:
    def __init__(self) -> None:
        self.runs: dict[str, dict] = {}
        self.epochs: dict[str, dict[int, dict]] = {}
        self.stored: list[tuple[str, int]] = []  # every (run, epoch) stored, in order
        self.statuses: dict[str, str] = {}
        self.requests: list[tuple[float, str, str, int]] = []  # (time, method, path, status)
        # answered first, in order (None: answer that request normally)
        self.faults: list[tuple[int, dict[str, str]] | None] = []
        self.always: tuple[int, dict[str, str]] | None = None  # answered to every request
        self.fault_paths = re.compile(".*")
        self.hang_seconds = 0.0
        self.upstream: str | None = None  # when set, a faulty proxy in front of a real server
        self.heartbeats: list[tuple[float, str]] = []  # (time, run id)
        self.heartbeat_status = 204  # 404: a server from before heartbeats
        self.statuses_known = {"finished", "failed", "crashed", "interrupted"}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else {}

            def _send(self, status: int, body: dict | None = None, headers=None) -> None:
                data = json.dumps(body or {}).encode()
                with fake.lock:  # before the answer: a client that has it sees the request here
                    fake.requests.append((time.monotonic(), self.command, self.path, status))
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                body = self._body()
                if fake.hang_seconds:
                    time.sleep(fake.hang_seconds)
                with fake.lock:
                    fault = None
                    if fake.fault_paths.match(self.path):
                        fault = fake.faults.pop(0) if fake.faults else fake.always
                if fault is not None:
                    self._send(fault[0], {"error": "scripted"}, fault[1])
                    return
                self._send(*fake.answer(self.command, self.path, body))

            do_POST = do_PATCH = do_GET = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        if self.upstream:
            return self._forward(method, path, body)
        with self.lock:
            if method == "POST" and path == "/api/runs":
                new = body["id"] not in self.runs
                self.runs.setdefault(body["id"], body)
                self.epochs.setdefault(body["id"], {})
                return (201 if new else 200), {"id": body["id"]}
            match = re.fullmatch(r"/api/runs/([^/]+)(/epochs|/heartbeat)?", path)
            if not match or match.group(1) not in self.runs:
                return 404, {"error": "run not found"}
            run_id = match.group(1)
            if match.group(2) == "/heartbeat":
                if self.heartbeat_status == 204:
                    self.heartbeats.append((time.monotonic(), run_id))
                return self.heartbeat_status, {}
            if method == "PATCH":
                if body["status"] not in self.statuses_known:
                    return 422, {"error": "validation", "detail": "status"}
                self.statuses[run_id] = body["status"]
                return 200, {"id": run_id}
            accepted = duplicates = 0
            for record in body["epochs"]:
                if record["epoch"] in self.epochs[run_id]:
                    duplicates += 1
                else:
                    self.epochs[run_id][record["epoch"]] = record
                    self.stored.append((run_id, record["epoch"]))
                    accepted += 1
            return 200, {"accepted": accepted, "duplicates": duplicates, "cursor": len(self.stored)}

    def _forward(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode() if method != "GET" else None
        request = urllib.request.Request(
            self.upstream + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return 502, {"error": "upstream unreachable"}

    def count(self, method: str, suffix: str) -> int:
        with self.lock:
            return sum(1 for _, m, p, _ in self.requests if m == method and p.endswith(suffix))

    def __enter__(self) -> FakeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.hang_seconds = 0.0
        self.server.shutdown()
        self.server.server_close()
