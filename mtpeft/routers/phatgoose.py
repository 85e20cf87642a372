"""PHATGOOSE: post-hoc, per-token, per-layer routing over a library of experts (Muqeeth et al., 2024).

Two routers share this file:

- ``PhatgooseGates``: the training-time router of ONE expert. Each of its sites holds a gate vector ``v``
  (zero init) and the expert's output is scaled per token by ``sigmoid(<x, v>)``, ``x`` the site's input.
  Only the gates train (``mtpeft.gates.fit_gates``); the expert and the backbone stay frozen.
- ``PhatgooseRouter`` (``"phatgoose"``): inference over many gated experts. Per token and per site:
  ``scores_e = LN(x) . LN(v_e) / sqrt(d)`` (LayerNorm without affine on the token and on each gate), keep
  the top-k (default 2), softmax over the kept; the bank mixes the experts' outputs through its batched
  per-token kernels (a sparse ``Routing`` with ``indices``).

Artifacts (per module, through the bank's artifact API, saved with the bank): one tensor per site the module
acts on, key ``phatgoose_gate:<site>`` (``gate_key(site)``), shape ``[d_in]`` of that site's linear layer.
``gates_of(bank, name)`` reads them back as ``{site: tensor}``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router

GATE = "phatgoose_gate"
DEFAULT_TOP_K = 2


def gate_key(site: str) -> str:
    """The artifact name of a module's gate at ``site``."""
    return f"{GATE}:{site}"


def gates_of(bank, name: str) -> dict[str, Tensor]:
    """``{site: gate [d_in]}`` of module ``name`` (empty when it was never gated)."""
    prefix = GATE + ":"
    return {k[len(prefix):]: v for k, v in bank.artifacts(name).items() if k.startswith(prefix)}


def has_gates(bank, name: str) -> bool:
    return bool(gates_of(bank, name))


def gate_sites(bank, name: str) -> list[tuple[str, int]]:
    """``(site, d_in)`` of every linear layer module ``name`` acts on; refuses modules that act elsewhere."""
    rec = bank.record(name)
    group = bank.group_of(name)
    if group.mtype.level != "linear":
        raise MtpeftError(f"PHATGOOSE gates a module's output at linear layers; module {name!r} is a {rec.type!r} "
                          f"module acting on {', '.join(group.sites)}; gate LoRA, (IA)3, KronA or adapter modules")
    return [(s, bank.banked_layer(s).base.in_features) for s in group.sites]


def _missing_gates(bank, names: Sequence[str]) -> MtpeftError:
    hints = []
    for n in names:
        task = bank.record(n).task
        hints.append(f"`mtpeft gate --bank BANK --module {n} --task {task or 'TASK'}`")
    return MtpeftError(f"module(s) {list(names)} have no PHATGOOSE gates; gate each on its task's data first: "
                       + "; ".join(hints) + " (or train with `mtpeft train ... --gate`)")


class PhatgooseGates(Router):
    """Training router of one expert: its output at each site scaled per token by ``sigmoid(<x, v_site>)``."""

    per_site = True

    def __init__(self, module_name: str, sites: Sequence[str], dims: Sequence[int]):
        if len(sites) != len(dims) or not sites:
            raise MtpeftError(f"PHATGOOSE gates need one input width per site, got {len(sites)} sites and "
                              f"{len(dims)} widths")
        super().__init__([module_name])
        self.sites = list(sites)
        self.dims = [int(d) for d in dims]
        self._pos = {s: i for i, s in enumerate(self.sites)}
        self.gates = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in self.dims])

    @classmethod
    def for_module(cls, bank, name: str) -> PhatgooseGates:
        """Zero gates at every site of module ``name``, on the bank's device."""
        sites = gate_sites(bank, name)
        return cls(name, [s for s, _ in sites], [d for _, d in sites]).to(bank.device)

    def at_site(self, site: str, x: Tensor, ctx: RouteContext) -> Routing | None:
        i = self._pos.get(site)
        if i is None:  # the expert does not act here: nothing does
            return None
        w = torch.sigmoid(x @ self.gates[i].to(x.dtype)).unsqueeze(-1)  # [B, T, 1]
        idx = self.module_ids(x.device).view(*([1] * (w.dim() - 1)), 1).expand(w.shape)
        return Routing(w, idx)

    def gate_tensors(self) -> dict[str, Tensor]:
        return {s: g.detach().cpu().clone() for s, g in zip(self.sites, self.gates)}

    def get_config(self) -> dict:
        return {"module_name": self.module_names[0], "sites": self.sites, "dims": self.dims}


