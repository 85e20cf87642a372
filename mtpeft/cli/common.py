"""What every subcommand shares: output tables, task arguments, common flags."""
from __future__ import annotations

import json

from ..errors import MtpeftError


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
    from ..suite import load_task

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


def _module_for_task(bank, task: str) -> str:
    """Task-id routing: the module trained on ``task``, else the last multitask module trained on it."""
    try:
        return bank.names[bank.task_index(task)]
    except MtpeftError as e:
        for r in reversed(bank.records):
            if task in ((r.metadata or {}).get("tasks") or []):
                return r.name
        raise MtpeftError(f"{e}; name the module to evaluate with --module (modules: {', '.join(bank.names)})") from e
