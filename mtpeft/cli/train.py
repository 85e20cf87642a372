"""`mtpeft train`: a new module per task (or one shared multitask module) into a bank."""
from __future__ import annotations

import json
from pathlib import Path

from ..distributed import ACCELERATORS, STRATEGIES
from ..errors import MtpeftError
from .common import Setting, _common, _load_tasks, _task_args, emit, parallel_args

# A run file for `mtpeft train --config`: these keys, each also a flag; the flag wins when both are given.
TRAIN_DEFAULTS = {"backbone": "minilm", "module": "lora", "options": {}, "tasks": [], "task_files": [],
                  "max_examples": None, "seed": 0, "multitask": False, "sampling": "proportional", "lr": 1e-3,
                  "batch_size": 16, "max_epochs": 3, "max_steps": -1, "patience": 2, "run_dir": None,
                  "router": None, "skills": 8, "splits": None, "router_lr": 0.1, "shared_routing": False,
                  "devices": 1, "num_nodes": 1, "strategy": "auto", "accelerator": "auto"}
TRAIN_CONFIG_KEYS = tuple(TRAIN_DEFAULTS)
SAMPLINGS = ("proportional", "temperature", "uniform")
SKILL_ROUTERS = ("poly", "mhr")

# The type and range of every scalar setting, for its flag and its run-file key alike:
# (key, kind, optional, ok, what to give, an example value).
SETTINGS = tuple(Setting(*row) for row in (
    ("backbone", str, False, None, "a backbone name or a local HF directory", "minilm"),
    ("module", str, False, None, "a module type", "lora"),
    ("max_examples", int, True, lambda v: v >= 1, "a positive integer (or none: no cap)", "400"),
    ("seed", int, False, None, "an integer", "0"),
    ("multitask", bool, False, None, "true or false", "true"),
    ("sampling", str, False, lambda v: v in SAMPLINGS, "one of " + ", ".join(SAMPLINGS), "temperature"),
    ("lr", float, False, lambda v: v > 0, "a positive learning rate", "1e-3"),
    ("batch_size", int, False, lambda v: v >= 1, "a positive integer", "16"),
    ("max_epochs", int, False, lambda v: v >= 1 or v == -1, "a positive integer (or -1 with --max-steps)", "3"),
    ("max_steps", int, False, lambda v: v == -1 or v >= 1, "a positive integer, or -1 for no cap", "100"),
    ("patience", int, False, lambda v: v >= 0, "an integer >= 0", "2"),
    ("run_dir", Path, True, None, "a directory path", "runs/first"),
    ("router", str, True, lambda v: v in SKILL_ROUTERS, "one of " + ", ".join(SKILL_ROUTERS), "poly"),
    ("skills", int, False, lambda v: v >= 1, "a positive number of skill modules", "8"),
    ("splits", int, True, lambda v: v >= 1, "a positive integer (MHR: at least 2)", "4"),
    ("router_lr", float, False, lambda v: v > 0, "a positive learning rate", "0.1"),
    ("shared_routing", bool, False, None, "true or false", "true"),
    ("devices", int, False, lambda v: v >= 1, "a positive integer (processes per node)", "2"),
    ("num_nodes", int, False, lambda v: v >= 1, "a positive integer (nodes)", "1"),
    ("strategy", str, False, lambda v: v in STRATEGIES, "one of " + ", ".join(STRATEGIES), "ddp"),
    ("accelerator", str, False, lambda v: v in ACCELERATORS, "one of " + ", ".join(ACCELERATORS), "cpu"),
))


