"""`mtpeft adapt`: few-shot transfer from a bank's experts to a new task; `mtpeft embed`: the experts' Fisher
task embeddings (for pi-tuning and best-source), stored in the bank."""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import MtpeftError
from .common import _file_options, _task_args, emit, parallel_args


def _ints(text: str, flag: str) -> list[int]:
    items = [s.strip() for s in str(text).split(",")]
    if not all(items):
        raise MtpeftError(f"{flag} {text!r} has an empty item; give a comma-separated list, e.g. {flag} 0,1,2")
    try:
        return [int(s) for s in items]
    except ValueError:
        raise MtpeftError(f"{flag} {text!r}: every item must be an integer, e.g. {flag} 0,1,2") from None


def _check_bank(path: Path) -> None:
    if not (path / "manifest.json").exists():
        raise MtpeftError(f"{path} is not a bank (no manifest.json); train experts into it first: "
                          "`mtpeft train --module lora --task T --out BANK`")


def _positive(args, *flags) -> None:
    for flag in flags:
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None and not v > 0:
            raise MtpeftError(f"{flag} {v} is out of range; give a positive number, e.g. {flag} 16")


def _budget(args):
    from ..adapt import Budget

    cap = args.max_steps
    kw = {"steps": args.steps if cap is None else min(args.steps, cap), "lr": args.lr, "batch_size": args.batch_size,
          "lorahub_evals": args.lorahub_evals, "top_k": args.top_k, "fisher_batches": args.fisher_batches,
          "probe_steps": args.probe_steps if cap is None else min(args.probe_steps, cap),
          "interp_steps": args.interp_steps if cap is None else min(args.interp_steps, cap),
          "router_lr": args.router_lr, "progress": not args.json}
    return Budget(**kw)


def _one_task(args, specs: list[str]):
    from ..suite import load_task

    if len(specs) != 1:
        raise MtpeftError(f"adapt to one task at a time: give --task NAME or --task-file NAME=PATH once (got "
                          f"{len(specs) or 'none'})")
    return load_task(specs[0], max_examples=args.max_examples, seed=0, **_file_options(args))


def _skills_router(args, bank, methods: list[str]):
    """The router of the bank's skills for the methods that adapt skills: ``--skills-name``, else the bank's only
    saved skills router; None where no method needs it or none is saved (run_adapt then names the fix)."""
    from ..adapt import get_method
    from ..skills import load_skills, saved_skills

    if not any(get_method(m).needs_skills for m in methods):
        return None
    if args.skills_name:
        return load_skills(bank, args.bank, args.skills_name)
    names = saved_skills(args.bank)
    if len(names) > 1:
        raise MtpeftError(f"{args.bank} holds several skill inventories ({', '.join(names)}); choose one with "
                          "--skills-name NAME")
    return load_skills(bank, args.bank, names[0]) if names else None


def cmd_adapt(args):
    from ..adapt.run import check_methods
    from ..adapt.shots import check_shots

    shots = check_shots(args.shots)  # every flag is checked before anything heavy loads
    methods = check_methods(args.methods)
    seeds = _ints(args.seeds, "--seeds")
    _positive(args, "--max-steps", "--max-examples", "--steps", "--lr", "--batch-size", "--lorahub-evals", "--top-k",
              "--probe-steps", "--fisher-batches", "--router-lr")
    if args.interp_steps < 0:
        raise MtpeftError(f"--interp-steps {args.interp_steps} is out of range; give an integer >= 0")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise MtpeftError(f"--out {args.out} is a file; give a directory for adapt-report.json and the heatmaps")
    _check_bank(args.bank)
    budget = _budget(args)
    from ..distributed import Parallel

    parallel = Parallel(args.devices, args.num_nodes, args.strategy, args.accelerator)
    parallel.check_batch(budget.batch_size)
    experts = None if args.experts is None else [s.strip() for s in args.experts.split(",") if s.strip()]
    task = _one_task(args, ([args.task] if args.task else []) + list(args.task_file or []))
    from ..suite import load_task

    sources = {}
    for spec in args.source_file:
        t = load_task(spec, max_examples=args.max_examples, seed=0, **_file_options(args))
        sources[t.name] = t
    from ..adapt import run_adapt
    from ..api import open_bank
    from ..bank import locked
    from ..distributed import global_rank, rank_failure

    rank = global_rank(parallel.devices) if parallel.distributed else 0
    writer = rank == 0  # on several processes every rank adapts and scores its share; rank zero alone writes
    log = None if args.json or not writer else (lambda msg: print(msg, flush=True))
    with locked(args.bank) if args.keep and writer else contextlib.nullcontext():
        bank, scorer = open_bank(args.bank)
        keep = args.keep and writer
        save = (lambda names: bank.save(args.bank, only=list(names))) if keep else None
        skills = _skills_router(args, bank, methods)
        from ..skills.core import router_dir

        save_router = (lambda name, r: r.save(router_dir(args.bank, name))) if keep else None
        with rank_failure(parallel, rank, f"The report {args.out or '(no --out)'}", "mtpeft adapt",
                          again="the runs finished before the failure are in the report (with --out); the same "
                                "`mtpeft adapt --out` command resumes after them (on any number of processes)"):
            report = run_adapt(bank, scorer, task, shots, methods, seeds, budget, experts=experts,
                               source_tasks=sources, out=args.out, keep=args.keep, max_examples=args.max_examples,
                               log=log, save=save, skills=skills, save_router=save_router, parallel=parallel,
                               writer=writer)
    if not writer:
        return
    report["bank"] = str(args.bank)
    rows = table_rows(report)
    emit(args, report, rows, ["method", "params", *[f"{k} shots" for k in report["shots"]]],
         title=f"few-shot transfer to {task.name} from {len(report['experts'])} experts of {args.bank}: test accuracy "
         f"({report['test_n']} examples), mean ± std over seeds {','.join(map(str, report['seeds']))}")
    if not args.json:
        for line in similarity_lines(report, args.out):
            print(line)


