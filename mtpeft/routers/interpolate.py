"""Learned interpolation of named modules' parameters (pi-Tuning): weights ``softmax(logits)`` over the modules,
the same for every input, mixing their parameters (``mix='params'``: ``A = sum_i w_i A_i``, ``B = sum_i w_i B_i``).
The logits are the router's parameters (init zeros: equal weights), trained with the experts frozen."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router


@register_router("interpolate")
class InterpolationRouter(Router):
    def __init__(self, module_names: Sequence[str]):
        names = list(module_names or [])
        if not names:
            raise MtpeftError("an interpolation router needs at least one module, e.g. ['tweet_airline-lora']")
        if len(set(names)) != len(names):
            raise MtpeftError(f"a module is named twice in {names}; name each once")
        super().__init__(names)
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
        return Routing(self.weights().to(dev)[None].expand(B, -1), idx, "params")

    def get_config(self) -> dict:
        return {"module_names": self.module_names}