def load_run_config(path: str | Path) -> dict:
    """A run file (JSON, or YAML for .yaml/.yml) for `mtpeft train --config`, checked key by key against
    the same types and ranges as the flags (``SETTINGS``); returns the values as the flags would give them."""
    from ..io import read_config

    conf = read_config(path, what="run config")
    if not isinstance(conf, dict):
        raise MtpeftError(f"run config {path} must hold a mapping (a JSON object / YAML mapping) with keys among "
                          f"{', '.join(TRAIN_CONFIG_KEYS)}")
    unknown = sorted(set(conf) - set(TRAIN_DEFAULTS), key=str)
    if unknown:
        raise MtpeftError(f"run config {path} has unknown key(s) {unknown}; known: {', '.join(TRAIN_CONFIG_KEYS)}")
    if not isinstance(conf.get("options", {}), dict) or not all(isinstance(k, str) for k in conf.get("options", {})):
        raise MtpeftError(f"run config {path}: 'options' must be a mapping of option names to values, "
                          'e.g. {"r": 8}')
    for key in ("tasks", "task_files"):
        v = conf.get(key, [])
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise MtpeftError(f"run config {path}: {key!r} must be a list of strings")
    from ..api import _finite

    for k, v in conf.get("options", {}).items():
        if not _finite(v):
            raise MtpeftError(f"run config {path}: options.{k} = {v!r} is not a finite number; give a finite "
                              "value, e.g. 0.5")
    out = dict(conf)
    for s in SETTINGS:
        if s.key in conf:
            out[s.key] = s.check(conf[s.key], f"run config {path}: {s.key!r}", f"{s.key}: ")
    return out


def _apply_train_config(args) -> None:
    """Fill ``args`` from --config then the defaults, for every setting not given on the command line."""
    conf = load_run_config(args.config) if args.config is not None else {}
    for key, default in TRAIN_DEFAULTS.items():
        if key not in ("options", "tasks", "task_files") and getattr(args, key) is None:  # not given as a flag
            setattr(args, key, conf.get(key, default))
    # options: the file's (when its module type is the one trained), then each --option KEY=VALUE over them
    file_options = conf.get("options", {}) if args.module == conf.get("module", TRAIN_DEFAULTS["module"]) else {}
    args.option = [f"{k}={json.dumps(v)}" for k, v in file_options.items()] + list(args.option)
    # tasks: the flags', else the file's
    if not args.task and not args.task_file:
        args.task = list(conf.get("tasks", []))
        args.task_file = list(conf.get("task_files", []))


def _check_train_args(args) -> None:
    """Every setting against ``SETTINGS`` (the flags' and the run file's values alike), then the pairs."""
    for s in SETTINGS:
        setattr(args, s.key, s.check(getattr(args, s.key), s.flag, s.flag + " "))
    if args.router is not None:
        from ..skills import check_kind

        if not args.multitask:
            raise MtpeftError(f"--router {args.router} trains skills shared by the tasks: add --multitask")
        if args.gate:
            raise MtpeftError("--gate gates one expert per task; it does not apply to skills (--router)")
        check_kind(args.router, args.splits)
    elif args.splits is not None or args.shared_routing:
        raise MtpeftError("--splits and --shared-routing set up skills routing: give --router poly or --router mhr")
    if args.max_epochs == -1 and args.max_steps == -1:
        raise MtpeftError("--max-epochs -1 trains without end unless --max-steps caps it; give a positive "
                          "--max-epochs (e.g. 3) or a --max-steps cap")
    _parallel(args).check_batch(args.batch_size)  # fsdp refused, the global batch split evenly over the ranks
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise MtpeftError(f"--run-dir {run_dir} is a file, not a directory; give a directory for the fits' logs")
    from ..io import check_writable_dir

    check_writable_dir(args.out, "--out")  # before the backbone loads and training runs, not at the final save
    if args.run_dir is not None:
        check_writable_dir(args.run_dir, "--run-dir")


def _parallel(args):
    from ..distributed import Parallel

    return Parallel(args.devices, args.num_nodes, args.strategy, args.accelerator)


