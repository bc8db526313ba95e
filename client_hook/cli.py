"""The `gradwatch` command: `serve`, `train`, `import`, `sync`, and `--version`.

Each subcommand lives with the code it drives and exposes `add_arguments(parser, name)` and
`run(args) -> int`. Only the module of the subcommand named on the command line is imported, and
none of them imports anything heavy at top level (no torch, no FastAPI): `gradwatch --help` is
instant, the base (client-only) install runs `import`, `sync` and `train`, and the server image,
which has no torch, runs `serve`.

This entry point lives in `client_hook`, not in `server`: the base install must start without
the server's packages, and a user's own package named `server` (on ``PYTHONPATH``, or in the
working directory under ``python -m``) must not be imported in its place. `serve` checks which
`server` package it would get before importing it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.serve", "run the gradwatch server (REST API + dashboard)"),
    "train": (
        "client_hook.trainer.cli",
        "train the reference multi-task model, streaming to a server",
    ),
    "import": ("client_hook.sync_cli", "upload a local gradwatch run file to a server"),
    "sync": ("client_hook.sync_cli", "deliver epochs spooled while the server was unreachable"),
}
SERVER_INSTALL = "pip install 'gradwatch[server]'"


class CommandUnavailable(Exception):
    """A subcommand cannot run in this installation; the message says why in one line."""


def version() -> str:
    try:
        return importlib.metadata.version("gradwatch")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _our_server_package() -> None:
    """Raise CommandUnavailable unless `import server` gives the package installed beside
    `client_hook` (and not, say, a folder named `server` in the working directory)."""
    expected = Path(__file__).resolve().parent.parent / "server"
    spec = importlib.util.find_spec("server")
    found = Path(spec.origin).resolve().parent if spec and spec.origin else None
    if found != expected:
        where = f"the package in {found}" if found else "no package"
        raise CommandUnavailable(
            f"`import server` finds {where}, not gradwatch's server in {expected}; "
            "run from another directory or fix PYTHONPATH"
        )


def _missing_server_packages() -> list[str]:
    """The distributions of the `server` extra that are not installed (none known when
    gradwatch itself is not installed, e.g. run from a source tree)."""
    try:
        requires = importlib.metadata.requires("gradwatch") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requires:
        if 'extra == "server"' not in requirement.replace("'", '"'):
            continue
        name = re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0]
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _server_extra_needed(missing: Sequence[str]) -> CommandUnavailable:
    return CommandUnavailable(
        f"needs the server install: {SERVER_INSTALL} (missing: {', '.join(missing)})"
    )


def load(name: str) -> object:
    """The module of subcommand `name` (CommandUnavailable if it cannot run here)."""
    module_name = SUBCOMMANDS[name][0]
    if not module_name.startswith("server."):
        return importlib.import_module(module_name)
    missing = _missing_server_packages()
    if missing:
        raise _server_extra_needed(missing)
    _our_server_package()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # a server package missing although not declared so
        raise _server_extra_needed([exc.name or str(exc)]) from None


def build_parser(commands: Iterable[str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    """The parser; the options of `commands` only (the others are listed, not loaded)."""
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="See and fix gradient imbalance in multi-task PyTorch training.",
    )
    parser.add_argument("--version", action="version", version=f"gradwatch {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = set(commands)
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in wanted:
            module = load(name)
            module.add_arguments(p, name)  # type: ignore[attr-defined]
            p.set_defaults(_run=module.run)  # type: ignore[attr-defined]
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv` (the first argument not starting with '-')."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    try:
        parser = build_parser([command] if command else [])
        args = parser.parse_args(argv)
        return int(args._run(args) or 0)
    except CommandUnavailable as exc:
        print(f"gradwatch {command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradwatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
