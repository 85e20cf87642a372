"""``fusion`` (AdapterFusion, Pfeiffer et al., 2021): attention over the source bottleneck adapters' outputs at
every site they act on (``mtpeft.routers.fusion``), trained on the shots with the adapters and the backbone frozen,
cross-entropy plus 0.01 ``||V - I||^2``. The fusion reads several modules at once, so it is no module of the bank:
the result is the trained router, scored through it, kept with ``--keep`` in ``BANK/routers/<name>/``. The
parameters trained: ``3 d^2 + 2 d`` per fused site."""
from __future__ import annotations

from .base import AdaptContext, AdaptMethod, AdaptResult, register_method


@register_method("fusion")
class Fusion(AdaptMethod):
    def check(self, bank, experts):
        from ...errors import MtpeftError
        from ...routers.fusion import ADAPTER_TYPES
        from ...skills.fusion import check_adapters, fusable

        adapters = fusable(bank, experts)
        if not adapters:
            have = fusable(bank)
            fix = (f"the bank has adapters: name them with --experts {','.join(have)}" if have else
                   "train some first, e.g. `mtpeft train --module pfeiffer --task T --out BANK`")
            raise MtpeftError(f"fusion fuses bottleneck adapters ({', '.join(ADAPTER_TYPES)}); none among the experts "
                              f"{experts}: {fix}")
        check_adapters(bank, adapters)

    def run(self, ctx: AdaptContext) -> AdaptResult:
        from ...skills.fusion import add_fusion, fit_fusion, fusable, trainable

        adapters = fusable(ctx.bank, ctx.experts)
        router = add_fusion(ctx.bank, adapters, seed=ctx.seed)
        m = fit_fusion(ctx.bank, ctx.scorer, [ctx.task], router, ctx.train_config(),
                       name=ctx.module_name)
        reg = float(router.regulariser())
        ctx.log(f"fusion over {adapters}: ||V - I||^2 = {reg:.4g} after {m['steps']} steps")
        return AdaptResult(ctx.module_name, trainable(router),
                           {"adapters": adapters, "sites": len(router.sites), "steps": m["steps"],
                            "best_val": m["best_val_acc"], "reg": round(reg, 6)}, router=router)