def cmd_train(args):
    from ..api import check_bank_target, parse_options
    from ..bank import locked
    from ..distributed import global_rank, rank_failure

    _apply_train_config(args)
    _check_train_args(args)
    parallel = _parallel(args)
    rank = global_rank(args.devices) if parallel.distributed else 0
    tasks = _load_tasks(args)
    if args.gate and args.multitask:
        raise MtpeftError("--gate gates one expert per task (PHATGOOSE); drop --multitask, or gate later with "
                          "`mtpeft gate --bank BANK --module NAME --task TASK`")
    if getattr(args, "fisher", False) and args.multitask:
        raise MtpeftError("--fisher stores one expert's Fisher embedding per task; drop --multitask")
    if args.name and len(tasks) > 1 and not args.multitask:
        raise MtpeftError(f"--name names one module, but {len(tasks)} tasks each get their own expert; drop --name "
                          "(experts are named TASK-TYPE) or add --multitask for one shared module")
    config = parse_options(args.module, args.option)
    check_bank_target(args.out)
    if rank != 0:  # another rank of a distributed run: rank zero holds the lock and writes; this one follows
        with rank_failure(parallel, rank, f"The bank {args.out}", "mtpeft train"):
            _train_into(args, tasks, config, writer=False)
        return
    fresh = not Path(args.out).exists()
    with locked(args.out):  # one writer per bank for the whole run: a second `train --out` is refused up front
        try:
            with rank_failure(parallel, rank, f"The bank {args.out}", "mtpeft train"):
                _train_into(args, tasks, config)
        except BaseException:
            if fresh:
                _drop_if_only_locks(Path(args.out))
            raise


def _drop_if_only_locks(out: Path) -> None:
    """A run that created ``out`` and failed before anything was committed leaves no folder behind (only
    its lock files would be there; we still hold the lock, so nobody else is using them)."""
    import contextlib

    lock = ".mtpeft.lock"
    runs = out / "runs"
    if runs.is_dir() and not runs.is_symlink() and {p.name for p in runs.iterdir()} <= {lock}:
        with contextlib.suppress(OSError):
            (runs / lock).unlink(missing_ok=True)
            runs.rmdir()
    if {p.name for p in out.iterdir()} <= {lock}:
        with contextlib.suppress(OSError):
            (out / lock).unlink(missing_ok=True)
            out.rmdir()


def _train_into(args, tasks, config, writer: bool = True):
    """Train the run's modules. ``writer``: this process writes the bank and the run state (rank zero);
    the other ranks of a distributed run train alongside it, from the same bank and run state, and write
    nothing."""
    from ..api import check_input_room, load_bank_or_new
    from ..runstate import Run, RunView, run_config
    from ..train import TrainConfig

    bank, scorer = load_bank_or_new(args.backbone, args.out)
    check_input_room(bank, scorer, args.module, config)  # not after training has started
    if args.router is not None:
        from ..skills import skill_names

        names = skill_names(args.name or "skills", args.skills)
    elif args.multitask:
        names = [args.name or "multitask-" + args.module]
    else:
        names = [args.name if (args.name and len(tasks) == 1) else f"{t.name}-{args.module}" for t in tasks]
    state = Run if writer else RunView
    with state(args.out, run_config(args, tasks, config, names), resume=args.resume) as run:  # BANK/runs/
        for name in names:  # before any training, so a clash costs nothing
            if name in bank.names and not run.owns(name):
                raise MtpeftError(f"bank {args.out} already has a module named {name!r}; pass --name with another "
                                  "name, or choose another --out")
        run.begin(bank)  # a new run writes its state; a resumed one drops its unfinished module
        cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.max_epochs,
                          max_steps=args.max_steps, patience=args.patience, seed=args.seed, progress=True,
                          run_dir=None if args.run_dir is None else str(args.run_dir), **_parallel(args).fields())
        rows = _train_modules(args, bank, scorer, tasks, names, config, cfg, run, writer)
        obj = {"bank": str(args.out), "results": rows}
        if args.run_dir is not None:
            obj["run_dir"] = str(args.run_dir)
        run.close(obj)
    if not writer:
        return
    emit(args, obj, rows,
         ["module", "task", "n", "accuracy", "majority", "steps"], title=f"trained into {args.out}")


