"""Arrow (Ostapenko et al., 2024): zero-shot per-token routing from the experts' own weights.

Per expert and site, the prototype ``p`` is the top right singular vector of ``Delta W = B A`` (the input
direction the expert amplifies most). A token ``x`` scores ``|<x, p>| / T`` against every expert at the site
(sign-free: a singular vector has no sign), keeps the ``top_k`` best (3 by default, as peft) and mixes their
outputs with a softmax over the kept scores. No training and no data: it routes a library imported from peft.

Prototypes are computed exactly (a QR of each factor and an SVD of the small ``r x r`` core for LoRA; an
SVD of ``Delta W`` for the other types with a weight delta) and cached as module artifacts
``arrow_prototype:<site>`` (``[d_in]``, unit norm, largest entry positive), with ``arrow_prototype.digest``
(an int64 hash of the module's weights and config): a prototype is recomputed when missing or when the
module's weights changed. The router itself stores only its config (module names, top_k, temperature); its
prototypes come from the bank, so a saved router routes identically once bound to the same bank.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import Tensor

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router

KEY = "arrow_prototype"
DIGEST = "arrow_prototype.digest"


def arrow_modules(bank) -> list[str]:
    """The bank's modules Arrow can route to: those with a weight delta (LoRA, KronA, (IA)3), not merged."""
    out = []
    for r in bank.records:
        g = bank.group_of(r.name)
        if g.mtype.level == "linear" and g.mtype.mergeable and not r.merged:
            out.append(r.name)
    return out


