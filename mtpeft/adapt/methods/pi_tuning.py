"""``pi-tuning`` (Wu et al., 2023): the top-k source experts most similar to the target (cosine of diagonal Fisher
embeddings, see ``adapt.fisher``) interpolated with learned weights ``softmax(alpha)`` (alpha init zeros: equal
weights; trained on the shots with the experts frozen), composed into one new LoRA (``A = sum_i w_i A_i``,
``B = sum_i w_i B_i``), then fine-tuned on the shots. With one expert the interpolation is that expert."""
from __future__ import annotations

from .base import AdaptContext, AdaptMethod, AdaptResult, count_trainable, fit_module, register_method
from .lorahub import same_group


def interpolate(bank, experts: list[str], weights, name: str, task: str | None = None, metadata: dict | None = None):
    """Add module ``name``: the experts' factors summed with ``weights`` (``merge.compose_factors``)."""
    from ...merge import compose_factors

    return compose_factors(bank, experts, [float(x) for x in weights], name, method="pi-tuning", task=task,
                           metadata=metadata)


@register_method("pi-tuning")
class PiTuning(AdaptMethod):
    uses_similarity = True

    def check(self, bank, experts):
        same_group(bank, experts, "pi-tuning")

    def run(self, ctx: AdaptContext) -> AdaptResult:
        from ...routers import InterpolationRouter

        bank, name, b = ctx.bank, ctx.module_name, ctx.budget
        sim = ctx.similarity()["to_target"]
        top = sorted(ctx.experts, key=lambda e: -sim[e])[: b.top_k]
        router = InterpolationRouter(top)
        interp = None
        if b.interp_steps > 0 and len(top) > 1:
            bank.freeze()
            interp = fit_module(ctx, name, steps=b.interp_steps, router=router, router_lr=b.interp_lr,
                                fit_name=f"{name}.interp")
        w = router.weights().detach().cpu().tolist()
        interpolate(bank, top, w, name, task=ctx.task.name, metadata={"adapt": self.name})
        bank.unfreeze(name)
        m = fit_module(ctx, name)
        return AdaptResult(name, count_trainable(bank, name) + len(top),
                           {"experts": top, "similarity": {e: round(sim[e], 4) for e in top},
                            "weights": {e: round(x, 4) for e, x in zip(top, w)},
                            "interp_steps": None if interp is None else interp["steps"], "steps": m["steps"],
                            "best_val": m["best_val_acc"]})