def _train_modules(args, bank, scorer, tasks, names, config, cfg, run, writer: bool = True) -> list[dict]:
    """Train (or, when ``run`` finished them before an interruption, skip) the run's modules; the rows.
    Every rank of a distributed run goes through the same steps (the fits and the evaluations are
    collective: each rank evaluates its shard of the test split); only the ``writer`` (rank zero) saves."""
    from ..faults import phase
    from ..train import evaluate, fit_expert, fit_multitask

    rows = []
    if args.router is not None:
        return _train_skills(args, bank, scorer, tasks, names, config, cfg, run, writer)
    if args.multitask:
        (name,) = names
        done = run.rows(name)
        if done is not None:
            return done
        phase("train", name)
        m = fit_multitask(bank, scorer, tasks, name, args.module, config, cfg, sampling=args.sampling)
        phase("evaluate", name)
        from ..distributed import eval_shard

        shard = eval_shard()
        for t in tasks:
            rows.append(dict(module=name, **evaluate(bank, scorer, t, name, shard=shard), steps=m["steps"]))
        per_task = {r["task"]: r["accuracy"] for r in rows}
        bank.record(name).metrics.update({"test_acc": round(sum(per_task.values()) / len(per_task), 6),
                                          "test_acc_per_task": per_task})
        if writer:
            phase("save", name)
            bank.save(args.out)
            run.finished(name, rows)
        return rows
    for t, name in zip(tasks, names):
        done = run.rows(name)
        if done is not None:  # finished before an interruption: in the bank with its recorded checksum
            rows += done
            continue
        phase("train", name)
        m = fit_expert(bank, scorer, t, name, args.module, config, cfg)
        phase("evaluate", name)
        from ..distributed import eval_shard

        shard = eval_shard()
        res = evaluate(bank, scorer, t, name, shard=shard)
        bank.record(name).metrics.update({"test_acc": res["accuracy"], "test_n": res["n"]})
        new = [dict(module=name, **res, steps=m["steps"], train_seconds=m["train_seconds"])]
        if args.gate:  # PHATGOOSE gates and retrieval centroid of the new expert (cli/gate.py)
            from ..gates import CENTROID_EXAMPLES, GATE_LR, GATE_STEPS
            from .gate import gate_rows

            phase("gate", name)
            g = gate_rows(bank, scorer, [(t, name)], cfg, GATE_STEPS, GATE_LR, CENTROID_EXAMPLES)
            new[-1]["gate_val_acc"] = g[0]["val_acc"]
        if getattr(args, "fisher", False):  # its Fisher task embedding (as `mtpeft embed`), for `mtpeft adapt`
            from ..adapt.fisher import store_fisher

            phase("fisher", name)
            store_fisher(bank, scorer, t, name, batch_size=args.batch_size, seed=args.seed,
                         parallel=_parallel(args))  # on every rank (the probe is a fit)
        if writer:
            phase("save", name)
            bank.save(args.out, only=[name])  # each expert lands on disk as soon as it is trained
            run.finished(name, new)
        rows += new
    if writer:
        phase("save")
        bank.save(args.out)
    return rows


def _train_skills(args, bank, scorer, tasks, names, config, cfg, run, writer: bool = True) -> list[dict]:
    """Poly/MHR: the skills and their routing trained together; the router saved in OUT/routers/NAME/ (by
    the ``writer``; on several processes every rank trains and evaluates its share)."""
    from ..distributed import eval_shard
    from ..faults import phase
    from ..skills import evaluate_skills, fit_skills, save_skills

    name = args.name or "skills"
    done = run.rows(names[0])
    if done is not None:
        return done
    phase("train", name)
    router, m = fit_skills(bank, scorer, tasks, args.router, args.skills, args.splits, args.module, config, cfg,
                           router_lr=args.router_lr, shared_routing=bool(args.shared_routing), name=name,
                           sampling=args.sampling)
    phase("evaluate", name)
    shard = eval_shard()
    rows = [dict(module=name, **evaluate_skills(bank, scorer, t, router, shard=shard), steps=m["steps"]) for t in tasks]
    per_task = {r["task"]: r["accuracy"] for r in rows}
    for n in names:
        bank.record(n).metrics.update({"test_acc": round(sum(per_task.values()) / len(per_task), 6),
                                       "test_acc_per_task": per_task})
    if writer:
        phase("save", name)
        bank.save(args.out)
        save_skills(router, args.out, name)
        run.finished(names[0], rows)
    return rows


