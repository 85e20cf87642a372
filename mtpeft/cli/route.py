"""`mtpeft route`: answer tasks no expert was trained on from a bank's experts, without the tasks' labels."""
from __future__ import annotations

from pathlib import Path

from ..errors import MtpeftError
from .common import _common, _load_tasks, _task_args, emit

DEFAULT = "phatgoose,arrow,retrieval,average,merge-uniform,merge-ties"


def cmd_route(args):
    from ..api import open_bank
    from ..route_report import write_report
    from ..zeroshot import check_routers, route_eval

    routers = check_routers(args.routers.split(","))  # a typo fails before anything loads
    if args.top_k is not None and args.top_k < 1:
        raise MtpeftError(f"--top-k {args.top_k} is out of range; give a positive integer, e.g. --top-k 2")
    if args.batch_size < 1:
        raise MtpeftError(f"--batch-size {args.batch_size} is out of range; give a positive integer, e.g. 64")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise MtpeftError(f"--out {args.out} is a file; give a directory for report.json, report.md and the heatmaps")
    if not (Path(args.bank) / "manifest.json").exists():
        raise MtpeftError(f"{args.bank} is not a bank (no manifest.json); train experts into it first: "
                          "`mtpeft train --module lora --task T --out BANK`")
    tasks = _load_tasks(args)
    bank, scorer = open_bank(args.bank)
    log = None if args.json else (lambda msg: print(msg, flush=True))
    report = route_eval(bank, scorer, tasks, routers, top_k=args.top_k, seed=args.seed, split=args.split,
                        batch_size=args.batch_size, log=log)
    report["bank"] = str(args.bank)
    if args.out is not None:
        report["files"] = write_report(report, args.out)
    names = [t.name for t in tasks]
    rows = [{"method": r["method"] + (" (oracle)" if r["kind"] == "oracle" else ""),
             **{n: r["accuracy"][n] for n in names}, "mean": r["mean"]} for r in report["rows"]]
    emit(args, report, rows, ["method", *names, "mean"],
         title=f"zero-shot routing over {len(report['experts'])} experts of {args.bank} ({args.split} accuracy; "
         "the oracle picks the best expert per task with the labels)")


def add_parser(sub) -> None:
    s = sub.add_parser("route", help="route tasks no expert was trained on across a bank's experts (no labels "
                       "used to route): routers, merges, multitask and oracle, with heatmaps")
    s.add_argument("--bank", required=True, type=Path, help="a bank of experts (gated with `mtpeft gate` for "
                   "phatgoose and retrieval)")
    _task_args(s)
    _common(s, backbone=False)
    s.add_argument("--routers", default=DEFAULT,
                   help=f"comma-separated zero-shot routers and merges (default {DEFAULT})")
    s.add_argument("--top-k", type=int, default=None,
                   help="experts kept per token / example (default: each router's own: phatgoose 2, arrow 3, "
                   "retrieval 1)")
    s.add_argument("--split", default="test", choices=["train", "validation", "test"])
    s.add_argument("--batch-size", type=int, default=64, help="examples per forward (default 64)")
    s.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write report.json, report.md and PNG heatmaps of the routing weights to DIR")
    s.set_defaults(func=cmd_route)
