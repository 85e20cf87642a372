"""The config of ``mtpeft distil`` (configs/mpt-distil.yaml), checked key by key.

Top level: ``backbone``, ``sources`` (tasks distilled into the student), ``targets`` (held-out tasks for the
target stage), ``max_examples``, ``seed``, ``max_length`` (input tokens kept by the scorer), ``n_tokens``, ``rank``, ``shared`` (the shared prompt's name),
``shared_init`` (``teachers``: the mean of the teachers' prompts; ``random``), ``sampling`` (the source
mixture), ``baseline`` (also train single-task prompts at the student's and the target's budgets), where the
fits run (``devices``, ``num_nodes``, ``strategy``, ``accelerator``: Lightning DDP, docs/scale-out.md), and the
sections ``teacher``, ``student``, ``target`` (budgets: ``lr``, ``batch_size``, ``max_epochs``,
``max_steps``, ``patience``; ``target`` also ``init`` and ``tune_shared``) and ``loss`` (``task``, ``kl``,
``mse`` weights, ``temperature``, ``hidden``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..distributed import ACCELERATORS
from ..errors import MtpeftError

INITS = ("random", "average", "similar", "shared")
SAMPLINGS = ("proportional", "temperature", "uniform")
HIDDEN = ("pooled", "tokens")


def _int(lo):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(lo, strict=False):
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > lo if strict else v >= lo))


def _one_of(options):
    return lambda v: v in options


_name = lambda v: isinstance(v, str) and bool(v.strip())
_names = lambda v: isinstance(v, list) and all(_name(x) for x in v)

# section -> key -> (check, what to give, an example)
BUDGET = {
    "lr": (_num(0, strict=True), "a positive learning rate", "0.01"),
    "batch_size": (_int(1), "a positive integer", "16"),
    "max_epochs": (lambda v: _int(1)(v) or v == -1, "a positive integer (or -1 with max_steps)", "10"),
    "max_steps": (lambda v: _int(1)(v) or v == -1, "a positive integer, or -1 for no cap", "150"),
    "patience": (_int(0), "an integer >= 0", "3"),
}
KEYS: dict[str, dict[str, tuple]] = {
    "": {
        "backbone": (_name, "a backbone name or a local HF directory", "minilm"),
        "sources": (lambda v: _names(v) and len(v) >= 1, "a list of task names (at least one)", "[tweet_airline]"),
        "targets": (_names, "a list of task names", "[tweet_apple]"),
        "max_examples": (lambda v: v is None or _int(1)(v), "a positive integer (or null: no cap)", "400"),
        "seed": (_int(-2**31), "an integer", "0"),
        "max_length": (lambda v: v is None or _int(1)(v), "a positive integer (or null: the scorer's 128)", "64"),
        "n_tokens": (_int(1), "a positive integer", "20"),
        "rank": (_int(1), "a positive integer", "1"),
        "shared": (_name, "a short name", "mpt"),
        "shared_init": (_one_of(("teachers", "random")), "teachers or random", "teachers"),
        "sampling": (_one_of(SAMPLINGS), "one of " + ", ".join(SAMPLINGS), "temperature"),
        "baseline": (lambda v: isinstance(v, bool), "true or false", "true"),
        # where every fit runs (Lightning DDP, docs/scale-out.md); --devices etc. on the command line win
        "devices": (_int(1), "a positive integer (processes or GPUs per node)", "2"),
        "num_nodes": (_int(1), "a positive integer", "1"),
        "strategy": (_one_of(("auto", "ddp")), "auto or ddp (fsdp is refused, docs/scale-out.md)", "ddp"),
        "accelerator": (_one_of(ACCELERATORS), "one of " + ", ".join(ACCELERATORS), "cpu"),
    },
    "teacher": BUDGET,
    "student": BUDGET,
    "target": {**BUDGET, "init": (_one_of(INITS), "one of " + ", ".join(INITS), "average"),
               "tune_shared": (lambda v: isinstance(v, bool), "true or false", "false")},
    "loss": {
        "task": (_num(0), "a weight >= 0", "1.0"), "kl": (_num(0), "a weight >= 0", "1.0"),
        "mse": (_num(0), "a weight >= 0", "0.1"),
        "temperature": (_num(0, strict=True), "a positive number", "2.0"),
        "hidden": (_one_of(HIDDEN), "pooled or tokens", "pooled"),
    },
}


@dataclass
class Budget:
    lr: float = 0.01
    batch_size: int = 16
    max_epochs: int = 10
    max_steps: int = 150
    patience: int = 3

    def train_config(self, seed: int, progress: bool = True, max_steps: int | None = None, parallel=None):
        """The fit's ``TrainConfig``; ``parallel`` (``mtpeft.distributed.Parallel``): where it runs."""
        from ..train import TrainConfig

        steps = self.max_steps if max_steps is None else max_steps
        return TrainConfig(lr=float(self.lr), batch_size=self.batch_size, max_epochs=self.max_epochs,
                           max_steps=steps, patience=self.patience, seed=seed, progress=progress,
                           **({} if parallel is None else parallel.fields()))


