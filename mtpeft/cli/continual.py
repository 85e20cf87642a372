"""`mtpeft continual`: learn a stream of tasks one after another with one strategy, or compare several over
seeds; the run directory holds every state, the report (report.json, report.md) and the plots."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ..errors import MtpeftError
from .common import parallel_args


def _list(value: str, what: str, conv=str) -> list:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise MtpeftError(f"{what} is empty; give a comma-separated list, e.g. {what} 0,1,2")
    try:
        out = [conv(x) for x in items]
    except ValueError:
        raise MtpeftError(f"{what} {value!r}: every item must be {'an integer' if conv is int else 'a name'}") from None
    if len(set(out)) != len(out):
        raise MtpeftError(f"{what} {value!r} names an item twice")
    return out


def resolve(args) -> tuple[dict, list[str], list[int]]:
    """The config (the file's, then the flags over it), the strategies and the seeds of this command."""
    from ..continual.config import check_config, load_config

    conf = load_config(args.config) if args.config is not None else check_config({})
    over = {}
    if args.backbone is not None:
        over["backbone"] = args.backbone
    if args.max_examples is not None:
        if args.max_examples < 1:
            raise MtpeftError(f"--max-examples {args.max_examples} is out of range; give a positive integer")
        over["max_train"] = over["max_eval"] = args.max_examples
    if args.max_steps is not None:
        if args.max_steps < 1 and args.max_steps != -1:
            raise MtpeftError(f"--max-steps {args.max_steps} is out of range; give a positive integer or -1")
        over["max_steps"] = args.max_steps
    if args.stream is not None:
        over["stream"], over["tasks"] = args.stream, []
    if args.scenario is not None:
        over["scenario"] = args.scenario
    if args.module is not None:
        over["module"] = args.module
    seeds = _list(args.seeds, "--seeds", int) if args.seeds is not None else conf["seeds"]
    if any(s < 0 for s in seeds):
        raise MtpeftError(f"--seeds {args.seeds}: seeds are integers >= 0")
    over["seeds"] = seeds
    for k in ("devices", "num_nodes", "dist_strategy", "accelerator"):  # the flags win over the config
        if getattr(args, k, None) is not None:
            over[k] = getattr(args, k)
    conf = check_config({**conf, **over}, "the run's settings")
    if args.strategy is not None and args.compare is not None:
        raise MtpeftError("give --strategy NAME (one strategy) or --compare A,B,... (several), not both")
    if args.compare is not None:
        strategies = conf["compare"] if args.compare == "" else _list(args.compare, "--compare")
    else:
        strategies = [args.strategy or conf["strategy"]]
    from ..continual.strategies import STRATEGIES

    for s in strategies:
        STRATEGIES.get(s)
    if getattr(args, "local_adapt", False):
        conf = _with_local_adapt(conf, strategies)
    return conf, strategies, seeds


def _with_local_adapt(conf: dict, strategies: list[str]) -> dict:
    """--local-adapt: MbPA++ at test for every strategy of the run that takes it (the config's local_adapt
    options where it gives them, else the defaults)."""
    from ..continual.strategies import STRATEGIES

    takers = [s for s in strategies if STRATEGIES.get(s).local_adapt_ok]
    if not takers:
        able = ", ".join(n for n in STRATEGIES.names() if STRATEGIES.get(n).local_adapt_ok)
        raise MtpeftError(f"--local-adapt: none of {', '.join(strategies)} takes local adaptation; it needs a "
                          f"memory and one shared module: {able}")
    opts = {k: dict(v) for k, v in conf["strategies"].items()}
    for s in takers:
        opts.setdefault(s, {})
        if not opts[s].get("local_adapt"):
            opts[s]["local_adapt"] = True
    return {**conf, "strategies": opts}


def command_line(args) -> str:
    """The command that reproduces this run (the flags given, in a fixed order)."""
    parts = ["mtpeft", "continual"]
    for flag in ("config", "out", "strategy", "seeds", "stream", "scenario", "backbone", "module", "max_examples",
                 "max_steps"):
        v = getattr(args, flag)
        if v is not None:
            parts += ["--" + flag.replace("_", "-"), str(v)]
    if args.compare is not None:
        parts += ["--compare"] + ([args.compare] if args.compare else [])
    if getattr(args, "local_adapt", False):
        parts.append("--local-adapt")
    return " ".join(shlex.quote(p) for p in parts)


def cmd_continual(args):
    from ..continual.runner import run_continual
    from ..distributed import Parallel, global_rank, rank_failure
    from ..io import check_writable_dir
    from ..train import default_threads

    conf, strategies, seeds = resolve(args)
    parallel = Parallel(conf["devices"], conf["num_nodes"], conf["dist_strategy"], conf["accelerator"])
    parallel.check_batch(conf["batch_size"], "batch_size")
    rank = global_rank(parallel.devices) if parallel.distributed else 0
    check_writable_dir(args.out, "--out")
    default_threads()
    command = command_line(args)
    log = None if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    with rank_failure(parallel, rank, f"The run directory {args.out}", "mtpeft continual"):
        report = run_continual(conf, args.out, strategies, seeds, resume=args.resume, command=command,
                               progress=not args.json, log=log, parallel=parallel)
    if rank != 0:  # rank zero reports
        return
    if args.json:
        import json

        print(json.dumps(report, indent=2))
    else:
        from ..continual.report_md import summary_table

        print(summary_table(report))
        print(f"\nreport: {Path(args.out) / 'report.md'}; plots: {Path(args.out) / 'plots'}")


def add_parser(sub):
    p = sub.add_parser("continual", help="learn a stream of tasks in sequence; compare strategies over seeds",
                       description=__doc__)
    p.add_argument("--config", type=Path, default=None,
                   help="a run file (YAML/JSON; e.g. configs/continual-demo.yaml); flags override it")
    p.add_argument("--out", type=Path, required=True, help="the run directory (states, report, plots)")
    p.add_argument("--strategy", default=None,
                   help="one strategy: seqft, replay, expert-oracle, expert-router, olora, conpet-static, conpet-dynamic, joint "
                        "(default: the config's)")
    p.add_argument("--compare", nargs="?", const="", default=None, metavar="A,B,...",
                   help="several strategies, one table (a bare --compare: the config's list)")
    p.add_argument("--seeds", default=None, metavar="0,1,2", help="seeds (default: the config's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from each strategy's last finished task")
    p.add_argument("--stream", default=None, help="a built-in stream (tweets, mixed) instead of the config's")
    p.add_argument("--scenario", default=None, choices=["task-il", "domain-il", "class-il"],
                   help="the stream's scenario (default: the config's or the stream's)")
    p.add_argument("--backbone", default=None, help="minilm, smollm2, tiny-bert, ... (default: the config's)")
    p.add_argument("--module", default=None, help="the module type every strategy adds (default: the config's)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="cap every split of every task at N examples (overrides max_train and max_eval)")
    p.add_argument("--max-steps", type=int, default=None, help="training steps per task (overrides the config)")
    p.add_argument("--local-adapt", action="store_true",
                   help="MbPA++ local adaptation at test for the strategies that take it (replay, conpet-static): "
                        "a few steps on each input's memory neighbours, then the stored module back")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parallel_args(p, "--dist-strategy", "dist_strategy", unset=True)  # --strategy: the continual strategy; None:
    # the config's devices, num_nodes, dist_strategy, accelerator (or 1, 1, auto, auto)
    p.set_defaults(func=cmd_continual)