def module_digest(bank, name: str) -> Tensor:
    """An int64 hash of module ``name``'s weights and config: prototypes are stale when it changes."""
    h = hashlib.sha1(json.dumps(bank.record(name).config, sort_keys=True).encode())
    for k, p in sorted(bank.module_parameters(name).items()):
        h.update(k.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return torch.tensor([int.from_bytes(h.digest()[:8], "little", signed=True)], dtype=torch.int64)


def _canonical_sign(v: Tensor) -> Tensor:
    """Rows of ``v`` with their largest-magnitude entry made positive (a fixed choice of the free sign)."""
    top = v.gather(-1, v.abs().argmax(-1, keepdim=True))
    return v * torch.where(top < 0, -1.0, 1.0).to(v.dtype)


@torch.no_grad()
def top_right_singular_from_factors(A: Tensor, B: Tensor) -> Tensor:
    """Top right singular vectors of ``B_i A_i`` for a batch ``A [n, r, d_in]``, ``B [n, d_out, r]`` -> ``[n, d_in]``,
    exactly and without forming ``B A``: with ``A^T = Qa Ra`` and ``B = Qb Rb``, ``B A = Qb (Rb Ra^T) Qa^T``."""
    A, B = A.double(), B.double()
    Qa, Ra = torch.linalg.qr(A.transpose(1, 2))  # [n, d_in, ka], [n, ka, r]
    _, Rb = torch.linalg.qr(B)  # [n, kb, r]
    _, _, Vh = torch.linalg.svd(Rb @ Ra.transpose(1, 2))  # core [n, kb, ka]
    return _canonical_sign((Qa @ Vh[:, 0, :, None])[..., 0])


@torch.no_grad()
def top_right_singular(delta: Tensor) -> Tensor:
    """Top right singular vector ``[d_in]`` of a dense ``Delta W [d_out, d_in]``."""
    _, _, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _canonical_sign(Vh[0])


@torch.no_grad()
def compute_prototypes(bank, name: str) -> dict[str, Tensor]:
    """``{site: prototype [d_in]}`` of module ``name`` (float32, on the bank's device)."""
    group, j = bank.locate(name)
    if group.mtype.level != "linear" or not group.mtype.mergeable:
        raise MtpeftError(f"Arrow routes modules with a weight delta (LoRA, KronA, (IA)3); {name!r} is a "
                          f"{group.mtype.name!r} module: leave it out (modules=[...])")
    out = {}
    for site, stack in bank.stacks_of(group):
        e = stack.experts[j]
        if hasattr(e, "lora_A") and hasattr(e, "lora_B"):
            v = top_right_singular_from_factors(e.lora_A[None], e.lora_B[None])[0]
        else:
            v = top_right_singular(bank.delta_weight(name)[site])
        out[site] = v.to(torch.float32)
    return out


def prototypes(bank, name: str, recompute: bool = False) -> dict[str, Tensor]:
    """Module ``name``'s cached prototypes, computed and stored as artifacts when missing or stale."""
    have = bank.artifacts(name)
    digest = module_digest(bank, name)
    sites = [s for s in bank.module_sites(name)]
    fresh = (not recompute and DIGEST in have and torch.equal(have[DIGEST], digest)
             and all(f"{KEY}:{s}" in have for s in sites))
    if fresh:
        return {s: have[f"{KEY}:{s}"] for s in sites}
    protos = compute_prototypes(bank, name)
    for s, v in protos.items():
        bank.set_artifact(name, f"{KEY}:{s}", v)
    bank.set_artifact(name, DIGEST, digest)
    return protos


@register_router("arrow")
class ArrowRouter(Router):
    """Per-token top-k over ``module_names`` (None: every module with a weight delta, looked up at each bind)."""

    per_site = True

    def __init__(self, module_names: Sequence[str] | None = None, top_k: int = 3, temperature: float = 1.0):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise MtpeftError(f"Arrow top_k must be a positive integer, got {top_k!r}")
        if not float(temperature) > 0:
            raise MtpeftError(f"Arrow temperature must be > 0, got {temperature!r}")
        super().__init__(module_names)
        if self.module_names is not None and not self.module_names:
            raise MtpeftError("Arrow needs at least one module to route to")
        self.top_k = top_k
        self.temperature = float(temperature)
        self._site: dict[str, tuple[Tensor, Tensor]] = {}  # site -> (prototypes [E_s, d_in], bank ids [E_s])
        self._params: list[Tensor] = []
        self._versions: tuple[int, ...] = ()

    @classmethod
    def from_bank(cls, bank, modules: list[str] | None = None, top_k: int | None = None,
                  temperature: float = 1.0, **options) -> ArrowRouter:
        if options:
            raise MtpeftError(f"unknown Arrow option(s) {sorted(options)}; Arrow takes top_k and temperature")
        names = list(modules) if modules is not None else arrow_modules(bank)
        if not names:
            raise MtpeftError("the bank holds no module Arrow can route to (LoRA, KronA or (IA)3, not merged); "
                              "train or import some experts first (`mtpeft train`, `mtpeft bank import`)")
        router = cls(names, top_k=3 if top_k is None else top_k, temperature=temperature)
        router.check_bank(bank)  # computes (or reads) the prototypes now
        return router

    # ---- binding: prototypes per site ------------------------------------------------------------
    def check_bank(self, bank) -> None:
        # Weights edited in place (training) do not bump the bank's version: their tensors' versions do.
        if self._bound is not None and self._versions != tuple(p._version for p in self._params):
            self._bound = None
        super().check_bank(bank)

    def bind(self, bank) -> None:
        names = self.module_names if self.module_names is not None else arrow_modules(bank)
        if self.module_names is not None:
            super().bind(bank)
        ids = bank.ids(names).tolist()
        per_site: dict[str, list[tuple[int, Tensor]]] = {}
        for name, i in zip(names, ids):
            for site, p in prototypes(bank, name).items():
                per_site.setdefault(site, []).append((i, p))
        dev = bank.device
        self._site = {s: (torch.stack([p for _, p in v]).to(dev), torch.tensor([i for i, _ in v], device=dev))
                      for s, v in per_site.items()}
        self._params = [p for n in names for p in bank.module_parameters(n).values()]
        self._versions = tuple(p._version for p in self._params)

    # ---- routing ---------------------------------------------------------------------------------
    def logits(self, site: str, x: Tensor) -> Tensor | None:
        """``|<x, p_e>| / T`` ``[..., E_s]`` over the experts acting at ``site`` (one matmul), or None."""
        if self._bound is None:
            raise MtpeftError("Arrow router is not bound to a bank yet: route through bank.route(router) or "
                              "bank(ids, mask, routing=router), or build it with ArrowRouter.from_bank(bank)")
        entry = self._site.get(site)
        if entry is None:
            return None
        P = entry[0]
        if P.dtype != x.dtype:
            P = P.to(x.dtype)
        return (x @ P.t()).abs_().div_(self.temperature)

    def at_site(self, site: str, x: Tensor, ctx: RouteContext) -> Routing | None:
        scores = self.logits(site, x)
        if scores is None:
            return None
        k = min(self.top_k, scores.shape[-1])
        vals, idx = scores.topk(k, dim=-1)
        return Routing(vals.softmax(-1), self._site[site][1][idx])

    def get_config(self) -> dict:
        return {"module_names": self.module_names, "top_k": self.top_k, "temperature": self.temperature}