@dataclass
class TargetSettings(Budget):
    init: str = "average"
    tune_shared: bool = False


@dataclass
class LossSettings:
    task: float = 1.0
    kl: float = 1.0
    mse: float = 0.1
    temperature: float = 2.0
    hidden: str = "pooled"


@dataclass
class DistilConfig:
    sources: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    backbone: str = "minilm"
    max_examples: int | None = None
    seed: int = 0
    max_length: int | None = None
    n_tokens: int = 20
    rank: int = 1
    shared: str = "mpt"
    shared_init: str = "teachers"
    sampling: str = "temperature"
    baseline: bool = True
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    teacher: Budget = field(default_factory=Budget)
    student: Budget = field(default_factory=lambda: Budget(max_steps=300))
    target: TargetSettings = field(default_factory=TargetSettings)
    loss: LossSettings = field(default_factory=LossSettings)

    def parallel(self):
        """Where every fit of the run runs (``mtpeft.distributed.Parallel``); each budget's batch_size is the
        global batch and must split evenly over the ranks."""
        from ..distributed import Parallel

        p = Parallel(self.devices, self.num_nodes, self.strategy, self.accelerator)
        for k in ("teacher", "student", "target"):
            p.check_batch(getattr(self, k).batch_size, f"{k}.batch_size")
        return p

    def module_config(self) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens, "rank": self.rank, "shared": self.shared}


_SECTIONS = {"teacher": Budget, "student": Budget, "target": TargetSettings, "loss": LossSettings}


def parse_distil_config(conf: Any, where: str = "distil config") -> DistilConfig:
    """A ``DistilConfig`` from a mapping (a YAML/JSON file's content), every key checked."""
    if not isinstance(conf, dict):
        raise MtpeftError(f"{where} must hold a mapping with keys among {', '.join(_known(''))}")
    _check_keys(conf, "", where)
    top = {k: v for k, v in conf.items() if k not in _SECTIONS}
    if not top.get("sources"):
        raise MtpeftError(f"{where}: 'sources' is missing; give the tasks to distil, e.g. sources: [tweet_airline, "
                          "tweet_apple]")
    base = DistilConfig()
    sections = {}
    for name in _SECTIONS:
        sec = conf.get(name, {})
        if not isinstance(sec, dict):
            raise MtpeftError(f"{where}: {name!r} must be a mapping with keys among {', '.join(_known(name))}")
        _check_keys(sec, name, where)
        sections[name] = replace(getattr(base, name), **sec)
    cfg = replace(base, **top, **sections)
    for name, sec in (("teacher", cfg.teacher), ("student", cfg.student), ("target", cfg.target)):
        if sec.max_epochs == -1 and sec.max_steps == -1:
            raise MtpeftError(f"{where}: {name}.max_epochs -1 trains without end unless max_steps caps it; give "
                              f"{name}.max_steps, e.g. 150")
    dup = sorted({t for t in cfg.sources if cfg.sources.count(t) > 1} | (set(cfg.sources) & set(cfg.targets)))
    if dup:
        raise MtpeftError(f"{where}: task(s) {dup} appear twice among sources and targets; name each task once "
                          "(a target is a task held out from the sources)")
    if cfg.loss.task + cfg.loss.kl + cfg.loss.mse <= 0:
        raise MtpeftError(f"{where}: every loss weight (loss.task, loss.kl, loss.mse) is 0; give one > 0")
    return cfg


def _known(section: str) -> list[str]:
    keys = list(KEYS[section])
    return keys + list(_SECTIONS) if section == "" else keys


def _check_keys(conf: dict, section: str, where: str) -> None:
    known = KEYS[section]
    prefix = f"{section}." if section else ""
    unknown = sorted((k for k in conf if k not in known and (section or k not in _SECTIONS)), key=str)
    if unknown:
        raise MtpeftError(f"{where}: unknown key(s) {[prefix + str(k) for k in unknown]}; known: "
                          f"{', '.join(prefix + k for k in _known(section))}")
    for k, v in conf.items():
        if k in _SECTIONS and not section:
            continue
        ok, what, example = known[k]
        if isinstance(v, str) and k in _FLOATS and _as_float(v) is not None:
            v = conf[k] = _as_float(v)  # YAML 1.1 reads `lr: 1e-3` as a string
        if not ok(v):
            raise MtpeftError(f"{where}: {prefix}{k} = {v!r} is not accepted; give {what}, e.g. {prefix}{k}: {example}")


_FLOATS = ("lr", "task", "kl", "mse", "temperature")


def _as_float(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def load_distil_config(path: str | Path) -> DistilConfig:
    """``configs/mpt-distil.yaml`` or any YAML/JSON file of the same keys, checked."""
    from ..io import read_config

    return parse_distil_config(read_config(path, what="distil config"), where=f"distil config {path}")


def config_dict(cfg: DistilConfig) -> dict:
    """The config as plain data (the report records it)."""
    from dataclasses import asdict

    return asdict(cfg)


__all__ = ["INITS", "Budget", "DistilConfig", "LossSettings", "TargetSettings", "config_dict",
           "load_distil_config", "parse_distil_config"]
