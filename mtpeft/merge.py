"""Merging experts into one new LoRA module: weighted averages of ``Delta W``, TIES, DARE, negation.

Every method combines the experts' weight deltas ``Delta W_i = s_i B_i A_i`` (the scale folded in), never
their factors separately (averaging A and B apart adds cross terms ``B_i A_j``: peft issue #3004).

- ``uniform``: ``sum_i Delta W_i / n``; ``weighted``: ``sum_i w_i Delta W_i`` (a negative weight negates an
  expert: task-vector negation);
- ``ties`` (Yadav et al., 2023): trim each weighted ``w_i Delta W_i`` to its ``density`` largest entries by
  magnitude, elect each entry's sign by the total mass of the trimmed deltas, and average the entries that
  agree with it (the disjoint mean); weights default to 1 (the disjoint mean already averages);
- ``dare`` (Yu et al., 2024): drop each entry with probability ``1 - density`` and rescale the kept ones by
  ``1 / density`` (seeded), then the weighted sum (weights default to ``1/n``); ``dare_ties``: DARE's drop,
  then TIES' sign election and disjoint mean.

The result is a new LoRA module in the bank. A linear merge (uniform, weighted) with no ``rank`` is exact:
the factors are concatenated (rank = the sum of the ranks, the weights and scales folded into B, scale 1).
Otherwise ``Delta W`` is formed per site and truncated by SVD to ``rank`` (default: the sum of the ranks),
with the relative Frobenius error reported per site and overall. Sites where an expert does not act count
as a zero delta for it. The new module exports to peft like any LoRA (``mtpeft bank export``).
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from .io import MtpeftError

METHODS = ("uniform", "weighted", "ties", "dare", "dare_ties")
LINEAR = ("uniform", "weighted")


def merge_modules(bank, names: list[str], name: str, method: str = "uniform", weights=None,
                  density: float = 0.2, rank: int | None = None, seed: int = 0, task: str | None = None,
                  metadata: dict | None = None) -> dict:
    """Add ONE new LoRA module ``name`` to ``bank``, the merge of modules ``names``; returns a report
    (method, weights, rank, exact, relative truncation error per site and overall, sites)."""
    names, w = _check(bank, names, name, method, weights, density, rank)
    sites = _sites(bank, names)
    exact = method in LINEAR and rank is None
    if exact:
        factors, err = _concat(bank, names, w, sites), {s: 0.0 for s in sites}
        R = sum(_rank(bank, n) for n in names)
    else:
        deltas = {s: _combine(bank, names, w, s, method, density, seed) for s in sites}
        R = rank if rank is not None else sum(_rank(bank, n) for n in names)
        factors, err, energy = {}, {}, {}
        for s, d in deltas.items():
            factors[s], err[s], energy[s] = _truncate(d, R)
    _add(bank, names, name, R, factors, method, task=task, metadata=metadata)
    total = 0.0 if exact else _overall(err, energy)
    return {"name": name, "method": method, "modules": names, "weights": w, "density": density if method
            not in LINEAR else None, "seed": seed if method.startswith("dare") else None, "rank": R,
            "exact": exact, "relative_error": total, "site_errors": err, "sites": sites}


# ---- checks ----------------------------------------------------------------------------------------
def _check(bank, names, name, method, weights, density, rank):
    if method not in METHODS:
        raise MtpeftError(f"unknown merge method {method!r}; choose one of: {', '.join(METHODS)}")
    names = list(names or [])
    if not names:
        raise MtpeftError("name the modules to merge, e.g. --modules a,b")
    if len(set(names)) != len(names):
        raise MtpeftError(f"a module is named twice in {names}; name each module once (use --weights to weigh one more)")
    for n in names:
        group = bank.group_of(n)  # raises naming the bank's modules if n is missing
        if not (group.mtype.level == "linear" and group.mtype.mergeable):
            raise MtpeftError(f"module {n!r} is a {group.mtype.name!r} module with no weight delta; merging takes "
                              "LoRA, KronA and (IA)3 modules")
        if bank.record(n).merged:
            raise MtpeftError(f"module {n!r} is merged into the base weights; unmerge it first (bank.unmerge)")
    if name in bank:
        raise MtpeftError(f"the bank already has a module named {name!r}; pick another name for the merge, "
                          "or remove that module first (`mtpeft bank rm BANK NAME`)")
    if method in ("ties", "dare", "dare_ties") and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise MtpeftError(f"density must be in (0, 1] (the fraction of each delta kept), got {density!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MtpeftError(f"rank must be a positive integer (or None for an exact merge), got {rank!r}")
    if method in LINEAR and rank is None:
        odd = [n for n in names if bank.record(n).type != "lora"]
        if odd:
            raise MtpeftError(f"an exact merge concatenates LoRA factors; {odd} are not LoRA modules: give a rank "
                              "(--rank R) to merge their weight deltas by SVD")
    return names, _weights(method, weights, len(names))


def _weights(method: str, weights, n: int) -> list[float]:
    if weights is None:
        if method == "weighted":
            raise MtpeftError("the weighted merge needs one weight per module, e.g. --weights 0.7,0.3")
        return [1.0 / n] * n if method in ("uniform", "dare") else [1.0] * n
    if method == "uniform":
        raise MtpeftError("the uniform merge takes no weights; use --method weighted with --weights")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MtpeftError(f"{len(w)} weights for {n} modules; give one weight per module, in the same order")
    if not all(math.isfinite(x) for x in w):
        raise MtpeftError(f"weights must be finite numbers, got {w}")
    return w


# ---- reading the experts ---------------------------------------------------------------------------
def _sites(bank, names) -> list[str]:
    seen: dict[str, None] = {}
    for n in names:
        for s in bank.module_sites(n):
            seen.setdefault(s, None)
    return list(seen)


def _rank(bank, name: str) -> int:
    rec = bank.record(name)
    if rec.type == "lora":
        return int(rec.config["r"])
    _, stack = next(iter(bank.stacks_of(name)))
    return min(stack.d_in, stack.d_out)  # a non-LoRA delta may be full rank


def _lora_factors(bank, name: str) -> dict[str, tuple[Tensor, Tensor]]:
    """``{site: (A [r, d_in], s * B [d_out, r])}``: the scale folded into B."""
    group, j = bank.locate(name)
    out = {}
    for site, stack in bank.stacks_of(group):
        e = stack.experts[j]
        out[site] = (e.lora_A.detach(), e.lora_B.detach() * stack.scale)
    return out


def _shape(bank, site: str) -> tuple[int, int]:
    base = bank.banked_layer(site).base
    return base.out_features, base.in_features


@torch.no_grad()
def _concat(bank, names, w, sites) -> dict[str, tuple[Tensor, Tensor]]:
    """Exact linear merge: ``[A_1; ...; A_n]`` and ``[w_1 s_1 B_1, ..., w_n s_n B_n]`` (zero where absent)."""
    fac = [_lora_factors(bank, n) for n in names]
    out = {}
    for s in sites:
        d_out, d_in = _shape(bank, s)
        As, Bs = [], []
        for f, n, wi in zip(fac, names, w):
            r = _rank(bank, n)
            A, B = f.get(s, (torch.zeros(r, d_in), torch.zeros(d_out, r)))
            As.append(A.float().to(bank.device))
            Bs.append(wi * B.float().to(bank.device))
        out[s] = (torch.cat(As), torch.cat(Bs, dim=1))
    return out


@torch.no_grad()
def _delta(bank, name: str, site: str) -> Tensor:
    if site not in bank.module_sites(name):
        d_out, d_in = _shape(bank, site)
        return torch.zeros(d_out, d_in, dtype=torch.float64, device=bank.device)
    if bank.record(name).type == "lora":
        A, B = _lora_factors(bank, name)[site]
        return B.double() @ A.double()
    return bank.delta_weight(name)[site].double()


def _trim(t: Tensor, density: float) -> Tensor:
    """``t`` with all but its ``density`` largest-magnitude entries set to zero (at least one kept)."""
    k = max(1, int(density * t.numel()))
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(t)


def _dare(t: Tensor, density: float, gen: torch.Generator) -> Tensor:
    keep = torch.rand(t.shape, generator=gen, dtype=torch.float64) < density
    return torch.where(keep.to(t.device), t / density, torch.zeros_like(t))


def ties_merge(deltas: Tensor, weights: Tensor, density: float | None) -> Tensor:
    """TIES over ``deltas [n, ...]``: weigh, trim each to ``density`` (None: already sparse), elect signs by total
    mass, disjoint mean."""
    t = deltas * weights.view(-1, *[1] * (deltas.dim() - 1)).to(deltas.dtype)
    if density is not None:
        t = torch.stack([_trim(x, density) for x in t])
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0).to(t.dtype)
    agree = (torch.sign(t) == sign) & (t != 0)
    kept = torch.where(agree, t, torch.zeros_like(t))
    return kept.sum(0) / agree.sum(0).clamp_min(1).to(t.dtype)


@torch.no_grad()
def _combine(bank, names, w, site, method, density, seed) -> Tensor:
    """The merged ``Delta W`` at ``site`` (float64)."""
    D = torch.stack([_delta(bank, n, site) for n in names])
    wt = torch.tensor(w, dtype=D.dtype, device=D.device)
    if method in LINEAR:
        return torch.einsum("n,noi->oi", wt, D)
    if method == "ties":
        return ties_merge(D, wt, density)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(site.encode()))  # its own draw per site
    D = torch.stack([_dare(x, density, gen) for x in D])
    if method == "dare":
        return torch.einsum("n,noi->oi", wt, D)
    return ties_merge(D, wt, None)  # dare_ties


def _truncate(delta: Tensor, R: int) -> tuple[tuple[Tensor, Tensor], float, float]:
    """Rank-``R`` factors ``(A [R, d_in], B [d_out, R])`` of ``delta`` by SVD (zero-padded when ``R`` exceeds its
    size), the relative Frobenius error of ``B A`` and ``|delta|^2``."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(R, S.numel())
    total = float((S ** 2).sum())
    err = math.sqrt(float((S[k:] ** 2).sum()) / total) if total > 0 else 0.0
    root = S[:k].sqrt()
    A = torch.zeros(R, delta.shape[1], dtype=torch.float32, device=delta.device)
    B = torch.zeros(delta.shape[0], R, dtype=torch.float32, device=delta.device)
    A[:k] = (root[:, None] * Vh[:k]).float()
    B[:, :k] = (U[:, :k] * root).float()
    return (A, B), err, total


