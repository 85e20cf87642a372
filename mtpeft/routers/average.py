"""The average of the experts' outputs: every example goes to every module with weight 1/E (dense, per example).

The simplest zero-shot baseline over a library (next to merging, which averages the parameters instead:
``mtpeft.merge``). Its cost grows with the library: every expert runs on every token.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router


def _unmerged(bank) -> list[str]:
    return [r.name for r in bank.records if not r.merged]


@register_router("average")
class AverageRouter(Router):
    """Uniform weights over ``module_names`` (None: every module of the bank not merged, looked up at each bind)."""

    def __init__(self, module_names: Sequence[str] | None = None):
        super().__init__(module_names)
        if self.module_names is not None and not self.module_names:
            raise MtpeftError("averaging needs at least one module")
        self._all: torch.Tensor | None = None

    @classmethod
    def from_bank(cls, bank, modules: list[str] | None = None, top_k: int | None = None, **options) -> AverageRouter:
        """``top_k`` is ignored (every module is used)."""
        if options:
            raise MtpeftError(f"unknown option(s) {sorted(options)} for the average router; it takes none")
        names = list(modules) if modules is not None else _unmerged(bank)
        if not names:
            raise MtpeftError("the bank holds no module to average; train or import some experts first")
        router = cls(names)
        router.check_bank(bank)
        return router

    def bind(self, bank) -> None:
        super().bind(bank)
        self._all = bank.ids(_unmerged(bank)) if self.module_names is None else None

    def route(self, bank, ctx: RouteContext) -> Routing:
        B = ctx.batch_size if ctx is not None else None
        if B is None:
            raise MtpeftError("average router: the batch size is unknown; route through bank(...) or give a RouteContext")
        ids = (self._all if self._all is not None else self.module_ids()).to(bank.device)
        if not ids.numel():
            raise MtpeftError("average router: the bank holds no module to average")
        w = torch.full((B, ids.numel()), 1.0 / ids.numel(), device=bank.device)
        return Routing(w, ids[None].expand(B, -1))
