"""The `gradwatch` command: `serve`, `train`, `import`, `sync`.

Each subcommand lives with the code it drives and exposes `add_arguments(parser)` and
`run(args) -> int`. Those modules import nothing heavy at top level (no torch, no FastAPI), so
`gradwatch --help` is instant and the base (client-only) install can run `import`, `sync` and
`train` while the server image, which has no torch, can run `serve`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="See and fix gradient imbalance in multi-task PyTorch training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p, name)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("gradwatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
