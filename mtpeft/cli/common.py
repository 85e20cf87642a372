"""What every subcommand shares: output tables, task arguments, common flags."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import MtpeftError

_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


class Setting(NamedTuple):
    """One scalar setting, checked alike as a flag (``--max-steps``) and as a run-file key (``max_steps``).

    ``kind``: str, int (not bool, not 2.5), float (finite; an int, or a numeric string as YAML reads
    ``1e-3``) or bool (true/false only, not "no"); ``optional``: None allowed; ``ok``: the range check."""

    key: str
    kind: type
    optional: bool
    ok: Callable[[Any], bool] | None
    what: str
    example: str

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def check(self, value, where: str, eg: str):
        """``value`` as the setting takes it, or an MtpeftError naming ``where``, the value and what to give
        (``eg``: how an example is written there, ``"--lr "`` or ``"lr: "``)."""
        want = f"{self.what}, e.g. {eg}{self.example}"
        if value is None and self.optional:
            return None
        v = _as_kind(self.kind, value)
        if v is None:
            raise MtpeftError(f"{where} must be {self.what if self.kind in (str, Path) else _KIND_NAMES[self.kind]}, "
                              f"not {value!r}; give {want}")
        if self.kind is float and not math.isfinite(v):
            shown = f"{where} {value}" if where.startswith("--") else f"{where} = {value!r}"
            raise MtpeftError(f"{shown} is not a finite number; give {want}")
        if self.ok is not None and not self.ok(v):
            shown = f"{where} {value}" if where.startswith("--") else f"{where} = {value!r}"
            raise MtpeftError(f"{shown} is {'not accepted' if self.kind is str else 'out of range'}; give {want}")
        return v


def _as_kind(kind: type, value):
    """``value`` as ``kind``, or None when it is not one."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `lr: 1e-3` as the string "1e-3"
            try:
                return float(value.strip())
            except ValueError:
                return None
        return None
    if kind is Path:
        return Path(value) if isinstance(value, (str, os.PathLike)) and str(value) else None
    return value if isinstance(value, str) and value.strip() else None


