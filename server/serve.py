"""`gradwatch serve`: apply the migrations, then run the app under uvicorn.

One process by default; `--workers N` forks N of them on one listening socket
(server.workers). We bind the socket ourselves, with IPPROTO_TCP and TCP_NODELAY so that no
small response waits on Nagle's algorithm (uvicorn issue #3149), which also gives a one-line
error when the port is taken. Several `gradwatch serve` processes, on one machine or many,
may share one PostgreSQL database: they keep no state of their own (server.livefeed).

Memory: after a crowd of live viewers has left, CPython's small-object arenas stay fragmented
(an arena goes back to the system only once every object in it is freed): what each open
stream keeps decides how many arenas a crowd dirties. With 1,000 viewers on one process
(bench/fanout.py, PostgreSQL) RSS stays +16% above idle (peak 119-120 MiB, idle 100), since
streams in order skip FastAPI's request handling (server.routes.stream.RunStreams; +22%
before, peak 129; +28-30% before EventStream). sys._debugmallocstats showed the live bytes
back where they were (50.0 vs 50.5 MB) but the arenas grown from 50 to ~78. Tried before
RunStreams, no change: bounding the feed's reads to two threads, or to threads that never
retire, binding its SQL parameters, routing the streams outside included routers.
`PYTHONMALLOC=malloc gradwatch serve` puts objects on glibc's malloc instead, whose freed
memory the live feed's malloc_trim returns, but it costs 10-25% of bulk ingest throughput
(SQLite and PostgreSQL), so it is the operator's choice, not the default.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys

from server.config import LOOPBACK_HOSTS


def add_arguments(parser: argparse.ArgumentParser, name: str = "serve") -> None:
    parser.add_argument("--host", help="address to listen on (GRADWATCH_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (GRADWATCH_PORT, default 8000)")
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL (GRADWATCH_DATABASE_URL, default sqlite:///./gradwatch.db)",
    )
    parser.add_argument(
        "--allow-insecure-bind",
        action="store_true",
        default=None,
        help="listen on a non-loopback address without GRADWATCH_TOKEN "
        "(GRADWATCH_ALLOW_INSECURE_BIND)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the port (default 1; more than one needs PostgreSQL "
        "to be useful: SQLite has a single writer)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    parser.add_argument("--access-log", action="store_true", help="log every request")


def _fail(message: str) -> int:
    print(f"gradwatch serve: {message}", file=sys.stderr)
    return 2


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted ones
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from server.config import Settings

    overrides = {
        "host": args.host,
        "port": args.port,
        "database_url": args.database_url,
        "allow_insecure_bind": args.allow_insecure_bind,
    }
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        return _fail(f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}")

    if settings.host not in LOOPBACK_HOSTS and not settings.token:
        if not settings.allow_insecure_bind:
            return _fail(
                f"refusing to listen on {settings.host} without GRADWATCH_TOKEN "
                "(set a token, or pass --allow-insecure-bind)"
            )
    if args.workers < 1:
        return _fail("--workers must be at least 1")
    if args.workers > 1 and not hasattr(os, "fork"):
        return _fail("--workers needs a POSIX system (fork); run several `gradwatch serve` instead")
    url_error = _check_url(settings.database_url)
    if url_error:
        return _fail(url_error)
    migrate_error = _migrate(settings.database_url)
    if migrate_error:
        return _fail(migrate_error)
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}")
    if args.workers == 1:
        return _serve(settings, sock, args.log_level, args.access_log)
    from server.workers import supervise

    print(
        f"gradwatch: {args.workers} worker processes on http://{settings.host}:{settings.port}"
        f" (supervisor pid {os.getpid()})",
        file=sys.stderr,
        flush=True,
    )
    return supervise(args.workers, lambda: _serve(settings, sock, args.log_level, args.access_log))


def _check_url(url: str) -> str | None:
    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        return f"invalid database URL {url!r} (e.g. sqlite:///./gradwatch.db)"
    if backend not in ("sqlite", "postgresql"):
        return f"unsupported database {backend!r}: use sqlite:/// or postgresql+psycopg://"
    return None


def _migrate(url: str) -> str | None:
    from sqlalchemy.engine.url import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from server.db import run_migrations

    shown = make_url(url).render_as_string(hide_password=True)
    try:
        run_migrations(url)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return f"cannot use the database {shown}: {reason}"
    except ImportError as exc:
        return f"database driver missing for {shown}: {exc}"
    return None


def _serve(settings: object, sock: socket.socket, log_level: str, access_log: bool) -> int:
    import uvicorn

    from server.main import create_app

    config = uvicorn.Config(
        create_app(settings),  # type: ignore[arg-type]
        log_level=log_level,
        access_log=access_log,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    # What is alive now (modules, the app) lives as long as the process: out of the cyclic
    # collector's sight, so that a full collection under a thousand open streams scans their
    # objects only (measured: up to hundreds of ms per collection otherwise, every request
    # waiting behind it).
    gc.collect()
    gc.freeze()
    print(
        f"gradwatch serving on http://{settings.host}:{settings.port}"  # type: ignore[attr-defined]
        f" (pid {os.getpid()})",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[sock])
    return 0
