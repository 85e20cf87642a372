"""`mtpeft bank ls|show|export|rm|import`: inspect and move banks."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MtpeftError
from .common import comma_list, emit


def cmd_bank_ls(args):
    from ..bank.manifest import read_manifest_json  # every field checked, and no torch: `bank ls` stays quick

    m = read_manifest_json(args.bank)
    rows = [{"name": e["name"], "type": e["type"], "task": e.get("task"), "merged": e.get("merged", False),
             "test_acc": (e.get("metrics") or {}).get("test_acc")} for e in m["modules"]]
    emit(args, {"bank": str(args.bank), "backbone": m["backbone"].get("name"), "modules": rows}, rows,
         ["name", "type", "task", "merged", "test_acc"], title=f"bank {args.bank} on {m['backbone'].get('name')}")


def cmd_bank_show(args):
    from ..bank import read_manifest
    from ..io import read_tensors

    m = read_manifest(args.bank)
    entry = next((e for e in m["modules"] if e["name"] == args.module), None)
    if entry is None:
        raise MtpeftError(f"no module {args.module!r} in {args.bank}; it has: {', '.join(e['name'] for e in m['modules'])}")
    tensors = read_tensors(Path(args.bank) / entry["file"])
    entry = dict(entry, num_parameters=int(sum(t.numel() for t in tensors.values())), num_tensors=len(tensors))
    if args.json:
        print(json.dumps(entry, indent=2))
        return
    from ..display import printable

    for k in ("name", "type", "task", "merged", "num_parameters", "num_tensors", "file"):
        print(f"{k:15s} {printable(entry.get(k))}")
    print(f"{'config':15s} {json.dumps(entry['config'])}")
    print(f"{'metrics':15s} {json.dumps(entry.get('metrics', {}))}")
    if entry.get("metadata"):
        print(f"{'metadata':15s} {json.dumps(entry['metadata'])}")


def cmd_bank_export(args):
    from ..api import open_bank
    from ..interop import export_peft

    names = comma_list(args.module, "MODULE")
    bank, _ = open_bank(args.bank)
    missing = [n for n in names if n not in bank.names]
    if missing:
        raise MtpeftError(f"no module {missing[0]!r} in {args.bank}; it has: {', '.join(bank.names)}")
    if bank.record(names[0]).type == "mpt":  # one group of MPT modules: one multitask prompt tuning adapter
        from ..mpt import export_peft_mpt

        order = export_peft_mpt(bank, names, args.dir)
        if args.json:
            print(json.dumps({"exported": order, "dir": str(args.dir), "peft_task_ids": order}))
        else:
            print(f"wrote peft multitask prompt tuning adapter {args.dir}; task ids: "
                  + ", ".join(f"{t}={n}" for t, n in enumerate(order)))
        return
    if len(names) > 1:
        raise MtpeftError(f"only MPT modules export together (as one multitask adapter); {names[0]!r} is of type "
                          f"{bank.record(names[0]).type!r}: export one module at a time")
    export_peft(bank, names[0], args.dir)
    print(json.dumps({"exported": names[0], "dir": str(args.dir)}) if args.json else f"wrote peft adapter {args.dir}")


def cmd_bank_rm(args):
    from ..bank import remove_saved_module  # under the bank's lock

    remove_saved_module(args.bank, args.module)
    print(json.dumps({"removed": args.module, "bank": str(args.bank)}) if args.json
          else f"removed {args.module} from {args.bank}")


def cmd_bank_import(args):
    from ..api import open_bank
    from ..bank import locked, read_manifest
    from ..interop import import_peft, read_adapter

    read_manifest(args.bank)  # not a bank: said before a lock file is left in the directory
    config, _ = read_adapter(args.dir)
    with locked(args.bank):
        bank, _ = open_bank(args.bank)
        if config.get("peft_type") == "MULTITASK_PROMPT_TUNING":
            name = _import_mpt(bank, args, config)
        else:
            name = import_peft(bank, args.dir, name=args.name, task=args.task)
        bank.save(args.bank)
    print(json.dumps({"imported": name, "bank": str(args.bank)}) if args.json
          else f"imported {', '.join(name) if isinstance(name, list) else name} into {args.bank}")


def _import_mpt(bank, args, config: dict) -> list[str]:
    """A multitask prompt tuning adapter: task id ``t`` becomes module ``names[t]`` (default ``<name>-t<t>``)."""
    from ..mpt import import_peft_mpt

    T = config.get("num_tasks")
    base = args.name or args.dir.resolve().name
    names = comma_list(args.names, "--names") if args.names else \
        [f"{base}-t{t}" for t in range(T)] if isinstance(T, int) and T > 0 else []
    tasks = comma_list(args.task, "--task") if args.task else None
    return import_peft_mpt(bank, args.dir, names, shared=args.shared or base, tasks=tasks)



def add_parser(sub) -> None:
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
    s = bank_cmd("export", "write a module as a peft adapter directory (lora, ia3, prompt; MPT modules of one group "
                 "together as one multitask prompt tuning adapter)", cmd_bank_export, "module", "dir")
    s.epilog = ("MODULE may be a comma-separated list of MPT modules of one group, e.g. a-mpt,b-mpt: peft's task id t "
                "is the t-th name (printed).")
    bank_cmd("rm", "remove a module from a bank (its weights file too)", cmd_bank_rm, "module")
    s = bank_cmd("import", "bring a peft adapter directory into a bank", cmd_bank_import, "dir")
    s.add_argument("--name", default=None, help="the module's name in the bank (default: the directory's name)")
    s.add_argument("--task", default=None, help="the task the adapter was trained on (for task-id routing); for a "
                   "multitask prompt tuning adapter, one task per task id, comma-separated")
    s.add_argument("--names", default=None, help="multitask prompt tuning adapters: the modules' names, one per peft "
                   "task id, comma-separated (default: NAME-t0, NAME-t1, ...)")
    s.add_argument("--shared", default=None, help="multitask prompt tuning adapters: the name of the imported shared "
                   "prompt P* (default: NAME); it must not be one the bank has")