def similarity_lines(report: dict, out: Path | None) -> list[str]:
    """The Fisher similarity of each expert to the target, per draw of the shots, and where the heatmaps are."""
    from ..display import printable

    lines = []
    for tag, sim in report["similarity"].items():
        row = sim["matrix"][-1][:-1]
        pairs = sorted(zip(sim["names"][:-1], row), key=lambda p: -p[1])
        lines.append(f"Fisher similarity to the target ({tag}): " + ", ".join(f"{printable(n)} {v:.3f}"
                                                                             for n, v in pairs))
    if out is not None and report["similarity"]:
        lines.append(f"heatmaps: {out}/similarity-*.png; report: {out}/adapt-report.json")
    return lines


def table_rows(report: dict) -> list[dict]:
    rows = []
    for m in report["methods"]:
        row = {"method": m}
        for r in report["summary"]:
            if r["method"] == m:
                row[f"{r['shots']} shots"] = f"{r['mean']:.3f} ± {r['std']:.3f}"
                row["params"] = r["trainable"]
        rows.append(row)
    for b in ("zero_shot", "majority"):
        v = report["baselines"][b]
        rows.append({"method": b.replace("_", "-"), "params": 0, **{f"{k} shots": f"{v:.3f}" for k in report["shots"]}})
    return rows


def cmd_embed(args):
    from ..adapt.fisher import has_fisher, store_fisher
    from ..api import open_bank
    from ..bank import locked
    from ..suite import builtin_names, load_task

    _positive(args, "--batches", "--batch-size", "--max-examples", "--probe-steps", "--lr")
    _check_bank(args.bank)
    tasks = {}
    for spec in args.task_file:
        t = load_task(spec, max_examples=args.max_examples, seed=args.seed, **_file_options(args))
        tasks[t.name] = t
    rows = []
    with locked(args.bank):
        bank, scorer = open_bank(args.bank)
        names = [args.module] if args.module else [r.name for r in bank.records if r.task]
        if args.module:
            bank.index(args.module)
        if not names:
            raise MtpeftError(f"no module of {args.bank} names the task it was trained on; name one with --module "
                              "and its data with --task-file NAME=PATH")
        for n in names:
            tname = bank.record(n).task
            if has_fisher(bank, n) and not args.again:
                rows.append({"module": n, "task": tname, "status": "stored already (--again recomputes)"})
                continue
            task = tasks.get(tname)
            if task is None and tname in builtin_names():
                task = load_task(tname, max_examples=args.max_examples, seed=args.seed)
            if task is None:
                if args.module:
                    raise MtpeftError(f"module {n!r} was trained on {tname!r}, which is not built in; give its data: "
                                      f"--task-file {tname}=PATH")
                rows.append({"module": n, "task": tname, "status": f"skipped: no data (--task-file {tname}=PATH)"})
                continue
            emb = store_fisher(bank, scorer, task, n, steps=args.probe_steps, lr=args.lr, batch_size=args.batch_size,
                               max_batches=args.batches, seed=args.seed)
            bank.save(args.bank, only=[n])
            rows.append({"module": n, "task": tname, "status": "stored", "size": emb.numel(),
                         "mean": float(emb.mean())})
    emit(args, {"bank": str(args.bank), "results": rows}, rows, ["module", "task", "status", "size", "mean"],
         title=f"Fisher embeddings in {args.bank}")


