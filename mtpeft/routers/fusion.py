"""AdapterFusion (Pfeiffer et al., 2021): attention over the outputs of frozen bottleneck adapters, per token.

At each fused site (an output projection where the adapters act), with ``u_i`` the output adapter ``i`` alone
adds there (``AdapterStack.expert_outputs``: its scaled up-projection, no residual) and ``h`` what the adapters
read (``stack.source``: the sublayer's output for sequential adapters, its input for parallel ones)::

    q = Q h + b_Q                    k_i = K u_i + b_K                 v_i = V u_i   (V has no bias)
    a = softmax(dropout(q . k_i))    y <- y + sum_i a_i v_i

as adapter-hub/adapters' ``BertFusion`` with its default ("dynamic") config: query, key and value maps, the value
applied before the softmax-weighted sum, the residual added after, temperature 1, dropout on the scores (the
backbone's attention dropout there, 0.1 for BERT; ``dropout`` here). ``Q`` and ``K`` start N(0, 0.02) with zero
biases, ``V`` as the identity (the reference adds 1e-6 off the diagonal; exactly the identity here, so one fused
adapter at init IS that adapter, and the regulariser starts at 0). The regulariser towards the identity,
``sum_sites ||V - I||^2``, is ``regulariser()``; training adds it times 0.01 (the reference's weight) through the
``regularised`` objective. The query is the adapters' input ``h`` (the reference's ``query_before_ln``): the
layer-normed residual sum the reference can also use is not visible at the output projection.

Computed in a cheaper order with the same value: ``q . k_i = (q K) . u_i + q . b_K`` and
``sum_i a_i V u_i = V sum_i a_i u_i`` (``V`` is linear), so a token costs three ``d x d`` products whatever the
number of adapters, not ``2 n + 1``.

The router is per site and rewrites the site's output (``edits_output``): ``at_site`` returns None (no adapter acts
alone), ``site_output`` adds the fused output. Its state (``Q``, ``K``, ``V``, biases, stacked over sites) saves
with ``router.save(dir)``; ``mtpeft.skills.fusion`` keeps it in the bank's directory (``routers/<name>/``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router

INIT_STD = 0.02  # Q and K, as the reference's BERT init
ADAPTER_TYPES = ("houlsby", "pfeiffer", "parallel", "scaled_parallel")


def _names(what: str, items, example: str) -> list[str]:
    items = list(items or [])
    if not items or not all(isinstance(x, str) and x for x in items):
        raise MtpeftError(f"AdapterFusion needs {what} as a non-empty list of names, got {items!r}; e.g. [{example!r}]")
    if len(set(items)) != len(items):
        raise MtpeftError(f"AdapterFusion: {what} name one twice in {items}; name each once")
    return items


@register_router("fusion")
class FusionRouter(Router):
    """``adapters``: the fused bottleneck adapters (one group of the bank); ``sites``: where they act (one fusion
    layer each); ``hidden``: the width they write; ``dropout`` on the attention scores; ``seed`` of Q and K."""

    per_site = True
    edits_output = True

    def __init__(self, adapters: Sequence[str], sites: Sequence[str], hidden: int, dropout: float = 0.1,
                 seed: int = 0):
        adapters = _names("adapters", adapters, "sst2-pfeiffer")
        sites = _names("sites", sites, "encoder.layer.0.output.dense")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise MtpeftError(f"AdapterFusion: hidden must be a positive integer (the adapters' width), got {hidden!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise MtpeftError(f"AdapterFusion: dropout must be in [0, 1), got {dropout!r}")
        super().__init__(adapters)
        self.sites, self.hidden, self.dropout_p, self.seed = sites, hidden, float(dropout), int(seed)
        L, d = len(sites), hidden
        gen = torch.Generator().manual_seed(self.seed)
        self.query_weight = nn.Parameter(torch.empty(L, d, d).normal_(0.0, INIT_STD, generator=gen))
        self.query_bias = nn.Parameter(torch.zeros(L, d))
        self.key_weight = nn.Parameter(torch.empty(L, d, d).normal_(0.0, INIT_STD, generator=gen))
        self.key_bias = nn.Parameter(torch.zeros(L, d))
        self.value_weight = nn.Parameter(torch.eye(d).expand(L, d, d).clone())
        self.score_dropout = nn.Dropout(self.dropout_p)
        self._site_pos = {s: i for i, s in enumerate(sites)}
        self._group: str | None = None
        self._positions: Tensor | None = None

    # ---- binding to the bank -----------------------------------------------------------------
    def bind(self, bank) -> None:
        super().bind(bank)
        group = bank.common_group(self.module_names, "the adapters AdapterFusion fuses,")
        if group.mtype.name not in ADAPTER_TYPES:
            raise MtpeftError(f"AdapterFusion fuses bottleneck adapters ({', '.join(ADAPTER_TYPES)}); "
                              f"{self.module_names} are {group.mtype.name!r} modules")
        if sorted(group.sites) != sorted(self.sites):
            raise MtpeftError(f"the fusion layers were made for sites {self.sites[:2]}..., the adapters act on "
                              f"{group.sites[:2]}...; build the fusion over these adapters again")
        for site, stack in bank.stacks_of(group):
            if stack.d_out != self.hidden:
                raise MtpeftError(f"the fusion layers are {self.hidden} wide, the adapters at {site} write "
                                  f"{stack.d_out}; build the fusion over these adapters again")
        self._group = group.key
        self._positions = torch.tensor([group.members.index(n) for n in self.module_names], dtype=torch.long)

    # ---- routing -----------------------------------------------------------------------------
    def at_site(self, site: str, x: Tensor, ctx: RouteContext) -> Routing | None:
        return None  # no adapter acts alone: site_output adds their fusion

    def site_output(self, layer, x: Tensor, y: Tensor, ctx: RouteContext | None) -> Tensor:
        """``y`` plus the fused adapters' output at ``layer`` (a ``BankedLinear``); ``y`` at sites not fused."""
        pos = self._site_pos.get(layer.site)
        if pos is None:
            return y
        if self._group is None or self._group not in layer.stacks:
            raise MtpeftError(f"AdapterFusion at {layer.site}: the adapters {self.module_names} are not bound here; "
                              "route through bank.route(router) (which binds the router to the bank)")
        stack = layer.stacks[self._group]
        src = stack.source(x, y)
        return y + self.fuse(pos, src, stack.expert_outputs(src, self._positions))

    def fuse(self, pos: int, query: Tensor, ups: Tensor) -> Tensor:
        """The fusion layer ``pos``: query ``[..., d]``, the adapters' outputs ``[..., n, d]`` -> ``[..., d]``."""
        Wq, bq = self.query_weight[pos].to(ups), self.query_bias[pos].to(ups)
        Wk, bk = self.key_weight[pos].to(ups), self.key_bias[pos].to(ups)
        Wv = self.value_weight[pos].to(ups)
        q = F.linear(query, Wq, bq)
        # q . (K u_i + b_K) == (q K) . u_i + q . b_K: one d x d product, not one per adapter
        scores = torch.einsum("...d,...nd->...n", q @ Wk, ups) + (q * bk).sum(-1, keepdim=True)
        probs = self.score_dropout(scores).softmax(-1)
        return F.linear(torch.einsum("...n,...nd->...d", probs, ups), Wv)  # sum_i a_i V u_i

    @torch.no_grad()
    def attention(self, pos: int, query: Tensor, ups: Tensor) -> Tensor:
        """The softmax weights over the adapters ``[..., n]`` at fusion layer ``pos`` (no dropout): for reports."""
        q = F.linear(query, self.query_weight[pos].to(ups), self.query_bias[pos].to(ups))
        k = F.linear(ups, self.key_weight[pos].to(ups), self.key_bias[pos].to(ups))
        return torch.einsum("...d,...nd->...n", q, k).softmax(-1)

    # ---- training ----------------------------------------------------------------------------
    def regulariser(self) -> Tensor:
        """``sum_sites ||V - I||_F^2``: zero at init, it keeps the value maps near the identity."""
        eye = torch.eye(self.hidden, device=self.value_weight.device, dtype=self.value_weight.dtype)
        return (self.value_weight - eye).pow(2).sum()

    def get_config(self) -> dict:
        return {"adapters": self.module_names, "sites": self.sites, "hidden": self.hidden, "dropout": self.dropout_p,
                "seed": self.seed}
