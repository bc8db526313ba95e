"""`python -m server.cli`: the `gradwatch` command, whose entry point is `client_hook.cli`
(the base install, which has no server packages, must run it too)."""

from __future__ import annotations

import sys

from client_hook.cli import SUBCOMMANDS, build_parser, main

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
