"""``lorahub`` (Huang et al., 2023) as an adapt method: ``mtpeft.skills.lorahub`` on the shots (weights ``w`` in
``[-1.5, 1.5]^N`` over the N source experts by nevergrad's NGOpt from ``w = 0`` on the few-shot cross-entropy
plus ``0.05 * mean |w|``, the factors composed apart, ``merge.compose_factors``). Nothing is trained by
gradient; the parameters searched are the N weights."""
from __future__ import annotations

from ...errors import MtpeftError
from .base import AdaptContext, AdaptMethod, AdaptResult, register_method

EVAL_BATCH = 64


def same_group(bank, experts: list[str], method: str) -> None:
    """Parameter mixing composes experts of one LoRA configuration (one stack at every site)."""
    odd = [e for e in experts if bank.record(e).type != "lora"]
    if odd:
        raise MtpeftError(f"{method} composes LoRA experts; {odd} are not LoRA modules: choose LoRA experts with "
                          "--experts")
    keys = {bank.group_of(e).key for e in experts}
    if len(keys) > 1:
        raise MtpeftError(f"{method} composes experts of one LoRA configuration; the experts {experts} have "
                          f"{len(keys)} different ones: choose experts of one configuration with --experts")


@register_method("lorahub")
class LoraHub(AdaptMethod):
    def check(self, bank, experts):
        same_group(bank, experts, "lorahub")

    def run(self, ctx: AdaptContext) -> AdaptResult:
        from ...skills.lorahub import lorahub

        b = ctx.budget
        r = lorahub(ctx.bank, ctx.scorer, ctx.task, ctx.experts, ctx.module_name, budget=b.lorahub_evals,
                    bound=b.lorahub_bound, reg=b.lorahub_l1, seed=ctx.seed, metadata={"adapt": self.name})
        weights = {e: round(float(x), 4) for e, x in r["weights"].items()}
        ctx.log(f"lorahub weights {weights} (objective {r['objective']:.4f}, at w=0 {r['loss_at_zero']:.4f})")
        return AdaptResult(ctx.module_name, len(ctx.experts),
                           {"weights": weights, "objective": round(r["objective"], 6),
                            "loss_at_zero": round(r["loss_at_zero"], 6), "evaluations": r["evaluations"]})
