"""``scratch``: a new LoRA (the experts' configuration) trained on the shots alone: the baseline."""
from __future__ import annotations

from .base import AdaptContext, AdaptMethod, AdaptResult, count_trainable, fit_module, register_method


@register_method("scratch")
class Scratch(AdaptMethod):
    needs_experts = False  # the experts' configuration where there are experts, LoRA's defaults otherwise

    def run(self, ctx: AdaptContext) -> AdaptResult:
        bank, name = ctx.bank, ctx.module_name
        bank.freeze()
        bank.add(name, ctx.expert_type, ctx.expert_config, task=ctx.task.name, seed=ctx.seed,
                 metadata={"adapt": self.name})
        m = fit_module(ctx, name)
        return AdaptResult(name, count_trainable(bank, name), {"steps": m["steps"], "best_val": m["best_val_acc"]})