# ---- output helpers ------------------------------------------------------------------------------
def comma_list(text: str | None, flag: str, convert=str) -> list | None:
    """``a,b,c`` -> ``[convert(a), ...]`` (None stays None); an empty item or one ``convert`` refuses is an error
    naming ``flag``."""
    if text is None:
        return None
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise MtpeftError(f"{flag} {text!r} has an empty item; give a comma-separated list, e.g. a,b")
    try:
        return [convert(x) for x in items]
    except ValueError:
        raise MtpeftError(f"{flag} {text!r}: every item must be a number, e.g. 0.5,0.5") from None


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows as aligned columns; floats to 3 decimals, control characters in names escaped."""
    from ..display import printable

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, (list, tuple)):
            return ", ".join(map(printable, v))
        return "" if v is None else printable(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def emit(args, obj: dict, rows: list[dict], columns: list[str], title: str | None = None) -> None:
    if args.json:
        print(json.dumps(obj, indent=2))
    else:
        if title:
            from ..display import printable

            print(printable(title))
        print(table(rows, columns))


def _task_args(p, multiple=True):
    p.add_argument("--task", action="append" if multiple else None, required=False,
                   help="a built-in task name (see `mtpeft tasks`)" + (" (repeatable)" if multiple else ""))
    p.add_argument("--task-file", action="append", default=[], metavar="NAME=PATH",
                   help="a user task from a CSV, JSONL or parquet file with columns text and label (repeatable)")
    g = p.add_argument_group("task files", "how every --task-file is read")
    g.add_argument("--text-column", default="text", metavar="NAME", help="the column of the inputs (default text)")
    g.add_argument("--label-column", default="label", metavar="NAME", help="the column of the labels (default label)")
    g.add_argument("--label-names", default=None, metavar="A,B,...",
                   help="the label names in index order (comma-separated, or a JSON list); integer labels index "
                   "them (default: the distinct labels, sorted)")
    g.add_argument("--val-frac", type=float, default=0.1, metavar="F",
                   help="share of a single file held out for validation (default 0.1)")
    g.add_argument("--test-frac", type=float, default=0.2, metavar="F",
                   help="share of a single file held out for test (default 0.2)")
    g.add_argument("--max-labels", type=int, default=1000, metavar="N",
                   help="the most distinct labels a task file may have (default 1000)")


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
    tasks = [load_task(s, max_examples=args.max_examples, seed=args.seed, **_file_options(args)) for s in specs]
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise MtpeftError(f"the task name {t.name!r} is given twice; give each task its own name "
                              "(--task-file NAME=PATH)")
        seen.add(t.name)
    return tasks


def _file_options(args) -> dict:
    """How --task-file files are read (mtpeft.tasks.load_task_file's arguments), from the flags."""
    names = args.label_names
    if names is not None:
        try:
            names = json.loads(names) if names.lstrip().startswith("[") else [n.strip() for n in names.split(",")]
        except json.JSONDecodeError as e:
            raise MtpeftError(f"--label-names {args.label_names!r} is not a JSON list ({e}); give A,B,C or "
                              '\'["A", "B"]\'') from e
        if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names) or "" in names:
            raise MtpeftError(f"--label-names {args.label_names!r} must name every label, e.g. --label-names neg,pos")
    for flag, v in (("--val-frac", args.val_frac), ("--test-frac", args.test_frac)):
        if not (math.isfinite(v) and 0 <= v < 1):
            raise MtpeftError(f"{flag} {v} is out of range; give a fraction in [0, 1), e.g. {flag} 0.1")
    return {"label_names": names, "text_column": args.text_column, "label_column": args.label_column,
            "val_frac": args.val_frac, "test_frac": args.test_frac, "max_labels": args.max_labels}


def _module_for_task(bank, task: str) -> str:
    """Task-id routing: the module trained on ``task``, else the last multitask module trained on it."""
    try:
        return bank.names[bank.task_index(task)]
    except MtpeftError as e:
        for r in reversed(bank.records):
            if task in ((r.metadata or {}).get("tasks") or []):
                return r.name
        raise MtpeftError(f"{e}; name the module to evaluate with --module (modules: {', '.join(bank.names)})") from e


def parallel_args(parser, strategy_flag: str = "--strategy", dest: str = "strategy", unset: bool = False) -> None:
    """The "processes and nodes" flags of a training command (Lightning DDP; docs/scale-out.md):
    ``--devices``, ``--num-nodes``, ``strategy_flag`` (into ``dest``) and ``--accelerator``. ``unset``: the
    defaults are None, for a command whose run file (``--config``) fills what the flags leave out."""
    from ..distributed import ACCELERATORS, STRATEGIES

    d = (lambda v: None) if unset else (lambda v: v)
    g = parser.add_argument_group("processes and nodes", "Lightning's DDP: every rank runs this same command "
                                  "(Lightning starts the local ones; torchrun or SLURM may start them all); each rank "
                                  "trains and evaluates its share, rank zero writes (docs/scale-out.md)")
    g.add_argument("--devices", type=int, default=d(1), metavar="N",
                   help="processes (CPU) or GPUs per node (default 1); the batch size stays the global batch, each "
                   "rank takes batch/(N x nodes)")
    g.add_argument("--num-nodes", type=int, default=d(1), metavar="M", help="nodes (default 1)")
    g.add_argument(strategy_flag, dest=dest, default=d("auto"), choices=STRATEGIES,
                   help="auto (default: DDP on several processes) or ddp; fsdp is refused (docs/scale-out.md)")
    g.add_argument("--accelerator", default=d("auto"), choices=ACCELERATORS,
                   help="auto (default), cpu, or gpu/cuda; DDP talks gloo on CPU, NCCL on GPUs")
