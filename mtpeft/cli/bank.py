"""`mtpeft bank ls|show|export|rm|import`: inspect and move banks."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import MtpeftError
from .common import emit


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

    bank, _ = open_bank(args.bank)
    export_peft(bank, args.module, args.dir)
    print(json.dumps({"exported": args.module, "dir": str(args.dir)}) if args.json else f"wrote peft adapter {args.dir}")


def cmd_bank_rm(args):
    from ..bank import remove_saved_module  # under the bank's lock

    remove_saved_module(args.bank, args.module)
    print(json.dumps({"removed": args.module, "bank": str(args.bank)}) if args.json
          else f"removed {args.module} from {args.bank}")


def cmd_bank_import(args):
    from ..api import open_bank
    from ..bank import locked, read_manifest
    from ..interop import import_peft

    read_manifest(args.bank)  # not a bank: said before a lock file is left in the directory
    with locked(args.bank):
        bank, _ = open_bank(args.bank)
        name = import_peft(bank, args.dir, name=args.name, task=args.task)
        bank.save(args.bank)
    print(json.dumps({"imported": name, "bank": str(args.bank)}) if args.json else f"imported {name} into {args.bank}")



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
    bank_cmd("export", "write a module as a peft adapter directory (lora, ia3, prompt)", cmd_bank_export,
             "module", "dir")
    bank_cmd("rm", "remove a module from a bank (its weights file too)", cmd_bank_rm, "module")
    s = bank_cmd("import", "bring a peft adapter directory into a bank", cmd_bank_import, "dir")
    s.add_argument("--name", default=None, help="the module's name in the bank (default: the directory's name)")
    s.add_argument("--task", default=None, help="the task the adapter was trained on (for task-id routing)")
