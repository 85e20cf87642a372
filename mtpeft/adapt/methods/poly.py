"""``poly`` (Ponti et al., 2022; the few-shot fine-tune of Caccia et al., 2023): a new routing row for the target
task (U(-1e-3, 1e-3)) trained jointly with the skills on the shots, the row at ``router_lr`` (0.1, as mttl), the
skills at ``lr``.

The skills that train are copies (``<module>.skill<i>``, dropped after): the bank's skills and the stored routing
stay as they were, so what the source tasks get does not change (mttl trains a copy of its checkpoint the same
way). The trained row's evaluation routing over the trained copies is composed into ONE plain module of the
skills' type (``mtpeft.skills.compose_task``: exactly the module the routing gives the task), which is what
``run_adapt`` scores and ``--keep`` keeps. Parameters counted: the row and the skills.
"""
from __future__ import annotations

from .base import AdaptContext, AdaptResult, SkillsMethod, count_trainable, fit_module, register_method


def skill_weights(router) -> list[float]:
    """The task's evaluation weights over the skills (averaged over sites and splits), for the report."""
    return [round(float(x), 4) for x in router.task_skill_matrix()[0]]


@register_method("poly")
class Poly(SkillsMethod):
    def run(self, ctx: AdaptContext) -> AdaptResult:
        from ...skills import compose_task, task_router

        bank, name, skills = ctx.bank, ctx.module_name, ctx.skills
        bank.freeze()
        copies = []
        try:
            for i, s in enumerate(skills.module_names):
                rec = bank.record(s)
                tensors = {k: p.detach().clone() for k, p in bank.module_parameters(s).items()}
                bank.add_from(f"{name}.skill{i}", rec.type, dict(rec.config), tensors, task=ctx.task.name,
                              trainable=True, metadata={"adapt": "poly-copy", "source": s})
                copies.append(f"{name}.skill{i}")
            router = task_router(skills, ctx.task.name, copies, seed=ctx.seed)
            m = fit_module(ctx, name, router=router, router_lr=ctx.budget.router_lr)
            compose_task(bank, router, ctx.task.name, name, metadata={"adapt": self.name, "skills": skills.module_names})
        finally:
            for c in copies:
                bank.remove(c)
        trainable = router.logits.numel() + sum(count_trainable(bank, s) for s in skills.module_names)
        return AdaptResult(name, trainable, {"skill_weights": skill_weights(router), "row": router.logits.numel(),
                                             "steps": m["steps"], "best_val": m["best_val_acc"]})
