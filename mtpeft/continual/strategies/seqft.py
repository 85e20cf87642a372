"""``seqft``: one shared module fine-tuned on each task in turn, nothing done against forgetting (the lower
bound of a continual run)."""
from __future__ import annotations

from .base import Strategy, only, register_strategy


@register_strategy("seqft")
class SeqFT(Strategy):
    def before_task(self, step, task):
        name = self.module_name()
        if name not in self.ctx.bank:
            self.add_module(name)
        self.ctx.bank.freeze()
        self.ctx.bank.unfreeze(name)

    def train_task(self, step, task):
        return self.fit([task], only(self.module_name()), self.fit_name(task), step)

    def eval_router(self, step, task):
        return only(self.module_name())