def add_parser(sub) -> None:
    s = sub.add_parser("train", help="train a new module per task (or one shared multitask module) into a bank")
    _task_args(s)
    _common(s, from_config=True)
    s.add_argument("--config", type=Path, default=None,
                   help="a run file, YAML (.yaml/.yml) or JSON (see configs/): any of " + ", ".join(TRAIN_CONFIG_KEYS)
                   + "; flags given on the command line win")
    s.add_argument("--module", default=None, help="module type (lora, ia3, prompt, ptuning, prefix, houlsby, ...)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a module config option, e.g. --option r=16 (repeatable; values parsed as JSON)")
    s.add_argument("--out", required=True, type=Path, help="bank directory (created, or added to)")
    s.add_argument("--name", default=None, help="module name (default TASK-TYPE)")
    s.add_argument("--multitask", action="store_true", default=None, help="one shared module over the task mixture")
    s.add_argument("--sampling", default=None, choices=SAMPLINGS)
    s.add_argument("--lr", type=float, default=None, help="default 1e-3")
    s.add_argument("--batch-size", type=int, default=None, help="default 16")
    s.add_argument("--max-epochs", type=int, default=None, help="default 3")
    s.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps (default -1: none)")
    s.add_argument("--patience", type=int, default=None, help="early-stopping patience in validations (default 2)")
    s.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help="write each fit's training curves (Lightning's CSV logger: metrics.csv with train/loss "
                   "per step, val/acc and val/loss per validation, hparams.yaml) to DIR/<module name>/ "
                   "(default: no logs)")
    s.add_argument("--resume", action="store_true",
                   help="finish the bank's interrupted run (state in OUT/runs/): same settings required; "
                   "modules it finished are kept, the others trained again")
    s.add_argument("--router", default=None, choices=SKILL_ROUTERS,
                   help="with --multitask: train --skills skill modules shared by the tasks and a task-skill routing "
                   "matrix (poly: Polytropon; mhr: multi-head routing, --splits blocks per layer); the routing is "
                   "saved in OUT/routers/NAME/ with a heatmap OUT/NAME-routing.png (NAME: --name, default skills)")
    s.add_argument("--skills", type=int, default=None, help="number of skill modules with --router (default 8)")
    s.add_argument("--splits", type=int, default=None, help="MHR: blocks of each layer's width, each with its own "
                   "skill mixture (default 4; must divide the widths)")
    s.add_argument("--router-lr", type=float, default=None,
                   help="learning rate of the routing logits with --router (default 0.1; the skills use --lr)")
    s.add_argument("--shared-routing", action="store_true", default=None,
                   help="with --router: one routing matrix for every layer (default: one per layer)")
    s.add_argument("--gate", action="store_true",
                   help="after training each expert, train its PHATGOOSE gates and compute its retrieval centroid "
                   "(as `mtpeft gate`: 100 steps, lr 5e-3), for `mtpeft route`")
    s.add_argument("--fisher", action="store_true",
                   help="after training each expert, store its task's Fisher embedding (as `mtpeft embed` with its defaults: "
                   "a 20-step probe, 32 batches of --batch-size), "
                   "for `mtpeft adapt`'s pi-tuning and best-source")
    parallel_args(s, unset=True)  # None: the run file (--config) or the defaults fill them
    s.set_defaults(func=cmd_train)