def _overall(err: dict[str, float], energy: dict[str, float]) -> float:
    """Relative Frobenius error over all sites together: sqrt(sum_s e_s^2 |D_s|^2 / sum_s |D_s|^2)."""
    den = sum(energy.values())
    return math.sqrt(sum(err[s] ** 2 * energy[s] for s in err) / den) if den > 0 else 0.0


# ---- composing factors (LoraHub, pi-Tuning) ---------------------------------------------------------
@torch.no_grad()
def compose_factors(bank, names: list[str], weights, name: str, method: str = "compose", task: str | None = None,
                    metadata: dict | None = None) -> dict:
    """Add ONE new LoRA module ``name`` whose factors are the weighted sums of the experts' factors:
    ``A = sum_i w_i A_i`` and ``B = sum_i w_i s_i B_i`` (scales folded into B, scale 1). This is LoraHub's and
    pi-Tuning's composition (and Poly's): the factors are summed apart, so ``B A`` holds the cross terms
    ``w_i w_j s_j B_j A_i``, unlike the linear merges above, which sum the deltas. With one expert and weight 1
    the module equals the expert. The experts must be LoRA modules of one rank. Returns (name, weights, rank)."""
    names, w = _check(bank, names, name, "weighted", weights, 0.2, None)
    odd = [n for n in names if bank.record(n).type != "lora"]
    ranks = {_rank(bank, n) for n in names if n not in odd}
    if odd or len(ranks) != 1:
        raise MtpeftError(f"composing factors takes LoRA modules of one rank; got {odd and f'non-LoRA {odd}' or ''}"
                          f"{'' if len(ranks) <= 1 else f'ranks {sorted(ranks)}'}; choose experts of one LoRA config")
    R = ranks.pop()
    fac = [_lora_factors(bank, n) for n in names]
    factors = {}
    for s in _sites(bank, names):
        d_out, d_in = _shape(bank, s)
        A = torch.zeros(R, d_in, device=bank.device)
        B = torch.zeros(d_out, R, device=bank.device)
        for f, wi in zip(fac, w):  # a loop over the experts while composing, not in a forward
            if s in f:
                A += wi * f[s][0].float().to(bank.device)
                B += wi * f[s][1].float().to(bank.device)
        factors[s] = (A, B)
    _add(bank, names, name, R, factors, method, task=task, metadata=metadata, weights=w)
    return {"name": name, "method": method, "modules": names, "weights": w, "rank": R}


# ---- the new module --------------------------------------------------------------------------------
def _add(bank, names, name, R, factors, method, task: str | None = None, metadata: dict | None = None,
         weights: list[float] | None = None) -> None:
    from .modules.lora import LoRAConfig

    cfg = LoRAConfig(r=R, alpha=float(R), dropout=0.0, target_modules=list(factors))  # scale 1: B carries it
    tensors = {}
    for s, (A, B) in factors.items():
        tensors[f"{s}.lora_A"], tensors[f"{s}.lora_B"] = A, B
    meta = {"merged_from": list(names), "merge_method": method, **({"merge_weights": weights} if weights else {}),
            **(metadata or {})}
    bank.add_from(name, "lora", cfg, tensors, task=task, metadata=meta, what=f"merged module {name!r}")
