"""`mtpeft distil`: multitask prompt tuning (MPT) from a config: teachers, the distilled student, the target stage."""
from __future__ import annotations

from pathlib import Path

from ..errors import MtpeftError
from .common import emit, parallel_args

DEFAULT_CONFIG = "configs/mpt-distil.yaml"


def _positive(flag: str, v) -> None:
    if v is not None and v < 1:
        raise MtpeftError(f"{flag} {v} is out of range; give a positive integer, e.g. {flag} 100")


def cmd_distil(args):
    from ..io import check_writable_dir
    from ..mpt.config import load_distil_config
    from ..mpt.run import run_distil
    from ..train import default_threads

    _positive("--max-steps", args.max_steps)
    _positive("--max-examples", args.max_examples)
    from ..distributed import global_rank, rank_failure

    cfg = load_distil_config(args.config)
    if args.backbone is not None:
        cfg.backbone = args.backbone
    for k in ("devices", "num_nodes", "strategy", "accelerator"):  # the flags win over the config
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    parallel = cfg.parallel()  # fsdp refused, every budget's global batch split evenly over the ranks
    rank = global_rank(parallel.devices) if parallel.distributed else 0
    check_writable_dir(args.out, "--out")
    default_threads()
    with rank_failure(parallel, rank, f"The bank {args.out}", "mtpeft distil",
                      again="every stage finished before the failure (teachers, student, baselines, targets) is "
                            "kept; the same `mtpeft distil` command finishes the run (on any number of processes)"):
        report = run_distil(cfg, args.out, targets=args.target, max_steps=args.max_steps,
                            max_examples=args.max_examples, progress=not args.json and rank == 0,
                            writer=rank == 0)
    if rank != 0:
        return
    rows = [{**r, "kind": "source"} for r in report["sources"]]
    rows += [{"task": r["task"], "kind": f"target ({r['init']})", "student": r["mpt"],
              "prompt_eq": r["prompt_scratch"]} for r in report["targets"]]
    p, s = report["parameters"], report["summary"]
    title = (f"distilled into {args.out}: student {s['student_mean']} vs teachers {s['teacher_mean']} "
             f"(ratio {s['student_over_teacher']}); per task {p['student_per_task']} parameters "
             f"({100 * p['student_share']:.4f}% of the backbone) vs a teacher's {p['teacher_per_task']}")
    emit(args, report, rows, ["task", "kind", "teacher", "student", "prompt_eq"], title=title)


def add_parser(sub) -> None:
    s = sub.add_parser("distil", help="multitask prompt tuning: distil task prompts into one shared prompt and "
                       "task factors (MPT); --target adapts it to a new task")
    s.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                   help=f"the run's config (YAML or JSON; default {DEFAULT_CONFIG}): sources, targets, budgets, "
                   "loss weights, rank, prompt length")
    s.add_argument("--out", type=Path, required=True, help="bank directory (created, or continued)")
    s.add_argument("--target", action="append", default=None, metavar="NAME",
                   help="a held-out task for the target stage (repeatable; default: the config's targets)")
    s.add_argument("--backbone", default=None, help="override the config's backbone")
    s.add_argument("--max-examples", type=int, default=None, help="cap every split at N examples (quick runs)")
    s.add_argument("--max-steps", type=int, default=None, help="cap every per-task fit (teachers, baselines, target stage) at N optimiser "
                   "steps, and the student, which trains every source in one fit, at N per source")
    s.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parallel_args(s, unset=True)  # None: the config's devices, num_nodes, strategy, accelerator (or 1, 1, auto, auto)
    s.set_defaults(func=cmd_distil)
