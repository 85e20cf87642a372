"""The run file of ``mtpeft continual --config``: read, checked key by key, with the defaults filled in.

Keys: ``backbone``; the stream (``stream: tweets | mixed``, or ``tasks: [...]`` of built-in names and
``NAME=PATH`` task files, and ``scenario``); ``strategy`` (what ``--strategy`` defaults to) and ``compare``
(what a bare ``--compare`` runs); ``strategies`` (options per strategy name); ``module`` and ``options``
(every module a strategy adds); ``memory`` (``capacity``, ``policy``); the caps ``max_train`` and
``max_eval`` (per task: the train split, the validation and test splits); the training budget ``lr``,
``batch_size``, ``max_epochs``, ``max_steps``, ``patience``; ``seeds``; where the fits run (``devices``,
``num_nodes``, ``dist_strategy``, ``accelerator``: Lightning DDP; a resumed run may change them).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

from ..distributed import ACCELERATORS
from ..errors import MtpeftError

DEFAULTS = {
    "backbone": "minilm", "stream": None, "tasks": [], "scenario": None,
    "strategy": "seqft", "compare": ["seqft", "replay", "expert-router", "joint"], "strategies": {},
    "module": "lora", "options": {}, "memory": {"capacity": 500, "policy": "task-balanced"},
    "max_train": 400, "max_eval": 200, "lr": 2e-3, "batch_size": 16, "max_epochs": 20, "max_steps": 60,
    "patience": 3, "seeds": [0],
    # where every fit runs (Lightning DDP, docs/scale-out.md); the --devices ... flags win over them
    "devices": 1, "num_nodes": 1, "dist_strategy": "auto", "accelerator": "auto",
}


def _int(v, lo: int, optional: bool = False) -> bool:
    return (optional and v is None) or (isinstance(v, int) and not isinstance(v, bool) and v >= lo)


CHECKS = {  # key: (valid?, what to give)
    "backbone": (lambda v: isinstance(v, str) and bool(v), "a backbone name, e.g. minilm"),
    "stream": (lambda v: v is None or isinstance(v, str), "a built-in stream name (tweets, mixed)"),
    "tasks": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
              "a list of task names or NAME=PATH files"),
    "scenario": (lambda v: v is None or isinstance(v, str), "task-il, domain-il or class-il"),
    "strategy": (lambda v: isinstance(v, str) and bool(v), "a strategy name, e.g. replay"),
    "compare": (lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
                "a list of strategy names"),
    "strategies": (lambda v: isinstance(v, dict) and all(isinstance(o, dict) for o in v.values()),
                   "a mapping strategy -> its options, e.g. {replay: {ratio: 0.5}}"),
    "module": (lambda v: isinstance(v, str) and bool(v), "a module type, e.g. lora"),
    "options": (lambda v: isinstance(v, dict), "a mapping of module options, e.g. {r: 8}"),
    "memory": (lambda v: isinstance(v, dict) and set(v) <= {"capacity", "policy"}
               and _int(v.get("capacity", 1), 1) and isinstance(v.get("policy", "reservoir"), str),
               "{capacity: a positive integer, policy: reservoir | task-balanced | class-balanced}"),
    "max_train": (lambda v: _int(v, 1, True), "a positive integer (or null: no cap)"),
    "max_eval": (lambda v: _int(v, 1, True), "a positive integer (or null: no cap)"),
    "lr": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
           "a positive learning rate, e.g. 2e-3"),
    "batch_size": (lambda v: _int(v, 1), "a positive integer"),
    "max_epochs": (lambda v: _int(v, 1), "a positive integer"),
    "max_steps": (lambda v: v == -1 or _int(v, 1), "a positive integer, or -1 for no cap"),
    "patience": (lambda v: _int(v, 0), "an integer >= 0"),
    "seeds": (lambda v: isinstance(v, list) and v and all(_int(s, 0) for s in v) and len(set(v)) == len(v),
              "a list of distinct integers >= 0, e.g. [0, 1, 2]"),
    "devices": (lambda v: _int(v, 1), "a positive integer (processes or GPUs per node), e.g. 2"),
    "num_nodes": (lambda v: _int(v, 1), "a positive integer, e.g. 1"),
    "dist_strategy": (lambda v: v in ("auto", "ddp"), "auto or ddp (fsdp is refused, docs/scale-out.md)"),
    "accelerator": (lambda v: v in ACCELERATORS, "one of " + ", ".join(ACCELERATORS)),
}


def check_config(conf: dict, where: str = "continual config") -> dict:
    """``conf`` with the defaults filled in, every key checked; a clear error naming the key and the fix."""
    if not isinstance(conf, dict):
        raise MtpeftError(f"{where} must hold a mapping with keys among {', '.join(DEFAULTS)}")
    unknown = sorted(set(conf) - set(DEFAULTS), key=str)
    if unknown:
        raise MtpeftError(f"{where} has unknown key(s) {unknown}; known: {', '.join(DEFAULTS)}")
    out = copy.deepcopy(DEFAULTS)
    out.update(copy.deepcopy(conf))
    if isinstance(out.get("memory"), dict):
        out["memory"] = {**DEFAULTS["memory"], **out["memory"]}
    for key, (ok, what) in CHECKS.items():
        try:
            good = ok(out[key])
        except TypeError:
            good = False
        if not good:
            raise MtpeftError(f"{where}: {key!r} is {out[key]!r}; give {what}")
    from ..api import _finite

    for k, v in out["options"].items():
        if not _finite(v):
            raise MtpeftError(f"{where}: options.{k} = {v!r} is not a finite number; give a finite value")
    for s, opts in out["strategies"].items():
        for k, v in opts.items():
            if not _finite(v):
                raise MtpeftError(f"{where}: strategies.{s}.{k} = {v!r} is not a finite number")
    return out


def load_config(path: str | Path) -> dict:
    from ..io import read_config

    return check_config(read_config(path, what="continual config"), f"continual config {path}")
