"""``expert-oracle``: a new module per task, trained alone; at test the task id picks its expert (an oracle:
the best a library of experts can do with perfect routing). A task with no expert yet is scored by the bare
backbone."""
from __future__ import annotations

from .base import Strategy, only, register_strategy


@register_strategy("expert-oracle")
class ExpertOracle(Strategy):
    uses_task_id = True

    def fit_name(self, task) -> str:
        # shared with expert-router: with the same seed both train bit-identical experts, so the gap between
        # them is the routing's alone
        return f"expert-{task.name}"

    def before_task(self, step, task):
        self.add_module(self.module_name(task), task)  # everything else frozen

    def train_task(self, step, task):
        """Train the task's expert; or, when another strategy of this seed has trained the same one already (the
        same fit name and seed give bit-identical weights), copy it: expert-oracle and expert-router share it."""
        import torch

        name, key = self.module_name(task), ("expert", self.fit_name(task), self.ctx.stream.scenario)
        params = self.ctx.bank.module_parameters(name)
        if key in self.ctx.shared:
            tensors, fit = self.ctx.shared[key]
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(tensors[k])
            for _, stack in self.ctx.bank.stacks_of(name):
                stack.invalidate()
            return {**fit, "reused": True}
        fit = self.fit([task], only(name), self.fit_name(task), step)
        self.ctx.shared[key] = ({k: p.detach().clone() for k, p in params.items()}, fit)
        return fit

    def after_task(self, step, task):
        name = self.module_name(task)
        self.ctx.bank.finalize(name)
        self.ctx.bank.freeze(name)

    def eval_key(self, step, task):
        return ("expert", self.module_name(task))  # frozen once learnt; unlearnt tasks run bare (cached apart)

    def eval_router(self, step, task):
        learnt = {t.name for t in self.learnt(step)}
        return only(self.module_name(task)) if task.name in learnt else None
