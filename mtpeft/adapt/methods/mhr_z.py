"""``mhr-z`` (Caccia et al., 2023): only a new routing row for the target task trains (U(-1e-3, 1e-3) init, at
``router_lr``); the skills are frozen and left bit-identical.

The row lives in a router of its own over the bank's skills (``mtpeft.skills.task_router``, the reference's
``resize_module_logits(1)``), not in the stored routing matrix (``add_task_row``'s in-place path), so the source
tasks' routing never changes and adapting again (another seed or shot count) never collides. The row's evaluation
routing is composed into ONE plain module of the skills' type (``compose_task``, exactly the routed module), which
``run_adapt`` scores. Parameters counted: the row only (sites x splits x skills).
"""
from __future__ import annotations

from .base import AdaptContext, AdaptResult, SkillsMethod, fit_module, register_method
from .poly import skill_weights


@register_method("mhr-z")
class MhrZ(SkillsMethod):
    def run(self, ctx: AdaptContext) -> AdaptResult:
        from ...skills import compose_task, task_router

        bank, name, skills = ctx.bank, ctx.module_name, ctx.skills
        bank.freeze()  # the skills too: only the router's row trains
        router = task_router(skills, ctx.task.name, seed=ctx.seed)
        m = fit_module(ctx, name, router=router, router_lr=ctx.budget.router_lr)
        compose_task(bank, router, ctx.task.name, name, metadata={"adapt": self.name, "skills": skills.module_names})
        return AdaptResult(name, router.logits.numel(), {"skill_weights": skill_weights(router), "steps": m["steps"],
                                                          "best_val": m["best_val_acc"]})
