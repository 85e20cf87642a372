"""``joint``: one module trained on every task of the stream at once (the upper bound of a continual run;
its accuracies give the other strategies' intransigence). It trains ``max_steps`` times the number of
tasks (the total budget of the sequential strategies), on the stream's full label space."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import Strategy, only, register_strategy


@register_strategy("joint")
class Joint(Strategy):
    sequential = False
    defaults: ClassVar[dict] = {"sampling": "proportional"}

    def check_options(self):
        from ...errors import MtpeftError

        if self.options["sampling"] not in ("proportional", "temperature", "uniform"):
            raise MtpeftError(f"joint: sampling must be proportional, temperature or uniform, got "
                              f"{self.options['sampling']!r}")

    def train_stream(self):
        from ...train import fit_phase

        ctx = self.ctx
        tasks = ctx.stream.tasks
        name = self.module_name()
        self.add_module(name)
        cfg = dataclasses.replace(ctx.train, progress=ctx.progress)
        if cfg.max_steps > 0:
            cfg = dataclasses.replace(cfg, max_steps=cfg.max_steps * len(tasks))
        out = fit_phase(ctx.bank, ctx.scorer, tasks, only(name), cfg, name=f"{self.name}-all",
                        labels=ctx.stream.train_space(len(tasks) - 1), sampling=self.options["sampling"])
        ctx.bank.freeze(name)
        return out

    def eval_router(self, step, task):
        return only(self.module_name())
