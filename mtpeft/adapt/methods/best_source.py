"""``best-source``: a copy of the source expert most similar to the target (pi-Tuning's Fisher similarity, the
same ranking ``pi-tuning`` uses), fine-tuned on the shots."""
from __future__ import annotations

from .base import AdaptContext, AdaptMethod, AdaptResult, count_trainable, fit_module, register_method


@register_method("best-source")
class BestSource(AdaptMethod):
    uses_similarity = True

    def run(self, ctx: AdaptContext) -> AdaptResult:
        bank, name = ctx.bank, ctx.module_name
        sim = ctx.similarity()["to_target"]
        best = max(ctx.experts, key=lambda e: sim[e])
        tensors = {k: p.detach().clone() for k, p in bank.module_parameters(best).items()}
        bank.freeze()
        bank.add_from(name, ctx.expert_type, ctx.expert_config, tensors, task=ctx.task.name, trainable=True,
                      metadata={"adapt": self.name, "source": best})
        m = fit_module(ctx, name)
        return AdaptResult(name, count_trainable(bank, name),
                           {"source": best, "similarity": round(sim[best], 4), "steps": m["steps"],
                            "best_val": m["best_val_acc"]})
