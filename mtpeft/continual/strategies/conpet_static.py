"""``conpet-static`` (Static ConPET, Song et al. 2023): one shared module and replay whose training budget per
task is fixed, so the cost of a task does not grow with the number of tasks seen.

Every task trains exactly ``budget`` batches (default: the run's ``max_steps``), one epoch of them, each of
``batch_size`` rows: ``round(old_ratio * batch_size)`` drawn at random from the memory and the rest from the
new task (cycled through, reshuffled at every pass); the first task, with an empty memory, fills its batches
with new rows. The memory keeps its examples by k-means (``policy: kmeans``, ``mtpeft.memory.policies``:
per task a share of the capacity, one example per cluster of the task's frozen-backbone embeddings), so
what is replayed covers each old task's input space rather than a random sample. Replay data goes through
``replay_data.ReplayDataModule`` with its ``budget`` (the fixed batch count).
"""
from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

from ...errors import MtpeftError
from ..replay_data import ReplayDataModule
from .base import check_steps_option, only, register_strategy
from .replay import Replay, memory_rows

POLICIES = ("kmeans", "config")


def use_kmeans_memory(ctx, who: str) -> None:
    """Give the run's (still empty) memory ConPET's k-means policy, its capacity and seed kept; a memory
    reloaded on resume has it already."""
    mem = ctx.memory
    if mem is None or mem.policy.name == "kmeans":
        return
    if len(mem):
        raise MtpeftError(f"{who}: the memory already holds examples kept by {mem.policy.name!r}, not k-means; use "
                          "a new run directory")
    from ...memory import ReplayMemory

    ctx.memory = ReplayMemory(mem.dim, mem.capacity, "kmeans", seed=ctx.seed)


@register_strategy("conpet-static")
class ConPETStatic(Replay):
    uses_memory = True
    defaults: ClassVar[dict] = {"budget": None, "old_ratio": 0.5, "policy": "kmeans"}

    def check_options(self):
        o = self.options
        check_steps_option("conpet-static", "budget", o["budget"], self.ctx.train.max_steps,
                           "budget (batches per task)", "the budget of batches per task")
        r = o["old_ratio"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise MtpeftError(f"conpet-static: old_ratio (the share of each batch drawn from the memory) must be in "
                              f"(0, 1), got {r!r}; e.g. old_ratio: 0.5")
        if o["policy"] not in POLICIES:
            raise MtpeftError(f"conpet-static: policy must be kmeans (ConPET's) or config (the run's memory policy), "
                              f"got {o['policy']!r}")
        if o["policy"] == "kmeans":
            use_kmeans_memory(self.ctx, self.name)

    @property
    def budget(self) -> int:
        return self.options["budget"] or self.ctx.train.max_steps

    def train_task(self, step, task):
        from ...train import fit_phase, fit_seed

        ctx, bs = self.ctx, self.ctx.train.batch_size
        t0 = time.perf_counter()
        if len(ctx.memory):
            ids, replay, old = memory_rows(ctx.memory, ctx.stream, task, self.name)
            n_old = min(bs - 1, max(1, round(self.options["old_ratio"] * bs)))
        else:
            import torch

            ids, replay, old, n_old = torch.empty(0, dtype=torch.long), ([], [], []), [], 0
        dm = ReplayDataModule([task, *old], replay, ids, memory=ctx.memory, n_old=n_old, batch_size=bs - n_old,
                              seed=fit_seed(ctx.seed, self.fit_name(task)), budget=self.budget)
        ctx.timings["memory_s"] = ctx.timings.get("memory_s", 0.0) + time.perf_counter() - t0
        cfg = dataclasses.replace(ctx.train, progress=ctx.progress, max_epochs=1, max_steps=self.budget)
        return fit_phase(ctx.bank, ctx.scorer, [task, *old], only(self.module_name()), cfg, name=self.fit_name(task),
                         labels=ctx.stream.train_space(step), datamodule=dm)


@register_strategy("conpet-static-mbpa")
class ConPETStaticMbPA(ConPETStatic):
    """``conpet-static`` with MbPA++ local adaptation at test (``local_adapt`` on, its defaults). It trains
    exactly as ``conpet-static`` (the same fit names, so the same seeds): the gap between the two rows is the
    local adaptation's alone."""

    local_adapt_default = True

    def fit_name(self, task) -> str:
        return f"conpet-static-{task.name}"
