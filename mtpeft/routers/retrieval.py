"""Retrieval: route each input (per example) to the expert(s) whose task centroid is nearest.

The PHATGOOSE paper's strong simple baseline. Each expert's centroid is the mean frozen-backbone pooled
embedding (``ctx.pooled()``, ``bank.pooled``) of a sample of its training inputs, made by
``mtpeft.gates.fit_centroid`` (``mtpeft gate`` / ``mtpeft train --gate``). An input goes to the ``top_k``
(default 1) experts of highest cosine similarity; their weights are a softmax over the kept similarities
divided by ``temperature`` (default 0.05, the encoder scorer's own; with top-1 the weight is 1).

Artifacts (per module): ``retrieval_centroid`` ``[H]`` (the mean of L2-normalised pooled embeddings) and
``retrieval_count`` (a one-element tensor: how many inputs were averaged).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router

CENTROID = "retrieval_centroid"
COUNT = "retrieval_count"
DEFAULT_TOP_K = 1
DEFAULT_TEMPERATURE = 0.05


def has_centroid(bank, name: str) -> bool:
    return CENTROID in bank.artifacts(name)


@register_router("retrieval")
class RetrievalRouter(Router):
    """Per example: the ``top_k`` experts nearest to the input's pooled embedding by cosine similarity."""

    def __init__(self, module_names: Sequence[str], dim: int, top_k: int = DEFAULT_TOP_K,
                 temperature: float = DEFAULT_TEMPERATURE):
        super().__init__(module_names)
        if not self.module_names:
            raise MtpeftError("retrieval router: name at least one module")
        if int(top_k) < 1:
            raise MtpeftError(f"retrieval router: top_k must be >= 1, got {top_k}")
        if not float(temperature) > 0:
            raise MtpeftError(f"retrieval router: temperature must be > 0, got {temperature}")
        self.dim, self.top_k, self.temperature = int(dim), int(top_k), float(temperature)
        self.register_buffer("centroids", torch.zeros(len(self.module_names), self.dim))

    @classmethod
    def from_bank(cls, bank, modules: Sequence[str] | None = None, top_k: int | None = None,
                  temperature: float = DEFAULT_TEMPERATURE, **options) -> RetrievalRouter:
        """A router over ``modules`` (default: every unmerged module with a centroid) from their
        ``retrieval_centroid`` artifacts; refuses modules without one, naming the command that makes it."""
        if options:
            raise MtpeftError(f"retrieval router: unknown option(s) {sorted(options)}; it takes modules, top_k "
                              "and temperature")
        if modules is None:
            modules = [r.name for r in bank.records if not r.merged and has_centroid(bank, r.name)]
            if not modules:
                raise MtpeftError("no module of the bank has a retrieval centroid; compute them with "
                                  "`mtpeft gate --bank BANK --task TASK` for each expert's task")
        modules = list(modules)
        for n in modules:
            bank.index(n)
        missing = [n for n in modules if not has_centroid(bank, n)]
        if missing:
            hints = "; ".join(f"`mtpeft gate --bank BANK --module {n} --task {bank.record(n).task or 'TASK'}`"
                              for n in missing)
            raise MtpeftError(f"module(s) {missing} have no retrieval centroid; compute it from the task's training "
                              f"inputs: {hints}")
        cents = [bank.artifact(n, CENTROID).reshape(-1).float() for n in modules]
        widths = {n: c.numel() for n, c in zip(modules, cents)}
        if len(set(widths.values())) != 1:
            raise MtpeftError(f"retrieval centroids of different widths {widths}: they were made on different "
                              "backbones; recompute them with `mtpeft gate` on this bank")
        cents = torch.stack(cents)
        router = cls(modules, cents.shape[1], DEFAULT_TOP_K if top_k is None else top_k, temperature)
        with torch.no_grad():
            router.centroids.copy_(cents)
        return router.to(bank.device)

    def similarities(self, pooled: Tensor) -> Tensor:
        """``[B, E]`` cosine similarities of pooled embeddings to the centroids."""
        if pooled.shape[-1] != self.dim:
            raise MtpeftError(f"retrieval router: centroids have width {self.dim}, the backbone's embedding has "
                              f"{pooled.shape[-1]}; the centroids were made for another backbone")
        c = F.normalize(self.centroids.to(device=pooled.device, dtype=pooled.dtype), dim=-1)
        return F.normalize(pooled, dim=-1) @ c.t()

    def route(self, bank, ctx: RouteContext) -> Routing:
        if ctx is None:
            raise MtpeftError("retrieval routing needs the batch's inputs: route through bank(...) or a scorer")
        sims = self.similarities(ctx.pooled())
        vals, pos = sims.topk(min(self.top_k, sims.shape[-1]), dim=-1)
        w = (vals / self.temperature).softmax(-1)
        return Routing(w, self.module_ids(sims.device)[pos])

    def get_config(self) -> dict:
        return {"module_names": self.module_names, "dim": self.dim, "top_k": self.top_k,
                "temperature": self.temperature}
