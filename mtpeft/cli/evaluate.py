"""`mtpeft tasks`, `mtpeft zero-shot` and `mtpeft eval`: what the suite holds and how well a bank does."""
from __future__ import annotations

from pathlib import Path

from ..errors import MtpeftError
from .common import _common, _load_tasks, _module_for_task, _task_args, emit


def cmd_tasks(args):
    from ..suite import builtin_names, describe_builtin

    rows = [describe_builtin(n, seed=args.seed) for n in builtin_names()]
    for r in rows:
        r["labels"] = r.get("label_names")
        r["num_labels"] = len(r.get("label_names", []))
    emit(args, {"tasks": rows}, rows, ["name", "train", "validation", "test", "num_labels", "labels"])


def cmd_zero_shot(args):
    from ..api import load_bank_or_new
    from ..train import evaluate

    tasks = _load_tasks(args)  # before the backbone: a bad task file fails fast
    bank, scorer = load_bank_or_new(args.backbone)
    rows = []
    for t in tasks:
        r = evaluate(bank, scorer, t, None, split=args.split, progress=True)
        rows.append(r)
    emit(args, {"backbone": args.backbone, "results": rows}, rows, ["task", "split", "n", "accuracy", "majority"],
         title=f"zero-shot accuracy of the bare {args.backbone} backbone")


def cmd_eval(args):
    from ..api import open_bank
    from ..skills import evaluate_skills, load_skills, skills_for_task
    from ..train import evaluate

    tasks = _load_tasks(args)
    if args.router and args.module:
        raise MtpeftError("--router and --module both say what serves the tasks; give one")
    bank, scorer = open_bank(args.bank)
    if args.router:  # a saved router (AdapterFusion, or Poly/MHR skills) serves every task
        from ..skills import evaluate_router, load_router

        router = load_router(bank, args.bank, args.router)
        rows = [dict(module=args.router, **evaluate_router(bank, scorer, t, router, split=args.split, progress=True))
                for t in tasks]
        emit(args, {"bank": str(args.bank), "results": rows}, rows,
             ["task", "module", "split", "n", "accuracy", "majority"])
        return
    rows = []
    for t in tasks:
        skills = None if args.module else skills_for_task(args.bank, t.name)
        if skills is not None:  # a Poly/MHR inventory routes this task through its routing matrix
            router = load_skills(bank, args.bank, skills)
            rows.append(dict(module=skills, **evaluate_skills(bank, scorer, t, router, split=args.split,
                                                              progress=True)))
            continue
        module = args.module or _module_for_task(bank, t.name)
        rows.append(dict(module=module, **evaluate(bank, scorer, t, module, split=args.split, progress=True)))
    emit(args, {"bank": str(args.bank), "results": rows}, rows, ["task", "module", "split", "n", "accuracy", "majority"])



def add_parser(sub) -> None:
    s = sub.add_parser("tasks", help="list the built-in tasks with split sizes and label sets")
    _common(s, backbone=False)
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("zero-shot", help="accuracy of the bare backbone per task, beside the majority baseline")
    _task_args(s)
    _common(s)
    s.add_argument("--split", default="test", choices=["train", "validation", "test"])
    s.set_defaults(func=cmd_zero_shot)

    s = sub.add_parser("eval", help="accuracy of a bank's modules with task-id routing (a task a skills inventory "
                       "routes, Poly/MHR, goes through its routing matrix)")
    s.add_argument("--bank", required=True, type=Path)
    _task_args(s)
    _common(s, backbone=False)
    s.add_argument("--module", default=None, help="module to route to (default: the skills that route the task, else the "
                   "module trained on it)")
    s.add_argument("--router", default=None, metavar="NAME",
                   help="route every task through the router saved in BANK/routers/NAME/: an AdapterFusion "
                   "(`mtpeft adapt --methods fusion --keep`) or a Poly/MHR skills inventory")
    s.add_argument("--split", default="test", choices=["train", "validation", "test"])
    s.set_defaults(func=cmd_eval)
