"""`mtpeft merge`: merge experts of a bank into one new LoRA module, saved into the bank."""
from __future__ import annotations

import json
from pathlib import Path

from .common import comma_list


def cmd_merge(args):
    from ..bank import read_manifest
    from ..lock import DirLock

    read_manifest(args.bank)  # a clear error for a missing or foreign bank, before anything else
    names = comma_list(args.modules, "--modules")
    weights = comma_list(args.weights, "--weights", float)
    with DirLock(args.bank, what="bank"):
        from ..api import open_bank
        from ..merge import merge_modules

        bank, _ = open_bank(args.bank)
        report = merge_modules(bank, names, args.name, method=args.method, weights=weights,
                               density=args.density, rank=args.rank, seed=args.seed)
        bank.save(args.bank)
    report["bank"] = str(args.bank)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    how = "exact" if report["exact"] else f"SVD-truncated, relative error {report['relative_error']:.4f}"
    print(f"merged {', '.join(names)} ({args.method}, weights {report['weights']}) into {args.name!r}: "
          f"LoRA rank {report['rank']} on {len(report['sites'])} sites, {how}; saved in {args.bank}")


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge experts of a bank into one new LoRA module (uniform, weighted, "
                                     "TIES, DARE; negative weights negate)")
    p.add_argument("--bank", type=Path, required=True, help="the bank directory (the merge is saved into it)")
    p.add_argument("--modules", required=True, help="comma-separated module names, e.g. a,b,c")
    p.add_argument("--name", required=True, help="the new module's name (must not exist in the bank)")
    p.add_argument("--method", default="uniform", choices=["uniform", "weighted", "ties", "dare", "dare_ties"],
                   help="uniform (default): mean of the deltas; weighted: with --weights; ties; dare; dare_ties")
    p.add_argument("--weights", default=None, help="comma-separated weights, one per module (negative: negation)")
    p.add_argument("--density", type=float, default=0.2, help="TIES/DARE: fraction of each delta kept (default 0.2)")
    p.add_argument("--rank", type=int, default=None,
                   help="SVD-truncate to this rank (default: exact for uniform/weighted, the sum of ranks otherwise)")
    p.add_argument("--seed", type=int, default=0, help="DARE's random drop (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the merge report)")
    p.set_defaults(func=cmd_merge)
