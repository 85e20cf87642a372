"""Banked layers: a frozen ``nn.Linear`` plus the stacks of the bank's modules that act on it.

The routing in force for one forward lives in a ``BankState`` shared by the bank and its layers. A layer
asks the state once per forward for the routing at its site (a per-site router is called here, once, and
its answer serves every group of stacks at the site), then restricts it to each group it holds. A router that
rewrites outputs (``edits_output``, AdapterFusion) gets the layer's output after that (``site_output``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import MtpeftError
from ..kernels import routed_delta
from ..routing import LocalRouting, RouteContext, Routing, check_routing


class BankState:
    """What is in scope for one forward pass: the routing (a ``Routing``) or a router, its context, and
    whether the bare backbone runs (``bare``: no module acts, merged ones included)."""

    def __init__(self):
        self.routing: Routing | None = None
        self.router: Any = None  # an object with ``per_site`` and ``route(bank, ctx)`` / ``at_site(site, x, ctx)``
        self.ctx: RouteContext | None = None
        self.bare = False
        self.local: dict[str, LocalRouting | None] = {}
        self.stash: dict[str, Tensor] = {}
        self.resolved = False  # a per-example router in scope has been asked once (its answer is in routing)

    @property
    def active(self) -> bool:
        return not self.bare and (self.routing is not None or self.router is not None)

    def snapshot(self) -> tuple:
        return (self.routing, self.router, self.ctx, self.bare, self.local, self.stash, self.resolved)

    def restore(self, snap: tuple) -> None:
        (self.routing, self.router, self.ctx, self.bare, self.local, self.stash, self.resolved) = snap


class BankedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the stacks of the bank's modules that act on it.

    While modules are merged into ``base.weight``, the weight before the first merge is kept (``original``)
    so the bare backbone can still run (``bank.bare()``), and so unmerging the last one restores it exactly.
    """

    def __init__(self, base: nn.Linear, site: str, bank):
        super().__init__()
        self.base = base
        self.site = site
        self.stacks = nn.ModuleDict()
        self.merged: set[str] = set()  # names of the modules merged into base.weight
        self.register_buffer("original", None, persistent=False)
        self.register_buffer("original_bias", None, persistent=False)
        object.__setattr__(self, "_bank", bank)  # a back-reference, not a submodule

    @property
    def weight(self) -> Tensor:  # so code that reads layer.weight (e.g. dtype checks) still works
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    # ---- merging ------------------------------------------------------------------------------
    @torch.no_grad()
    def note_merge(self, name: str) -> None:
        """Call before folding module ``name`` into ``base.weight``."""
        if not self.merged:
            self.original = self.base.weight.detach().clone()
            self.original_bias = None if self.base.bias is None else self.base.bias.detach().clone()
        self.merged.add(name)

    @torch.no_grad()
    def note_unmerge(self, name: str) -> None:
        """Call after taking module ``name`` out of ``base.weight``: the last one out restores it exactly."""
        self.merged.discard(name)
        if not self.merged and self.original is not None:
            self.base.weight.copy_(self.original)
            if self.original_bias is not None:
                self.base.bias.copy_(self.original_bias)
            self.original = self.original_bias = None

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        bank = self._bank
        state = bank.state
        if state.bare:
            return self.base(x) if self.original is None else F.linear(x, self.original, self.original_bias)
        if not state.active:  # bare pass: nothing reads the stash, so keep no activations
            return self.base(x)
        if self.site in bank._stash_sites:
            state.stash[self.site] = x
        if not len(self.stacks):  # a site wrapped only for its stashed input
            return self.base(x)
        y = self._routed(bank, state, x)
        if getattr(state.router, "edits_output", False):  # a router that rewrites the site's output (AdapterFusion)
            y = state.router.site_output(self, x, y, state.ctx)
        return y

    def _routed(self, bank, state: BankState, x: Tensor) -> Tensor:
        """The base layer plus the stacks under the routing in force at this site."""
        site_routing = self._site_routing(state, x)
        if site_routing is None:  # the router says: nothing at this site
            return self.base(x)
        per_site = state.router is not None and state.router.per_site
        # Stacks compose in insertion order. Leading input-scaling stacks ((IA)3 on the FFN output,
        # W (x * l)) fold into the base matmul: W (x (1 + dl)) + b, one matmul instead of two.
        scaled, rest = None, []
        for key, stack in self.stacks.items():
            if per_site:
                local = bank.localize(key, site_routing)
            else:
                if key not in state.local:
                    state.local[key] = bank.localize(key, site_routing)
                local = state.local[key]
            if local is None:
                continue
            if not rest and getattr(stack, "input_scaling", False):
                scaled = stack.scaled_input(x, local) if scaled is None else scaled + routed_delta(stack, x, local)
            else:
                rest.append((stack, local))
        y = self.base(x if scaled is None else scaled)
        for stack, local in rest:
            y = stack(x, y, local)
        return y

    def _site_routing(self, state: BankState, x: Tensor) -> Routing | None:
        router = state.router
        if router is None or not router.per_site:
            return state.routing
        r = router.at_site(self.site, x, state.ctx)
        if r is None:
            return None
        if not isinstance(r, Routing):
            raise MtpeftError(f"router {type(router).__name__}.at_site returned {type(r).__name__} at {self.site}; "
                              "return a Routing (or None for nothing at this site)")
        if r.batch_size != x.shape[0] or (r.per_token and r.weights.shape[1] != x.shape[1]):
            raise MtpeftError(f"router {type(router).__name__} at {self.site}: routing of shape "
                              f"{tuple(r.weights.shape)} does not fit the input {tuple(x.shape[:2])} "
                              "([batch, K] or [batch, tokens, K])")
        check_routing(r, len(self._bank))
        return r
