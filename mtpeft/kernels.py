"""Apply routing weights to a stack of experts in one batched computation.

Three regimes, chosen per call:
- per example (``[B, K]``): gather each example's K experts and run a batched matmul; the cost is
  K single modules whatever the size of the bank.
- per token, small bank: one dense pass over all experts (two matmuls over ``[E*r]``), which is
  the fastest when ``E`` is small.
- per token, large bank, top-k: sort the (token, expert) pairs by expert, pad each expert's tokens
  to a common length and run one batched matmul over the experts actually selected, so the cost
  follows the selected experts and not the bank. Very skewed routing (where padding would waste
  more than it saves) loops over the used experts instead; never over tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .routing import LocalRouting

# Per-token routing over at most this many experts uses the dense pass (measured: see
# benchmarks/bench_routing.py; dense wins while E*r stays below a few times the hidden size).
DENSE_TOKEN_MAX_EXPERTS = 8


def _sparsify_rows(idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Drop columns that carry no weight in any row (dense routing given as [.., E])."""
    nz = (w != 0).sum(-1)
    k = int(nz.max()) if nz.numel() else 0
    if k >= w.shape[-1] or k == 0:
        return idx, w
    top = w.abs().topk(k, dim=-1).indices
    return idx.gather(-1, top), w.gather(-1, top)


def routed_delta(stack, x: Tensor, local: LocalRouting) -> Tensor:
    if not local.per_token:
        idx, w = _sparsify_rows(local.indices, local.weights)
        if x.dim() == 2:  # [B, d]: a single position per example
            return stack.per_example(x[:, None], idx, w.to(x.dtype), local.mix)[:, 0]
        return stack.per_example(x, idx, w.to(x.dtype), local.mix)
    if x.dim() != 3 or x.shape[:2] != local.weights.shape[:2]:
        raise ValueError(
            f"per-token routing of shape {tuple(local.weights.shape)} does not fit hidden states "
            f"{tuple(x.shape)} at this layer"
        )
    B, T, d = x.shape
    K = local.weights.shape[-1]
    x2 = x.reshape(B * T, d)
    w = local.weights.reshape(B * T, K).to(x.dtype)
    idx = local.indices.reshape(B * T, K)
    E = local.num_experts
    if E <= DENSE_TOKEN_MAX_EXPERTS or K * 2 >= E:
        dense = w.new_zeros(B * T, E).scatter_add_(1, idx, w)
        out = stack.dense_tokens(x2, dense)
    else:
        out = grouped_tokens(stack, x2, idx, w)
    return out.reshape(B, T, -1)


def stack_size(stack, ids: Tensor) -> int:
    n = getattr(stack, "num_experts", None)
    return int(n) if n is not None else int(ids.max()) + 1


def grouped_tokens(stack, x2: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """Top-k per-token routing computed per selected expert. x2 [N,d], idx/w [N,K] -> [N,d_out]."""
    N, K = idx.shape
    flat_e = idx.reshape(-1)
    flat_w = w.reshape(-1)
    tok = torch.arange(N, device=x2.device).repeat_interleave(K)
    keep = flat_w != 0
    if not bool(keep.all()):
        flat_e, flat_w, tok = flat_e[keep], flat_w[keep], tok[keep]
    out = x2.new_zeros(N, stack.d_out)
    M = flat_e.numel()
    if M == 0:
        return out
    counts_all = torch.bincount(flat_e, minlength=stack_size(stack, flat_e))
    used = counts_all.nonzero().squeeze(1)
    counts = counts_all[used]
    U = used.numel()
    C = int(counts.max())
    order = torch.argsort(flat_e)
    tok_s, w_s = tok[order], flat_w[order]
    if U * C <= 2 * M:  # balanced enough: pad and run one batched matmul over the used experts
        # Slot u*C + j holds the j-th token routed to the u-th used expert; padding slots read token 0
        # with weight 0, so one gather fills the padded input and one index_add scatters the output.
        g = torch.repeat_interleave(torch.arange(U, device=x2.device), counts)
        starts = torch.cumsum(counts, 0) - counts
        slot = g * C + (torch.arange(M, device=x2.device) - starts[g])
        slot_tok = torch.zeros(U * C, dtype=torch.long, device=x2.device)
        slot_tok[slot] = tok_s
        slot_w = x2.new_zeros(U * C)
        slot_w[slot] = w_s
        X = x2.index_select(0, slot_tok).view(U, C, -1)
        Y = stack.grouped(X, used).reshape(U * C, -1)
        out.index_add_(0, slot_tok, Y * slot_w[:, None])
        return out
    # Skewed: one matmul per used expert (a loop over experts, not tokens).
    for e, t, ws in zip(used.tolist(), tok_s.split(counts.tolist()), w_s.split(counts.tolist())):
        Y = stack.grouped(x2[t][None], torch.tensor([e], device=x2.device))[0]
        out.index_add_(0, t, Y * ws[:, None])
    return out