@register_router("phatgoose")
class PhatgooseRouter(Router):
    """Per token, per site: top-k of ``LN(x) . LN(v_e) / sqrt(d)`` over the gated experts acting at the site,
    softmax over the kept. ``members[i]``: positions in ``module_names`` of the experts gated at ``sites[i]``.
    The gates are buffers (``gates_<i>``: ``[len(members[i]), dims[i]]``), so ``save``/``load`` keep them."""

    per_site = True

    def __init__(self, module_names: Sequence[str], sites: Sequence[str], dims: Sequence[int],
                 members: Sequence[Sequence[int]], top_k: int = DEFAULT_TOP_K):
        super().__init__(module_names)
        if not (len(sites) == len(dims) == len(members)) or not sites:
            raise MtpeftError("phatgoose router: sites, dims and members must be non-empty lists of one length")
        if int(top_k) < 1:
            raise MtpeftError(f"phatgoose router: top_k must be >= 1, got {top_k}")
        n = len(self.module_names)
        if any(not m or min(m) < 0 or max(m) >= n for m in members):
            raise MtpeftError(f"phatgoose router: members must be non-empty lists of positions in module_names (0..{n - 1})")
        self.sites = list(sites)
        self.dims = [int(d) for d in dims]
        self.members = [[int(j) for j in m] for m in members]
        self.top_k = int(top_k)
        self._pos = {s: i for i, s in enumerate(self.sites)}
        for i, (m, d) in enumerate(zip(self.members, self.dims)):
            self.register_buffer(f"gates_{i}", torch.zeros(len(m), d))
        self._site_ids: list[Tensor] = []
        self._normed: dict[tuple, Tensor] = {}

    @classmethod
    def from_bank(cls, bank, modules: Sequence[str] | None = None, top_k: int | None = None,
                  **options) -> PhatgooseRouter:
        """A router over ``modules`` (default: every unmerged module of the bank that has gates), built from
        their ``phatgoose_gate:<site>`` artifacts; refuses modules without gates, naming the command to run."""
        if options:
            raise MtpeftError(f"phatgoose router: unknown option(s) {sorted(options)}; it takes modules and top_k")
        if modules is None:
            modules = [r.name for r in bank.records if not r.merged and has_gates(bank, r.name)]
            if not modules:
                raise _missing_gates(bank, bank.names) if len(bank) else MtpeftError(
                    "the bank is empty: train experts first (`mtpeft train ... --gate`)")
        modules = list(modules)
        for n in modules:
            bank.index(n)
        missing = [n for n in modules if not has_gates(bank, n)]
        if missing:
            raise _missing_gates(bank, missing)
        sites: dict[str, list[tuple[int, Tensor]]] = {}
        for j, n in enumerate(modules):
            for s, g in gates_of(bank, n).items():
                sites.setdefault(s, []).append((j, g))
        names, dims, members = list(sites), [], []
        for s in names:
            d = {int(g.numel()) for _, g in sites[s]}
            if len(d) != 1:
                raise MtpeftError(f"phatgoose: the gates at {s} have different widths {sorted(d)}; re-gate the modules")
            dims.append(d.pop())
            members.append([j for j, _ in sites[s]])
        router = cls(modules, names, dims, members, DEFAULT_TOP_K if top_k is None else top_k)
        with torch.no_grad():
            for i, s in enumerate(names):
                getattr(router, f"gates_{i}").copy_(torch.stack([g.reshape(-1).float() for _, g in sites[s]]))
        return router.to(bank.device)

    def bind(self, bank) -> None:
        super().bind(bank)
        ids = self.module_ids()
        self._site_ids = [ids[torch.tensor(m, dtype=torch.long)] for m in self.members]
        self._normed = {}

    def _gates(self, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """LN(gates) at site ``i`` in ``x``'s dtype and device, and their experts' bank ids (cached until the
        router is rebound, moved or loaded)."""
        key = (i, x.device, x.dtype)
        got = self._normed.get(key)
        if got is None:
            raw = getattr(self, f"gates_{i}")
            g = F.layer_norm(raw.float(), (raw.shape[-1],)).to(device=x.device, dtype=x.dtype)
            got = self._normed[key] = (g, self._site_ids[i].to(x.device))
        return got

    def _apply(self, fn, *args, **kw):  # a move or cast of the buffers drops the cached normalised gates
        self._normed = {}
        return super()._apply(fn, *args, **kw)

    def _load_from_state_dict(self, *args, **kw):
        self._normed = {}
        return super()._load_from_state_dict(*args, **kw)

    def logits(self, site: str, x: Tensor) -> Tensor | None:
        """``[.., E_site]`` scores of every expert gated at ``site`` (None where none is)."""
        i = self._pos.get(site)
        if i is None:
            return None
        d = self.dims[i]
        if x.shape[-1] != d:
            raise MtpeftError(f"phatgoose router: gates at {site} have width {d}, the layer's input has "
                              f"{x.shape[-1]}; the gates were made for another backbone")
        g, _ = self._gates(i, x)
        return F.layer_norm(x, (d,)) @ g.t() / math.sqrt(d)

    def at_site(self, site: str, x: Tensor, ctx: RouteContext) -> Routing | None:
        scores = self.logits(site, x)
        if scores is None:
            return None
        _, ids = self._gates(self._pos[site], x)
        vals, pos = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)
        return Routing(vals.softmax(-1), ids[pos])

    def get_config(self) -> dict:
        return {"module_names": self.module_names, "sites": self.sites, "dims": self.dims, "members": self.members,
                "top_k": self.top_k}
