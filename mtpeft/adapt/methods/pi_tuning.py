"""``pi-tuning`` (Wu et al., 2023): the top-k source experts most similar to the target (diagonal Fisher
embeddings compared as the reference does, see ``adapt.fisher``) interpolated with learned weights
``softmax(alpha)`` (alpha init zeros: equal weights) into one new LoRA, then fine-tuned on the shots.

The interpolation is of the experts' weight deltas, ``sum_i w_i B_i A_i`` (the router's ``mix='output'``), not of
their factors: the bank initialises each module from its own seed, and summing the factors of experts that did not
start from one initialisation gives ``B A = sum_ij w_i w_j B_i A_j``, whose cross terms are noise (with three equal
weights, two thirds of the sum; the reference's experts share one seed, so its parameter interpolation does not
meet this). The interpolated delta becomes one LoRA of the experts' rank by SVD (``merge.merge_modules``, the
truncation error reported), so the fine-tuned module has the size of ``scratch``'s.

The interpolation trains ``interp_steps`` steps on the shots: the logits (at ``interp_lr``) jointly with copies of
the k experts (at ``lr``; ``interp_joint``, the default; the bank's experts stay as they were), or the logits alone
with the experts frozen. The fine-tune then takes the rest of the budget (``steps - interp_steps``), so pi-tuning
makes as many optimiser steps as ``scratch``. With one expert the interpolation is that expert (tested).
"""
from __future__ import annotations

from .base import AdaptContext, AdaptMethod, AdaptResult, count_trainable, fit_module, register_method
from .lorahub import same_group


def interpolate(bank, experts: list[str], weights, name: str, task: str | None = None,
                metadata: dict | None = None) -> dict:
    """Add module ``name``: the rank-r LoRA (r the experts' rank) closest to ``sum_i w_i Delta W_i`` (SVD); returns
    ``merge.merge_modules``' report (``relative_error``: the truncation's)."""
    from ...merge import merge_modules

    rank = int(bank.record(experts[0]).config["r"])
    return merge_modules(bank, list(experts), name, method="weighted", weights=[float(x) for x in weights],
                         rank=rank, task=task, metadata=metadata)


@register_method("pi-tuning")
class PiTuning(AdaptMethod):
    uses_similarity = True

    def check(self, bank, experts):
        same_group(bank, experts, "pi-tuning")

    def run(self, ctx: AdaptContext) -> AdaptResult:
        bank, name, b = ctx.bank, ctx.module_name, ctx.budget
        sim = ctx.similarity()["to_target"]
        top = sorted(ctx.experts, key=lambda e: -sim[e])[: b.top_k]
        interp_steps = min(b.interp_steps, b.steps - 1) if len(top) > 1 else 0
        w, interp = self._interpolate(ctx, top, interp_steps)
        merged = interpolate(bank, w["sources"], w["weights"], name, task=ctx.task.name,
                             metadata={"adapt": self.name})
        for extra in w["copies"]:
            bank.remove(extra)
        bank.unfreeze(name)
        m = fit_module(ctx, name, steps=b.steps - interp_steps)
        per_module = count_trainable(bank, name)
        return AdaptResult(name, per_module + len(top),
                           {"experts": top, "similarity": {e: round(sim[e], 4) for e in top},
                            "weights": {e: round(x, 4) for e, x in zip(top, w["weights"])}, "joint": b.interp_joint,
                            "interp_steps": None if interp is None else interp["steps"],
                            "truncation_error": round(merged["relative_error"], 4),
                            "interp_trainable": len(top) * (per_module if b.interp_joint else 0) + len(top),
                            "steps": m["steps"], "best_val": m["best_val_acc"]})

    def _interpolate(self, ctx: AdaptContext, top: list[str], steps: int):
        """Train the interpolation weights (and, joint, copies of the experts); returns the modules to compose,
        their weights and the copies to drop after composing."""
        from ...routers import InterpolationRouter

        bank, b = ctx.bank, ctx.budget
        if steps <= 0:
            return {"sources": top, "weights": [1.0 / len(top)] * len(top), "copies": []}, None
        sources, copies = top, []
        bank.freeze()
        try:
            if b.interp_joint:
                for i, e in enumerate(top):
                    c = f"{ctx.module_name}.src{i}"
                    tensors = {k: p.detach().clone() for k, p in bank.module_parameters(e).items()}
                    bank.add_from(c, ctx.expert_type, ctx.expert_config, tensors, task=ctx.task.name, trainable=True,
                                  metadata={"adapt": "pi-tuning-copy", "source": e})
                    copies.append(c)
                sources = copies
            router = InterpolationRouter(sources, mix="output")
            interp = fit_module(ctx, ctx.module_name, steps=steps, router=router, router_lr=b.interp_lr,
                                fit_name=f"{ctx.module_name}.interp")
        except BaseException:
            for c in copies:
                bank.remove(c)
            raise
        return {"sources": sources, "weights": router.weights().detach().cpu().tolist(), "copies": copies}, interp
