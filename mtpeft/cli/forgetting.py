"""`mtpeft eval-forgetting RUN_DIR`: the continual metrics recomputed from a run directory's saved
accuracy matrices alone (no model, no data), printed as a table or one JSON object; --write rewrites
report.json, report.md and the plots."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MtpeftError


def cmd_eval_forgetting(args):
    from ..continual.report import format_metrics, recompute, write_report

    if args.no_plots and not args.write:
        raise MtpeftError("--no-plots goes with --write (it skips the PNGs when rewriting the report); "
                          "drop it, or add --write")
    report = write_report(args.run_dir, plots=not args.no_plots) if args.write else recompute(args.run_dir)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(format_metrics(report))
    if args.write:
        print(f"wrote {Path(args.run_dir) / 'report.json'}, report.md" + (", plots/" if report.get("plots") else ""))


def add_parser(sub) -> None:
    s = sub.add_parser("eval-forgetting", help="recompute ACC, BWT, FWT, forgetting and intransigence of a "
                       "`mtpeft continual` run directory from its saved accuracy matrices")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the --out directory of `mtpeft continual`")
    s.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    s.add_argument("--write", action="store_true",
                   help="also rewrite RUN_DIR/report.json, report.md and the PNGs under RUN_DIR/plots/")
    s.add_argument("--no-plots", action="store_true", help="with --write: skip the PNGs")
    s.set_defaults(func=cmd_eval_forgetting)
