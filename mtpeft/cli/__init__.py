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
from . import adapt, bank, continual, distil, evaluate, forgetting, gate, merge, route, train
from .common import emit, table
from .train import TRAIN_CONFIG_KEYS, TRAIN_DEFAULTS, load_run_config

# The command groups, in the order `mtpeft --help` lists them. A new group: a module with add_parser(sub).
GROUPS = (evaluate, train, continual, forgetting, gate, bank, merge, route, distil, adapt)

__all__ = ["TRAIN_CONFIG_KEYS", "TRAIN_DEFAULTS", "build_parser", "emit", "load_run_config", "main", "table"]


class _Version(argparse.Action):
    """``mtpeft --version``: the installed version, looked up only when asked."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("mtpeft")
        except PackageNotFoundError:  # run from a source tree that is not installed
            from .. import __version__ as v
        print(f"mtpeft {v}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtpeft", description=__doc__.split("\n")[0])
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MtpeftError as e:
        from ..display import printable

        print(f"mtpeft: error: {printable(e, keep=chr(10))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mtpeft tasks --json | head`: the reader left; say nothing more
        with contextlib.suppress(OSError, ValueError):  # so the interpreter's final flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