def add_parser(sub) -> None:
    s = sub.add_parser("adapt", help="few-shot transfer to a new task from a bank's experts: scratch, best-source, "
                       "lorahub, pi-tuning, ... at several shot counts and seeds",
                       description="For each shot count (examples per class, drawn with the seed) train each method on "
                       "those examples only and score the whole test split. The bank is left as it was unless --keep.")
    s.add_argument("--bank", required=True, type=Path, help="a bank of LoRA experts (or bottleneck adapters, for fusion) on other tasks")
    _task_args(s, multiple=False)
    s.add_argument("--shots", default="16,64,256", help="examples per class, comma-separated (default 16,64,256)")
    s.add_argument("--methods", default="scratch,best-source,lorahub,pi-tuning",
                   help="comma-separated (default scratch,best-source,lorahub,pi-tuning; on a bank with skills also "
                   "poly, mhr-z, mhr-mu)")
    s.add_argument("--seeds", default="0", help="comma-separated seeds of the shot draws and the fits (default 0)")
    s.add_argument("--experts", default=None, metavar="A,B,...",
                   help="the source experts (default: every LoRA expert of the bank trained on another task)")
    s.add_argument("--source-file", action="append", default=[], metavar="NAME=PATH",
                   help="an expert's task data, for its Fisher embedding when the bank has none stored and the task "
                   "is not built in (repeatable; or store them with `mtpeft embed`)")
    s.add_argument("--max-examples", type=int, default=None, help="cap every split of the tasks at N examples")
    s.add_argument("--max-steps", type=int, default=None, help="cap every fit (and probe) at N optimiser steps")
    s.add_argument("--steps", type=int, default=100, help="optimiser steps of each trained module (default 100)")
    s.add_argument("--lr", type=float, default=2e-3, help="learning rate of the trained modules (default 2e-3)")
    s.add_argument("--batch-size", type=int, default=16, help="default 16")
    s.add_argument("--lorahub-evals", type=int, default=40, help="nevergrad evaluations of LoraHub (default 40)")
    s.add_argument("--top-k", type=int, default=3, help="experts pi-tuning interpolates (default 3)")
    s.add_argument("--interp-steps", type=int, default=30,
                   help="steps training pi-tuning's interpolation weights before the fine-tune (default 30)")
    s.add_argument("--skills-name", default=None, metavar="NAME",
                   help="poly, mhr-z, mhr-mu: the skill inventory to adapt (its --name at training; default: the "
                   "bank's only one)")
    s.add_argument("--router-lr", type=float, default=0.1,
                   help="poly, mhr-z: learning rate of the new routing row (default 0.1; the skills use --lr)")
    s.add_argument("--probe-steps", type=int, default=20,
                   help="steps of the target's probe LoRA before its Fisher embedding (default 20)")
    s.add_argument("--fisher-batches", type=int, default=32,
                   help="batches of an expert's task data in a Fisher embedding computed here (default 32)")
    s.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write DIR/adapt-report.json (after every run: a stopped run resumes) and the similarity "
                   "heatmaps")
    s.add_argument("--keep", action="store_true",
                   help="keep each method's module (and computed Fisher embeddings) in the bank, saved")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parallel_args(s)
    s.set_defaults(func=cmd_adapt)

    e = sub.add_parser("embed", help="store each expert's Fisher task embedding in the bank (for pi-tuning)",
                       description="Each module's task embedding: a probe module of its configuration, from one fixed "
                       "initialisation for every task, trained --probe-steps on the task's training data (built-in "
                       "tasks by the module's task name, others from --task-file), then the diagonal Fisher information "
                       "of its parameters; stored as the module's 'task-fisher' artifact. Give the probe the settings "
                       "`mtpeft adapt` will use (--probe-steps, --lr, --batch-size), so the target's probe matches.")
    e.add_argument("--bank", required=True, type=Path, help="bank directory (updated in place)")
    e.add_argument("--task-file", action="append", default=[], metavar="NAME=PATH",
                   help="the data of a module's task that is not built in (repeatable)")
    e.add_argument("--module", default=None, help="one module (default: every module that names its task)")
    e.add_argument("--batches", type=int, default=32, help="batches of the task's training data (default 32)")
    e.add_argument("--probe-steps", type=int, default=20, help="the probe's training steps (default 20)")
    e.add_argument("--lr", type=float, default=2e-3, help="the probe's learning rate (default 2e-3)")
    e.add_argument("--batch-size", type=int, default=16, help="default 16")
    e.add_argument("--max-examples", type=int, default=None, help="cap every split of the tasks at N examples")
    e.add_argument("--seed", type=int, default=0, help="the shuffle of the batches (default 0)")
    e.add_argument("--again", action="store_true", help="recompute embeddings already stored")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    g = e.add_argument_group("task files", "how every --task-file is read")
    g.add_argument("--text-column", default="text", metavar="NAME")
    g.add_argument("--label-column", default="label", metavar="NAME")
    g.add_argument("--label-names", default=None, metavar="A,B,...")
    g.add_argument("--val-frac", type=float, default=0.1, metavar="F")
    g.add_argument("--test-frac", type=float, default=0.2, metavar="F")
    g.add_argument("--max-labels", type=int, default=1000, metavar="N")
    e.set_defaults(func=cmd_embed)
