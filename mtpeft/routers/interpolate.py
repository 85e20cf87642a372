"""Learned interpolation of named modules (pi-Tuning): weights ``softmax(logits)`` over the modules, the same for
every input. ``mix='output'`` (the default) sums the modules' outputs, ``sum_i w_i B_i A_i x``: the weighted sum
of their weight deltas, exact whatever the experts' initialisations. ``mix='params'`` sums their parameters
(``A = sum_i w_i A_i``, ``B = sum_i w_i B_i``), which for LoRA adds the cross terms ``B_i A_j``: close to the delta
interpolation only when the experts started from one initialisation (as pi-Tuning's reference trains them, with
one seed). The logits are the router's parameters (init zeros: equal weights)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..io import MtpeftError
from ..routing import MIX_MODES, RouteContext, Routing
from .base import Router, register_router


@register_router("interpolate")
class InterpolationRouter(Router):
    def __init__(self, module_names: Sequence[str], mix: str = "output"):
        names = list(module_names or [])
        if not names:
            raise MtpeftError("an interpolation router needs at least one module, e.g. ['tweet_airline-lora']")
        if len(set(names)) != len(names):
            raise MtpeftError(f"a module is named twice in {names}; name each once")
        if mix not in MIX_MODES:
            raise MtpeftError(f"interpolation router: mix must be one of {MIX_MODES}, got {mix!r}")
        super().__init__(names)
        self.mix = mix
        self.logits = nn.Parameter(torch.zeros(len(names)))

    def weights(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    def route(self, bank, ctx: RouteContext) -> Routing:
        B = ctx.batch_size if ctx is not None else None
        if B is None:
            raise MtpeftError("interpolation router: the batch size is unknown; route through bank(...) or give a "
                              "RouteContext")
        dev = bank.device
        idx = self.module_ids(dev)[None].expand(B, -1)
        return Routing(self.weights().to(dev)[None].expand(B, -1), idx, self.mix)

    def get_config(self) -> dict:
        return {"module_names": self.module_names, "mix": self.mix}
