"""The ``mtpeft`` command. Reporting subcommands print a table, or one JSON object with --json."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .io import MtpeftError


# ---- output helpers ------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v))
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def emit(args, obj: dict, rows: list[dict], columns: list[str], title: str | None = None) -> None:
    if args.json:
        print(json.dumps(obj, indent=2))
    else:
        if title:
            print(title)
        print(table(rows, columns))


def _task_args(p, multiple=True):
    p.add_argument("--task", action="append" if multiple else None, required=False,
                   help="a built-in task name (see `mtpeft tasks`)" + (" (repeatable)" if multiple else ""))
    p.add_argument("--task-file", action="append", default=[], metavar="NAME=PATH",
                   help="a user task from a CSV, JSONL or parquet file with columns text and label (repeatable)")


def _common(p, backbone=True, from_config=False):
    """``from_config``: defaults are None so a --config file can fill what the command line leaves out."""
    if backbone:
        p.add_argument("--backbone", default=None if from_config else "minilm",
                       help="minilm (default), smollm2, tiny-bert, tiny-llama or a local HF dir")
    p.add_argument("--max-examples", type=int, default=None, help="cap every split at N examples (quick runs)")
    p.add_argument("--seed", type=int, default=None if from_config else 0, help="default 0")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _load_tasks(args) -> list:
    from .suite import load_task

    specs = list(args.task or []) + list(args.task_file or [])
    if not specs:
        raise MtpeftError("name at least one task with --task NAME or --task-file NAME=PATH (see `mtpeft tasks`)")
    tasks = [load_task(s, max_examples=args.max_examples, seed=args.seed) for s in specs]
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise MtpeftError(f"the task name {t.name!r} is given twice; give each task its own name "
                              "(--task-file NAME=PATH)")
        seen.add(t.name)
    return tasks


# A run file for `mtpeft train --config`: these keys, each also a flag; the flag wins when both are given.
TRAIN_DEFAULTS = {"backbone": "minilm", "module": "lora", "options": {}, "tasks": [], "task_files": [],
                  "max_examples": None, "seed": 0, "multitask": False, "sampling": "proportional", "lr": 1e-3,
                  "batch_size": 16, "max_epochs": 3, "max_steps": -1, "patience": 2, "run_dir": None}
TRAIN_CONFIG_KEYS = tuple(TRAIN_DEFAULTS)


def load_run_config(path: str | Path) -> dict:
    """A run file (JSON, or YAML for .yaml/.yml) for `mtpeft train --config`, checked key by key."""
    from .io import read_config

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


def _module_for_task(bank, task: str) -> str:
    """Task-id routing: the module trained on ``task``, else the last multitask module trained on it."""
    try:
        return bank.names[bank.task_index(task)]
    except MtpeftError as e:
        for r in reversed(bank.records):
            if task in ((r.metadata or {}).get("tasks") or []):
                return r.name
        raise MtpeftError(f"{e}; name the module to evaluate with --module (modules: {', '.join(bank.names)})") from e


# ---- subcommands -----------------------------------------------------------------------------------
def cmd_tasks(args):
    from .suite import builtin_names, describe_builtin

    rows = [describe_builtin(n, seed=args.seed) for n in builtin_names()]
    for r in rows:
        r["labels"] = r.get("label_names")
        r["num_labels"] = len(r.get("label_names", []))
    emit(args, {"tasks": rows}, rows, ["name", "train", "validation", "test", "num_labels", "labels"])


def cmd_zero_shot(args):
    from .api import load_bank_or_new
    from .train import evaluate

    tasks = _load_tasks(args)  # before the backbone: a bad task file fails fast
    bank, scorer = load_bank_or_new(args.backbone)
    rows = []
    for t in tasks:
        r = evaluate(bank, scorer, t, None, split=args.split, progress=not args.json)
        rows.append(r)
    emit(args, {"backbone": args.backbone, "results": rows}, rows, ["task", "split", "n", "accuracy", "majority"],
         title=f"zero-shot accuracy of the bare {args.backbone} backbone")


def cmd_train(args):
    from .api import load_bank_or_new, parse_options
    from .train import TrainConfig, evaluate, fit_expert, fit_multitask

    _apply_train_config(args)
    _check_train_args(args)
    tasks = _load_tasks(args)
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
            bank.save(args.out, only=[name])  # each expert lands on disk as soon as it is trained
    bank.save(args.out)
    obj = {"bank": str(args.out), "results": rows}
    if args.run_dir is not None:
        obj["run_dir"] = str(args.run_dir)
    emit(args, obj, rows,
         ["module", "task", "n", "accuracy", "majority", "steps"], title=f"trained into {args.out}")


def cmd_eval(args):
    from .api import open_bank
    from .train import evaluate

    tasks = _load_tasks(args)
    bank, scorer = open_bank(args.bank)
    rows = []
    for t in tasks:
        module = args.module or _module_for_task(bank, t.name)
        rows.append(dict(module=module, **evaluate(bank, scorer, t, module, split=args.split, progress=not args.json)))
    emit(args, {"bank": str(args.bank), "results": rows}, rows, ["task", "module", "split", "n", "accuracy", "majority"])


def cmd_bank_ls(args):
    from .bank import read_manifest

    m = read_manifest(args.bank)
    rows = [{"name": e["name"], "type": e["type"], "task": e.get("task"), "merged": e.get("merged", False),
             "test_acc": (e.get("metrics") or {}).get("test_acc")} for e in m["modules"]]
    emit(args, {"bank": str(args.bank), "backbone": m["backbone"].get("name"), "modules": rows}, rows,
         ["name", "type", "task", "merged", "test_acc"], title=f"bank {args.bank} on {m['backbone'].get('name')}")


def cmd_bank_show(args):
    from .bank import read_manifest
    from .io import read_tensors

    m = read_manifest(args.bank)
    entry = next((e for e in m["modules"] if e["name"] == args.module), None)
    if entry is None:
        raise MtpeftError(f"no module {args.module!r} in {args.bank}; it has: {', '.join(e['name'] for e in m['modules'])}")
    tensors = read_tensors(Path(args.bank) / entry["file"])
    entry = dict(entry, num_parameters=int(sum(t.numel() for t in tensors.values())), num_tensors=len(tensors))
    if args.json:
        print(json.dumps(entry, indent=2))
        return
    for k in ("name", "type", "task", "merged", "num_parameters", "num_tensors", "file"):
        print(f"{k:15s} {entry.get(k)}")
    print(f"{'config':15s} {json.dumps(entry['config'])}")
    print(f"{'metrics':15s} {json.dumps(entry.get('metrics', {}))}")
    if entry.get("metadata"):
        print(f"{'metadata':15s} {json.dumps(entry['metadata'])}")


def cmd_bank_export(args):
    from .api import open_bank
    from .interop import export_peft

    bank, _ = open_bank(args.bank)
    export_peft(bank, args.module, args.dir)
    print(json.dumps({"exported": args.module, "dir": str(args.dir)}) if args.json else f"wrote peft adapter {args.dir}")


def cmd_bank_rm(args):
    from .bank import remove_saved_module

    remove_saved_module(args.bank, args.module)
    print(json.dumps({"removed": args.module, "bank": str(args.bank)}) if args.json
          else f"removed {args.module} from {args.bank}")


def cmd_bank_import(args):
    from .api import open_bank
    from .interop import import_peft

    bank, _ = open_bank(args.bank)
    name = import_peft(bank, args.dir, name=args.name, task=args.task)
    bank.save(args.bank)
    print(json.dumps({"imported": name, "bank": str(args.bank)}) if args.json else f"imported {name} into {args.bank}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtpeft", description=__doc__ or "mtpeft")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("tasks", help="list the built-in tasks with split sizes and label sets")
    _common(s, backbone=False)
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("zero-shot", help="accuracy of the bare backbone per task, beside the majority baseline")
    _task_args(s)
    _common(s)
    s.add_argument("--split", default="test", choices=["train", "validation", "test"])
    s.set_defaults(func=cmd_zero_shot)

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
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="accuracy of a bank's modules with task-id routing")
    s.add_argument("--bank", required=True, type=Path)
    _task_args(s)
    _common(s, backbone=False)
    s.add_argument("--module", default=None, help="module to route to (default: the one trained on the task)")
    s.add_argument("--split", default="test", choices=["train", "validation", "test"])
    s.set_defaults(func=cmd_eval)

    b = sub.add_parser("bank", help="inspect and move banks").add_subparsers(dest="bank_cmd", required=True)
    def bank_cmd(name, help, func, *positional):
        s = b.add_parser(name, help=help)
        s.add_argument("bank", type=Path)
        for arg in positional:
            s.add_argument(arg, type=Path if arg == "dir" else str)
        s.add_argument("--json", action="store_true", help="print one JSON object")
        s.set_defaults(func=func)
        return s

    bank_cmd("ls", "list the modules of a bank", cmd_bank_ls)
    bank_cmd("show", "details of one module", cmd_bank_show, "module")
    bank_cmd("export", "write a module as a peft adapter directory (lora, ia3, prompt)", cmd_bank_export,
             "module", "dir")
    bank_cmd("rm", "remove a module from a bank (its weights file too)", cmd_bank_rm, "module")
    s = bank_cmd("import", "bring a peft adapter directory into a bank", cmd_bank_import, "dir")
    s.add_argument("--name", default=None, help="the module's name in the bank (default: the directory's name)")
    s.add_argument("--task", default=None, help="the task the adapter was trained on (for task-id routing)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MtpeftError as e:
        print(f"mtpeft: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mtpeft tasks --json | head`: the reader left; say nothing more
        with contextlib.suppress(OSError, ValueError):  # so the interpreter's final flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
