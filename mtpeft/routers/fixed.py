"""Fixed weights over named modules, the same for every input: averaging, a hand-picked mixture, or the
weights LoraHub or a merge found (``mix='params'`` mixes the parameters, not the outputs)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..io import MtpeftError
from ..routing import MIX_MODES, RouteContext, Routing
from .base import Router, register_router


@register_router("fixed")
class FixedRouter(Router):
    def __init__(self, weights: Mapping[str, float], mix: str = "output"):
        if not weights:
            raise MtpeftError("a fixed router needs at least one module weight, e.g. {'bbc_topic-lora': 1.0}")
        if mix not in MIX_MODES:
            raise MtpeftError(f"mix must be one of {MIX_MODES}, got {mix!r}")
        super().__init__(list(weights))
        self.mix = mix
        self.register_buffer("weights", torch.tensor([float(w) for w in weights.values()]))

    @classmethod
    def uniform(cls, names, mix: str = "output") -> FixedRouter:
        """Every module of ``names`` with weight 1/n (the average)."""
        names = list(names)
        return cls({n: 1.0 / len(names) for n in names}, mix)

    def route(self, bank, ctx: RouteContext) -> Routing:
        B = ctx.batch_size if ctx is not None and ctx.batch_size is not None else None
        if B is None:
            raise MtpeftError("fixed router: the batch size is unknown; route through bank(...) or give a RouteContext")
        dev = bank.device
        idx = self.module_ids(dev)[None].expand(B, -1)
        return Routing(self.weights.to(dev)[None].expand(B, -1), idx, self.mix)

    def get_config(self) -> dict:
        return {"weights": dict(zip(self.module_names, self.weights.tolist())), "mix": self.mix}
