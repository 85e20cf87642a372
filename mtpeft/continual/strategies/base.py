"""What every continual strategy shares: the context it runs in, its hooks (avalanche's plugin idea:
``before_task``, ``train_task``, ``after_task``), how it routes at test, and its saved state.

A strategy is registered by name (``@register_strategy("seqft")``) in a file of its own. The runner calls,
for each step ``i`` of the stream: ``before_task(i, task)``, ``train_task(i, task)``, ``after_task(i, task)``,
then evaluates every task of the stream with ``eval_router(i)`` (None: the bare backbone) and writes the
run's state. ``state_dict()`` is JSON (what is not in the bank or the memory, both saved beside it);
``load_state_dict`` puts it back on resume, so a resumed run goes on exactly as the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...errors import MtpeftError
from ...registry import Registry
from ...routers import FixedRouter, Router

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(name: str):
    """Class decorator: ``@register_strategy("replay")`` on a Strategy subclass."""

    return STRATEGIES.register_class(name)


@dataclass
class Context:
    """What a strategy works with: the bank and scorer on a fresh backbone, the stream, the module type and
    options every module it adds gets, the training settings, the replay memory (strategies with
    ``uses_memory``) and this run's directory."""

    bank: Any
    scorer: Any
    stream: Any
    module_type: str
    module_config: dict
    train: Any  # TrainConfig
    seed: int
    memory: Any = None
    run_dir: Path | None = None
    progress: bool = False
    timings: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # fits shared by the strategies of one seed (see ExpertOracle)


class Strategy:
    name: ClassVar[str] = ""
    uses_memory: ClassVar[bool] = False
    sequential: ClassVar[bool] = True  # False: trains once on the whole stream (joint); no accuracy matrix
    uses_task_id: ClassVar[bool] = False  # its test-time routing reads the task id (an oracle)
    module_types: ClassVar[tuple[str, ...] | None] = None  # None: any module type
    defaults: ClassVar[dict[str, Any]] = {}  # its options and their defaults
    local_adapt_ok: ClassVar[bool] = False  # takes the option local_adapt (MbPA++ at test, local_adapt.py)
    local_adapt_default: ClassVar[Any] = None

    def __init__(self, ctx: Context, **options):
        from ..local_adapt import LocalAdaptConfig

        la = options.pop("local_adapt", self.local_adapt_default)
        if la not in (None, False) and not self.local_adapt_ok:
            takers = ", ".join(n for n in STRATEGIES.names() if STRATEGIES.get(n).local_adapt_ok)
            raise MtpeftError(f"strategy {self.name!r} does not take local_adapt (MbPA++ adapts one shared module "
                              f"on memory neighbours); strategies that do: {takers}")
        self.local_adapt = LocalAdaptConfig.parse(la, f"strategy {self.name!r}")
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(self.defaults) or "none"
            raise MtpeftError(f"strategy {self.name!r}: unknown option(s) {unknown}; it takes: {known}")
        if self.module_types is not None and ctx.module_type not in self.module_types:
            raise MtpeftError(f"strategy {self.name!r} works with module type(s) {', '.join(self.module_types)}, "
                              f"not {ctx.module_type!r}; choose module: {self.module_types[0]}")
        self.ctx = ctx
        self.options = {**self.defaults, **options}
        self.check_options()

    def check_options(self) -> None:
        """Validate ``self.options`` (override; raise MtpeftError naming the option and the fix)."""

    # ---- the hooks ----------------------------------------------------------------------------------
    def before_task(self, step: int, task) -> None:
        pass

    def train_task(self, step: int, task) -> dict:
        raise NotImplementedError

    def after_task(self, step: int, task) -> None:
        pass

    def eval_router(self, step: int, task) -> Router | None:
        """The router ``task`` is evaluated with after step ``step`` (None: the bare backbone). Only strategies
        with ``uses_task_id`` may look at ``task`` to choose; the others route every task alike (the runner
        passes them no task id either)."""
        raise NotImplementedError

    def eval_key(self, step: int, task):
        """What ``task`` is evaluated with after step ``step`` when that can no longer change (frozen modules,
        the same routing), as a hashable key: a cell evaluated with the same key and label space before is
        not evaluated again. None (the default): evaluate every time."""
        return

    def train_stream(self) -> dict:
        """Non-sequential strategies (``sequential = False``): train once on the whole stream."""
        raise NotImplementedError

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- helpers ------------------------------------------------------------------------------------
    def module_name(self, task=None) -> str:
        """The name of the module for ``task`` (None: the one shared module)."""
        t = self.ctx.module_type
        return f"shared-{t}" if task is None else f"{task.name}-{t}"

    def add_module(self, name: str, task=None, trainable: bool = True) -> None:
        bank = self.ctx.bank
        bank.freeze()
        bank.add(name, self.ctx.module_type, dict(self.ctx.module_config), task=None if task is None else task.name,
                 seed=self.ctx.seed)
        if not trainable:
            bank.freeze(name)

    def fit(self, tasks, router: Router, name: str, step: int, **kw) -> dict:
        """One fit through the Lightning phase, over the label space of step ``step``."""
        from ...train import fit_phase

        cfg = dataclasses.replace(self.ctx.train, progress=self.ctx.progress)
        return fit_phase(self.ctx.bank, self.ctx.scorer, list(tasks), router, cfg, name=name,
                         labels=self.ctx.stream.train_space(step), **kw)

    def fit_name(self, task) -> str:
        """The name of the fit of ``task`` (its seed derives from it and the run's seed, so a resumed run
        trains exactly as an uninterrupted one)."""
        return f"{self.name}-{task.name}"

    def learnt(self, step: int) -> list:
        """The tasks learnt up to and including step ``step``."""
        return self.ctx.stream.tasks[: step + 1]


def check_steps_option(who: str, key: str, value, max_steps: int, what: str, give: str) -> None:
    """A per-task step count option: a positive integer, or None (then the run's ``max_steps``, which must be
    a cap). ``what`` names it in the error, ``give`` says what to give when ``max_steps`` is -1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MtpeftError(f"{who}: {what} must be a positive integer, got {value!r}")
    if value is None and max_steps < 1:
        raise MtpeftError(f"{who}: with max_steps -1 (no cap) give {give}: strategies: {{{who}: {{{key}: 40}}}}")


def only(name: str) -> FixedRouter:
    """Every example to module ``name`` with weight 1 (the single-expert fast path)."""
    return FixedRouter({name: 1.0})
