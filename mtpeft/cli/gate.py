"""`mtpeft gate`: PHATGOOSE gates and retrieval centroids for experts already in a bank (imported ones too)."""
from __future__ import annotations

from pathlib import Path

from ..errors import MtpeftError
from .common import _load_tasks, _module_for_task, _task_args, emit, parallel_args


def _check_gate_args(args) -> None:
    for flag, value, ok, want in (("--steps", args.steps, args.steps >= 1, "a positive integer, e.g. --steps 100"),
                                  ("--lr", args.lr, args.lr > 0, "a positive learning rate, e.g. --lr 5e-3"),
                                  ("--batch-size", args.batch_size, args.batch_size >= 1, "e.g. --batch-size 16"),
                                  ("--centroid-examples", args.centroid_examples, args.centroid_examples >= 1,
                                   "a positive integer, e.g. --centroid-examples 256")):
        if not ok:
            raise MtpeftError(f"{flag} {value} is out of range; give {want}")
    if not (args.bank / "manifest.json").exists():
        raise MtpeftError(f"{args.bank} is not a bank (no manifest.json); train one with `mtpeft train ... --out "
                          f"{args.bank}` or import adapters with `mtpeft bank import`")


def _module_of(bank, task: str) -> str:
    try:
        return _module_for_task(bank, task)
    except MtpeftError:
        raise MtpeftError(f"no module of bank {bank.names} was trained on task {task!r}; name the module to gate on "
                          f"it with --module NAME (tasks in the bank: {sorted({r.task for r in bank.records if r.task})})"
                          ) from None


def gate_rows(bank, scorer, pairs, cfg, steps: int, lr: float, centroid_examples: int, save=None) -> list[dict]:
    """Gate each ``(task, module)`` and compute its centroid; ``save(name)`` after each (shared with train --gate)."""
    from ..gates import prepare_expert

    rows = []
    for task, name in pairs:
        out = prepare_expert(bank, scorer, task, name, cfg, steps=steps, lr=lr, centroid_examples=centroid_examples)
        rows.append({"module": name, "task": task.name, **out})
        if save is not None:
            save(name)
    return rows


def cmd_gate(args):
    from ..api import open_bank
    from ..train import TrainConfig

    _check_gate_args(args)
    tasks = _load_tasks(args)
    if args.module is not None and len(tasks) > 1:
        raise MtpeftError(f"--module names one module, but {len(tasks)} tasks are given; gate one task per "
                          "--module, or drop --module (each task's own module is gated)")
    bank, scorer = open_bank(args.bank)
    if args.module is not None:
        bank.index(args.module)  # an unknown module: the error lists the bank's modules
        pairs = [(tasks[0], args.module)]
    else:
        pairs = [(t, _module_of(bank, t.name)) for t in tasks]
    from ..distributed import Parallel, global_rank, rank_failure

    parallel = Parallel(args.devices, args.num_nodes, args.strategy, args.accelerator)
    parallel.check_batch(args.batch_size)
    rank = global_rank(args.devices) if parallel.distributed else 0
    cfg = TrainConfig(batch_size=args.batch_size, seed=args.seed, progress=not args.json and rank == 0,
                      run_dir=None if args.run_dir is None else str(args.run_dir), **parallel.fields())
    # every rank trains its share of each gate's batches; rank zero alone writes the bank (after each expert)
    save = (lambda name: bank.save(args.bank, only=[name])) if rank == 0 else None
    with rank_failure(parallel, rank, f"The bank {args.bank}", "mtpeft gate",
                      again="the experts gated before the failure are saved; `mtpeft gate` on the others (--module "
                            "or --task) finishes the run, on any number of processes"):
        rows = gate_rows(bank, scorer, pairs, cfg, args.steps, args.lr, args.centroid_examples, save=save)
    if rank != 0:
        return
    bank.save(args.bank)
    emit(args, {"bank": str(args.bank), "results": rows}, rows,
         ["module", "task", "sites", "steps", "val_acc", "centroid_n", "train_seconds"], title=f"gated in {args.bank}")


def add_parser(sub) -> None:
    s = sub.add_parser("gate", help="train PHATGOOSE gates and compute retrieval centroids of experts in a bank",
                       description="Train each expert's PHATGOOSE gate vectors on its task's data (the expert and the "
                       "backbone frozen) and store the mean backbone embedding of its training inputs (retrieval); "
                       "both are saved with the bank, for `mtpeft route`.")
    s.add_argument("--bank", required=True, type=Path, help="bank directory (updated in place)")
    _task_args(s)
    s.add_argument("--module", default=None,
                   help="the module to gate on --task (default: the module trained on the task); any module of the "
                   "bank, imported ones included")
    s.add_argument("--steps", type=int, default=100, help="gate training steps (default 100)")
    s.add_argument("--lr", type=float, default=5e-3, help="gate learning rate, AdamW, no weight decay (default 5e-3)")
    s.add_argument("--batch-size", type=int, default=16, help="default 16")
    s.add_argument("--centroid-examples", type=int, default=256,
                   help="training inputs averaged into the retrieval centroid (default 256)")
    s.add_argument("--max-examples", type=int, default=None, help="cap every split at N examples (quick runs)")
    s.add_argument("--seed", type=int, default=0, help="default 0")
    s.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help="write each gate fit's training curves to DIR/<module>.gates/ (default: no logs)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parallel_args(s)
    s.set_defaults(func=cmd_gate)
