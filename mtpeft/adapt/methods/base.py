"""What every few-shot transfer method shares: its budget, its context, its result, its registry.

A method is a class registered by name (``@register_method("scratch")``) in one file of this package. ``run(ctx)``
gets an ``AdaptContext`` (the bank, the scorer, the few-shot task, the source experts, the seed, the budget) and
adds ONE module to the bank (named ``ctx.module_name``), trained or composed for the few-shot task; it returns an
``AdaptResult`` naming that module and counting the parameters it trained. A method whose result reads several of
the bank's modules at once (``fusion``) adds no module and returns the router to score through (``router``).
``check(bank, experts)`` refuses, before anything runs, a bank the method cannot use (e.g. no skills for Poly).
Methods that adapt the bank's skills (Poly, MHR) derive from ``SkillsMethod`` and find the skills' router in
``ctx.skills``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...errors import MtpeftError
from ...registry import Registry

ADAPT_METHODS: Registry[type[AdaptMethod]] = Registry("adapt method")


def register_method(name: str):
    """Class decorator: ``@register_method("lorahub")`` on an AdaptMethod subclass."""

    return ADAPT_METHODS.register_class(name)


@dataclass
class Budget:
    """How much each method may train or search (the same for every method of a run)."""

    steps: int = 100  # optimiser steps of each trained module (scratch, best-source, pi-tuning's fine-tune)
    lr: float = 2e-3
    batch_size: int = 16
    patience: int = 1000  # validations without improvement before stopping (the validation set is the shots)
    validations: int = 4  # per fit, evenly spaced (the last at the final step): the state kept is the best of them
    lorahub_evals: int = 40  # nevergrad evaluations of the few-shot loss
    lorahub_l1: float = 0.05  # weight of mean |w| in LoraHub's objective
    lorahub_bound: float = 1.5  # w in [-bound, bound]^N
    top_k: int = 3  # pi-tuning: experts interpolated
    interp_steps: int = 30  # pi-tuning: steps training the interpolation logits (experts frozen)
    interp_lr: float = 5e-2
    interp_joint: bool = True  # pi-tuning: copies of the experts train with the logits (False: the logits alone)
    router_lr: float = 0.1  # poly, mhr-z: the new routing row's learning rate (the skills train at lr), as mttl
    probe_steps: int = 20  # the Fisher probe's training steps on each task (the experts' and the target's)
    fisher_batches: int = 32  # batches of a task's data in its Fisher embedding
    progress: bool = False

    def __post_init__(self):
        for k in ("steps", "batch_size", "patience", "validations", "lorahub_evals", "top_k", "probe_steps",
                  "fisher_batches"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MtpeftError(f"{k} must be a positive integer, got {v!r}")
        if isinstance(self.interp_steps, bool) or not isinstance(self.interp_steps, int) or self.interp_steps < 0:
            raise MtpeftError(f"interp_steps must be an integer >= 0, got {self.interp_steps!r}")
        if not isinstance(self.interp_joint, bool):
            raise MtpeftError(f"interp_joint must be true or false, got {self.interp_joint!r}")
        for k in ("lr", "interp_lr", "router_lr", "lorahub_bound"):
            if not getattr(self, k) > 0:
                raise MtpeftError(f"{k} must be > 0, got {getattr(self, k)!r}")
        if not self.lorahub_l1 >= 0:
            raise MtpeftError(f"lorahub_l1 must be >= 0, got {self.lorahub_l1!r}")

    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        """A budget from a config mapping (e.g. the ``adapt:`` block of a benchmark config); unknown keys refused."""
        known = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict) or set(d) - set(known):
            bad = sorted(set(d) - set(known)) if isinstance(d, dict) else d
            raise MtpeftError(f"unknown adapt budget key(s) {bad}; known: {', '.join(known)}")
        return cls(**d)

    def train_config(self, seed: int, steps: int | None = None, parallel=None):
        """A fit's ``TrainConfig``; ``parallel`` (``mtpeft.distributed.Parallel``): where it runs (DDP)."""
        from ...train import TrainConfig

        steps = steps or self.steps
        # validating on the shots once an epoch would cost as much as training at 16 shots (an epoch is 3 steps):
        # about `validations` times, every `every` steps, a divisor of the steps so the last step is validated
        every = next(d for d in range(-(-steps // self.validations), steps + 1) if steps % d == 0)
        return TrainConfig(lr=self.lr, batch_size=self.batch_size, max_epochs=100_000, max_steps=steps,
                           patience=self.patience, seed=seed, progress=self.progress, val_check_interval=every,
                           **({} if parallel is None else parallel.fields()))


@dataclass
class AdaptResult:
    module: str  # the module added to the bank for the few-shot task
    trainable: int  # parameters trained (or searched) for the task
    info: dict[str, Any] = field(default_factory=dict)  # JSON-safe details (weights found, experts picked, steps)
    # a router the result is scored through instead of a module (AdapterFusion: attention over several of the
    # bank's modules); then ``module`` is only the name it is kept under (``BANK/routers/<module>/``)
    router: Any = None


@dataclass
class AdaptContext:
    bank: Any
    scorer: Any
    task: Any  # the few-shot task: train = validation = the shots, test = the whole test split
    experts: list[str]  # the source experts (LoRA modules of one configuration, none trained on the task)
    seed: int
    budget: Budget
    module_name: str  # the name the method's module takes
    similarity: Callable[[], dict] | None = None  # pi-tuning's Fisher similarity (computed once, shared)
    log: Callable[[str], None] = lambda msg: None
    skills: Any = None  # the skills' router (a PolyRouter) for the methods that adapt skills; else None
    parallel: Any = None  # where every fit runs (mtpeft.distributed.Parallel; None: this one process)

    def train_config(self, steps: int | None = None):
        """The budget's ``TrainConfig`` for a fit of this context (its seed, its processes)."""
        return self.budget.train_config(self.seed, steps, self.parallel)

    @property
    def expert_type(self) -> str:
        """The experts' module type (LoRA when the bank has no experts, e.g. a bank of skills)."""
        return self.bank.record(self.experts[0]).type if self.experts else "lora"

    @property
    def expert_config(self) -> dict:
        """The experts' configuration (LoRA's defaults when the bank has no experts)."""
        return dict(self.bank.record(self.experts[0]).config) if self.experts else {}


class AdaptMethod:
    name: ClassVar[str] = ""
    uses_similarity: ClassVar[bool] = False  # needs the Fisher embeddings of the experts and of the target
    needs_experts: ClassVar[bool] = True  # False: runs on a bank without source experts (scratch; skills methods)
    needs_skills: ClassVar[bool] = False  # True: adapts the bank's skills, whose router is ctx.skills

    def check(self, bank, experts: list[str]) -> None:
        """Refuse a bank this method cannot use (raise MtpeftError naming the fix); default: anything goes."""

    def run(self, ctx: AdaptContext) -> AdaptResult:  # pragma: no cover - abstract
        raise NotImplementedError


TRAIN_SKILLS = ("train a skill inventory into the bank first: `mtpeft train --router poly|mhr --skills N --multitask "
                "--task A --task B ... --out BANK`")


class SkillsMethod(AdaptMethod):
    """A method on the bank's skills (Poly/MHR): needs no source experts; refuses a bank without skills."""

    needs_experts = False
    needs_skills = True

    def check(self, bank, experts):
        from ...skills import inventories

        if not inventories(bank):
            raise MtpeftError(f"{self.name} adapts the bank's skills (Poly/MHR) and this bank has none; {TRAIN_SKILLS}")


def count_trainable(bank, name: str) -> int:
    """Parameters of module ``name``."""
    return sum(p.numel() for p in bank.module_parameters(name).values())


def fit_module(ctx: AdaptContext, name: str, steps: int | None = None, router=None, router_lr: float | None = None,
               fit_name: str | None = None) -> dict:
    """Train what has ``requires_grad`` (module ``name``, ``router``'s parameters) on the shots, routed to ``name``
    by task id unless ``router`` is given; freeze the bank after. Returns fit_phase's metrics."""
    from ...routers import TaskIdRouter
    from ...train import fit_phase

    router = router if router is not None else TaskIdRouter({ctx.task.name: name})
    try:
        return fit_phase(ctx.bank, ctx.scorer, [ctx.task], router, ctx.train_config(steps),
                         router_lr=router_lr, name=fit_name or name)
    finally:
        ctx.bank.freeze()
