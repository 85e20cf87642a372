"""The ``mtpeft`` command. Reporting subcommands print a table, or one JSON object with --json.

One file per command group (``cli/<group>.py`` with ``add_parser(sub)`` and its ``cmd_*`` functions); this
file only assembles the parser and maps ``MtpeftError`` to ``mtpeft: error: ...`` with exit status 2.
Heavy libraries (torch, datasets) are imported inside the commands, so ``--help`` stays quick.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..errors import MtpeftError
from . import bank, evaluate, gate, merge, route, train
from .common import emit, table
from .train import TRAIN_CONFIG_KEYS, TRAIN_DEFAULTS, load_run_config

# The command groups, in the order `mtpeft --help` lists them. A new group: a module with add_parser(sub).
GROUPS = (evaluate, train, gate, bank, merge, route)

__all__ = ["TRAIN_CONFIG_KEYS", "TRAIN_DEFAULTS", "build_parser", "emit", "load_run_config", "main", "table"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtpeft", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MtpeftError as e:
        print(f"mtpeft: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mtpeft tasks --json | head`: the reader left; say nothing more
        with contextlib.suppress(OSError, ValueError):  # so the interpreter's final flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
