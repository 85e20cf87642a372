"""``mhr-mu`` (Caccia et al., 2023): no routing; the skills averaged into one plain module (``A = mean_s A_s``,
``B = mean_s B_s``; ``mtpeft.skills.average_skills``), fine-tuned on the shots at ``lr``. The bank's skills stay
as they were. Parameters counted: the averaged module's."""
from __future__ import annotations

from .base import AdaptContext, AdaptResult, SkillsMethod, count_trainable, fit_module, register_method


@register_method("mhr-mu")
class MhrMu(SkillsMethod):
    def run(self, ctx: AdaptContext) -> AdaptResult:
        from ...skills import average_skills

        bank, name = ctx.bank, ctx.module_name
        bank.freeze()
        average_skills(bank, ctx.skills, name, task=ctx.task.name, trainable=True, metadata={"adapt": self.name})
        m = fit_module(ctx, name)
        return AdaptResult(name, count_trainable(bank, name), {"skills": len(ctx.skills.module_names),
                                                               "steps": m["steps"], "best_val": m["best_val_acc"]})
