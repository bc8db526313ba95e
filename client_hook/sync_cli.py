"""`gradwatch import FILE` and `gradwatch sync`: deliver what a run could not send itself.

Both are idempotent: the run id comes from the client and the server skips identical epochs, so
running them twice (or while a run is still delivering) stores every epoch once.
Imports nothing heavy (no torch): the base install runs them instantly.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from client_hook import scalars
from client_hook.api import (
    TOKEN_ENV,
    URL_ENV,
    ApiClient,
    DeliveryError,
    RunUploader,
    check_url,
    deliver_spool,
    upload,
)
from client_hook.spool import SPOOL_ENV, LocalRunFile, RunSpool, default_spool_dir


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    if name == "import":
        parser.add_argument(
            "file", type=Path, help="a local run file (.jsonl) written by GradMonitor"
        )
    else:
        parser.add_argument(
            "--spool-dir",
            type=Path,
            default=None,
            help=f"spool folder (default ${SPOOL_ENV} or ./.gradwatch/spool)",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="also deliver spools whose training process is still running",
        )
    parser.add_argument(
        "--server",
        default=None,
        help=f"server URL (default ${URL_ENV}; sync: the URL the run used)",
    )
    parser.add_argument("--token", default=None, help=f"API token (default ${TOKEN_ENV})")
    parser.set_defaults(_command_name=name)


def _fail(message: str) -> int:
    print(f"gradwatch: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV)
    url = args.server or os.environ.get(URL_ENV)
    try:
        if url:
            url = check_url(url)
    except ValueError as exc:
        return _fail(str(exc))
    if args._command_name == "import":
        return _import(args.file, url, token)
    return _sync(args.spool_dir or default_spool_dir(), url, token, args.force)


def _import(path: Path, url: str | None, token: str | None) -> int:
    if not url:
        return _fail(f"no server URL: pass --server or set {URL_ENV}")
    try:
        run_payload, records, status = LocalRunFile.read(path)
    except FileNotFoundError:
        return _fail(f"no such file: {path}")
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read {path}: {exc}")
    try:
        uploader = RunUploader(ApiClient(url, token), run_payload)
        accepted, duplicates = upload(uploader, records, status or "crashed")
        scalars.upload_local(path, uploader)
    except DeliveryError as exc:
        return _fail(f"upload to {url} failed: {exc}")
    print(
        f"imported run {run_payload.get('name')} ({run_payload.get('id')}): "
        f"{accepted} epoch(s) stored, {duplicates} already there"
    )
    return 0


def _sync(root: Path, url: str | None, token: str | None, force: bool) -> int:
    spools = RunSpool.all_runs(root)
    if not spools:
        print(f"nothing to sync in {root}")
        return 0
    failures = 0
    for spool in spools:
        if spool.owner_alive() and not force:
            print(
                f"skipped run {spool.run_id}: its training process is still running "
                "(it delivers its own epochs; --force to send anyway)"
            )
            continue
        try:
            accepted, duplicates, status = deliver_spool(spool, url, token)
        except (DeliveryError, ValueError, OSError) as exc:
            failures += 1
            print(f"gradwatch: run {spool.run_id} not synced: {exc}", file=sys.stderr)
            continue
        print(
            f"synced run {spool.run_id}: {accepted} epoch(s) stored, {duplicates} already "
            f"there, status {status}"
        )
    return 1 if failures else 0
