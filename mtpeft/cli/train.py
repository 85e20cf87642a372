"""`mtpeft train`: a new module per task (or one shared multitask module) into a bank."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MtpeftError
from .common import _common, _load_tasks, _task_args, emit

# A run file for `mtpeft train --config`: these keys, each also a flag; the flag wins when both are given.
TRAIN_DEFAULTS = {"backbone": "minilm", "module": "lora", "options": {}, "tasks": [], "task_files": [],
                  "max_examples": None, "seed": 0, "multitask": False, "sampling": "proportional", "lr": 1e-3,
                  "batch_size": 16, "max_epochs": 3, "max_steps": -1, "patience": 2, "run_dir": None}
TRAIN_CONFIG_KEYS = tuple(TRAIN_DEFAULTS)


def load_run_config(path: str | Path) -> dict:
    """A run file (JSON, or YAML for .yaml/.yml) for `mtpeft train --config`, checked key by key."""
    from ..io import read_config

    conf = read_config(path, what="run config")
    if not isinstance(conf, dict):
        raise MtpeftError(f"run config {path} must hold a mapping (a JSON object / YAML mapping) with keys among "
                          f"{', '.join(TRAIN_CONFIG_KEYS)}")
    unknown = sorted(set(conf) - set(TRAIN_DEFAULTS))
    if unknown:
        raise MtpeftError(f"run config {path} has unknown key(s) {unknown}; known: {', '.join(TRAIN_CONFIG_KEYS)}")
    if not isinstance(conf.get("options", {}), dict):
        raise MtpeftError(f"run config {path}: 'options' must be a mapping, e.g. {{\"r\": 8}}")
    for key in ("tasks", "task_files"):
        v = conf.get(key, [])
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise MtpeftError(f"run config {path}: {key!r} must be a list of strings")
    if conf.get("run_dir") is not None and not isinstance(conf["run_dir"], str):
        raise MtpeftError(f"run config {path}: 'run_dir' must be a directory path (a string), "
                          f"got {conf['run_dir']!r}")
    return conf


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
    checks = [("--lr", args.lr, args.lr > 0, "a positive learning rate, e.g. --lr 1e-3"),
              ("--batch-size", args.batch_size, args.batch_size >= 1, "a positive integer, e.g. --batch-size 16"),
              ("--max-epochs", args.max_epochs, args.max_epochs >= 1 or (args.max_epochs == -1 and args.max_steps >= 1),
               "a positive integer (or -1 with --max-steps), e.g. --max-epochs 3"),
              ("--max-steps", args.max_steps, args.max_steps == -1 or args.max_steps >= 1,
               "a positive integer, or -1 for no cap"),
              ("--patience", args.patience, args.patience >= 0, "an integer >= 0, e.g. --patience 2")]
    for flag, value, ok, want in checks:
        if not ok:
            raise MtpeftError(f"{flag} {value} is out of range; give {want}")
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise MtpeftError(f"--run-dir {run_dir} is a file, not a directory; give a directory for the fits' logs")


def cmd_train(args):
    from ..api import load_bank_or_new, parse_options
    from ..train import TrainConfig, evaluate, fit_expert, fit_multitask

    _apply_train_config(args)
    _check_train_args(args)
    tasks = _load_tasks(args)
    if args.gate and args.multitask:
        raise MtpeftError("--gate gates one expert per task (PHATGOOSE); drop --multitask, or gate later with "
                          "`mtpeft gate --bank BANK --module NAME --task TASK`")
    if args.name and len(tasks) > 1 and not args.multitask:
        raise MtpeftError(f"--name names one module, but {len(tasks)} tasks each get their own expert; drop --name "
                          "(experts are named TASK-TYPE) or add --multitask for one shared module")
    config = parse_options(args.module, args.option)
    bank, scorer = load_bank_or_new(args.backbone, args.out)
    if args.multitask:
        names = [args.name or "multitask-" + args.module]
    else:
        names = [args.name if (args.name and len(tasks) == 1) else f"{t.name}-{args.module}" for t in tasks]
    for name in names:  # before any training, so a clash costs nothing
        if name in bank.names:
            raise MtpeftError(f"bank {args.out} already has a module named {name!r}; pass --name with another "
                              "name, or choose another --out")
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_epochs=args.max_epochs, max_steps=args.max_steps,
                      patience=args.patience, seed=args.seed, progress=not args.json,
                      run_dir=None if args.run_dir is None else str(args.run_dir))
    rows = []
    if args.multitask:
        (name,) = names
        m = fit_multitask(bank, scorer, tasks, name, args.module, config, cfg, sampling=args.sampling)
        for t in tasks:
            rows.append(dict(module=name, **evaluate(bank, scorer, t, name), steps=m["steps"]))
        per_task = {r["task"]: r["accuracy"] for r in rows}
        bank.record(name).metrics.update({"test_acc": sum(per_task.values()) / len(per_task),
                                          "test_acc_per_task": per_task})
    else:
        for t, name in zip(tasks, names):
            m = fit_expert(bank, scorer, t, name, args.module, config, cfg)
            res = evaluate(bank, scorer, t, name)
            bank.record(name).metrics.update({"test_acc": res["accuracy"], "test_n": res["n"]})
            rows.append(dict(module=name, **res, steps=m["steps"], train_seconds=m["train_seconds"]))
            if args.gate:  # PHATGOOSE gates and retrieval centroid of the new expert (cli/gate.py)
                from ..gates import CENTROID_EXAMPLES, GATE_LR, GATE_STEPS
                from .gate import gate_rows

                g = gate_rows(bank, scorer, [(t, name)], cfg, GATE_STEPS, GATE_LR, CENTROID_EXAMPLES)
                rows[-1]["gate_val_acc"] = g[0]["val_acc"]
            bank.save(args.out, only=[name])  # each expert lands on disk as soon as it is trained
    bank.save(args.out)
    obj = {"bank": str(args.out), "results": rows}
    if args.run_dir is not None:
        obj["run_dir"] = str(args.run_dir)
    emit(args, obj, rows,
         ["module", "task", "n", "accuracy", "majority", "steps"], title=f"trained into {args.out}")



def add_parser(sub) -> None:
    s = sub.add_parser("train", help="train a new module per task (or one shared multitask module) into a bank")
    _task_args(s)
    _common(s, from_config=True)
    s.add_argument("--config", type=Path, default=None,
                   help="a JSON run file (see configs/): any of " + ", ".join(TRAIN_CONFIG_KEYS)
                   + "; flags given on the command line win")
    s.add_argument("--module", default=None, help="module type (lora, ia3, prompt, ptuning, prefix, houlsby, ...)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a module config option, e.g. --option r=16 (repeatable; values parsed as JSON)")
    s.add_argument("--out", required=True, type=Path, help="bank directory (created, or added to)")
    s.add_argument("--name", default=None, help="module name (default TASK-TYPE)")
    s.add_argument("--multitask", action="store_true", default=None, help="one shared module over the task mixture")
    s.add_argument("--sampling", default=None, choices=["proportional", "temperature", "uniform"])
    s.add_argument("--lr", type=float, default=None, help="default 1e-3")
    s.add_argument("--batch-size", type=int, default=None, help="default 16")
    s.add_argument("--max-epochs", type=int, default=None, help="default 3")
    s.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps (default -1: none)")
    s.add_argument("--patience", type=int, default=None, help="early-stopping patience in validations (default 2)")
    s.add_argument("--run-dir", type=Path, default=None, metavar="DIR",
                   help="write each fit's training curves (Lightning's CSV logger: metrics.csv with train/loss "
                   "per step, val/acc and val/loss per validation, hparams.yaml) to DIR/<module name>/ "
                   "(default: no logs)")
    s.add_argument("--gate", action="store_true",
                   help="after training each expert, train its PHATGOOSE gates and compute its retrieval centroid "
                   "(as `mtpeft gate`: 100 steps, lr 5e-3), for `mtpeft route`")
    s.set_defaults(func=cmd_train)
