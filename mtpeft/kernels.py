"""Apply routing weights to a stack of experts in one batched computation.

Three regimes, chosen per call:
- per example (``[B, K]``): gather each example's K experts and run a batched matmul; the cost is
  K single modules whatever the size of the bank.
- per token, dense: one pass over all experts (for low-rank stacks two matmuls over ``[E*r]``),
  the fastest while the bank is small or each expert is cheap next to moving a token around.
- per token, grouped (top-k): sort the (token, expert) pairs by expert, pad each expert's tokens
  to a common length and run one batched matmul over the experts actually selected, so the cost
  follows the selected experts and not the bank. Very skewed routing (where padding to the largest
  count would more than double the work) pads each expert to a power of two instead: a few batched
  calls, one per distinct length; never a loop over experts or tokens.

The per-token choice is cost based (``token_path``): each stack states what one expert costs per
token in the dense pass and per (token, selected expert) pair in the grouped one (``token_costs``),
and the grouped path pays on top for moving every pair's input and output (gathered into padded
slots, gathered back) and a fixed overhead per call. Both paths give the same outputs (up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import MtpeftError
from .routing import LocalRouting

# Cost model of the per-token dispatch, in multiply-add equivalents per token:
#   dense   = fixed + E * per_expert
#   grouped = K * (per_pair + MOVE_COST * (d_src + d_out)) + CALL_COST / tokens
# with ``per_expert``/``per_pair``/``fixed`` from the stack (``token_costs``). MOVE_COST: gathering one
# element of a routed pair's input and one of its output (padding, gather, weighted gather-back)
# next to one multiply-add of a large GEMM; CALL_COST: sorting and the dozen small kernels of one
# grouped call. Measured on CPU, fp32, one thread (a shared 2-core machine), by
# benchmarks/bench_kernels.py, which also fits MOVE_COST and CALL_COST to its timings (``best_fit_constants``
# in benchmarks/results/kernel_threshold.json): re-fit after a run on the machine that matters.
# Last fit: 2026-12, heap allocator (how it fares: ``summary`` in kernel_threshold.json).
MOVE_COST = 160.0
CALL_COST = 1.6e7
# Efficiency of each stack's products next to one large GEMM (same source):
GROUPED_LOWRANK = 1.0  # [U, C, d] x [U, d, r] batched products: as fast per multiply-add as one GEMM
IA3_DENSE = 2.0  # (IA)3's dense pass: the [N, E] x [E, d] mix plus an elementwise pass over [N, d]
KRONA_DENSE = 10.0  # KronA's dense pass reshuffles an [a_in, E*b_out] intermediate per token
KRONA_GROUPED = 20.0  # KronA grouped: a batch of tiny [a_in, b_in] x [b_in, b_out] products per token

# Legacy override, for tests and benchmarks that force a path: an int restores the old fixed rule
# (dense iff E <= DENSE_TOKEN_MAX_EXPERTS or 2K >= E; 0 forces the grouped path, a huge value the
# dense one). None (the default): the cost-based choice.
DENSE_TOKEN_MAX_EXPERTS: int | None = None


@dataclass(frozen=True)
class TokenCosts:
    """What a stack's experts cost, in multiply-add equivalents per token (see ``token_path``)."""

    per_expert: float  # dense pass: each expert of the bank, per token
    per_pair: float  # grouped path: each (token, selected expert) pair, not counting moving the data
    fixed: float = 0.0  # dense pass: paid once per token whatever the bank's size


def token_costs(stack) -> TokenCosts | None:
    """The stack's own ``token_costs()`` if it has one, else an estimate from its shape (low-rank,
    (IA)3 and KronA stacks are recognised by their attributes); None if nothing is known."""
    own = getattr(stack, "token_costs", None)
    if callable(own):
        return own()
    d_in, d_out = getattr(stack, "d_in", None), getattr(stack, "d_out", None)
    if d_in is None or d_out is None:
        return None
    if isinstance(getattr(stack, "rank", None), int):  # LoRA, bottleneck adapters: down [r,d_in], up [d_out,r]
        c = float(stack.rank * (d_in + d_out))
        return TokenCosts(per_expert=c, per_pair=GROUPED_LOWRANK * c)
    if isinstance(getattr(stack, "feedforward", None), bool):  # (IA)3
        if stack.feedforward:  # W (x * l): both paths mix x * dl, then the base matmul runs once per token
            return TokenCosts(per_expert=IA3_DENSE * d_in, per_pair=float(d_in))
        return TokenCosts(per_expert=IA3_DENSE * d_out, per_pair=float(d_out))  # y * l
    if all(hasattr(stack, a) for a in ("a_in", "a_out", "b_out")):  # KronA: A X B^T per token
        c = float(d_in * stack.b_out + stack.a_out * stack.a_in * stack.b_out)
        return TokenCosts(per_expert=KRONA_DENSE * c, per_pair=KRONA_GROUPED * c)
    return None


def token_path(stack, tokens: int, num_experts: int, k: int, d_src: int | None = None) -> str:
    """``"dense"`` or ``"grouped"``: the cheaper per-token path for ``tokens`` tokens routed to ``k``
    of the stack's ``num_experts`` experts each (``d_src``: the width of what the experts read,
    by default the stack's input width)."""
    E, K = num_experts, k
    if DENSE_TOKEN_MAX_EXPERTS is not None:  # the fixed rule, when a caller forces it
        return "dense" if E <= DENSE_TOKEN_MAX_EXPERTS or 2 * K >= E else "grouped"
    if 2 * K >= E:  # the grouped path would touch about as many experts as the dense one
        return "dense"
    c = token_costs(stack)
    if c is None:  # a stack that states no costs: the old rule of thumb
        return "dense" if E <= 8 else "grouped"
    d_src = d_src if d_src is not None else stack.d_in
    dense = c.fixed + E * c.per_expert
    d_delta = getattr(stack, "delta_out", stack.d_out)
    grouped = K * (c.per_pair + MOVE_COST * (d_src + d_delta)) + CALL_COST / max(tokens, 1)
    return "dense" if dense <= grouped else "grouped"


def _sparsify_rows(idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Drop columns that carry no weight in any row (dense routing given as [.., E])."""
    nz = (w != 0).sum(-1)
    k = int(nz.max()) if nz.numel() else 0
    if k >= w.shape[-1] or k == 0:
        return idx, w
    top = w.abs().topk(k, dim=-1).indices
    return idx.gather(-1, top), w.gather(-1, top)


def routed_delta(stack, x: Tensor, local: LocalRouting, path: str | None = None) -> Tensor:
    """The stack's routed output for the source ``x``. ``path`` ("dense"/"grouped") forces the
    per-token path (benchmarks); None lets ``token_path`` choose."""
    if not local.per_token:
        single = getattr(stack, "single", None)
        if single is not None and local.single_expert is not None:  # one expert for all: plain matmuls
            return single(x, local.single_expert)
        if local.rows is not None:  # one mixture per distinct task (Poly, MHR): parameters mixed per row
            per_task = getattr(stack, "per_task", None)
            if per_task is None:
                raise MtpeftError(f"{type(stack).__name__} cannot mix its parameters per task (factored routing); "
                                  "skills (Poly, MHR) need low-rank modules such as LoRA")
            if x.dim() == 2:
                return per_task(x[:, None], local.indices, local.weights.to(x.dtype), local.rows)[:, 0]
            return per_task(x, local.indices, local.weights.to(x.dtype), local.rows)
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
    if path is None:
        path = token_path(stack, B * T, E, K, d)
    if path == "dense":
        out = dense_tokens(stack, x2, idx, w, E)
    elif path == "grouped":
        out = grouped_tokens(stack, x2, idx, w)
    else:
        raise ValueError(f"path must be 'dense', 'grouped' or None, got {path!r}")
    return out.reshape(B, T, -1)


def dense_tokens(stack, x2: Tensor, idx: Tensor, w: Tensor, num_experts: int) -> Tensor:
    """Top-k per-token routing as one pass over every expert. x2 [N,d], idx/w [N,K] -> [N,d_out]."""
    dense = w.new_zeros(x2.shape[0], num_experts).scatter_add_(1, idx, w)
    return stack.dense_tokens(x2, dense)


def stack_size(stack, ids: Tensor) -> int:
    n = getattr(stack, "num_experts", None)
    return int(n) if n is not None else int(ids.max()) + 1


def grouped_tokens(stack, x2: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    """Top-k per-token routing computed per selected expert. x2 [N,d], idx/w [N,K] -> [N,d_out].

    Pairs (token, selected expert) with weight 0 are dropped. The others are sorted by expert and laid
    out in padded slots: each used expert gets a run of ``cap`` slots, its tokens first, padding (token
    0) after. Balanced routing gives every expert the same ``cap`` (the largest count): one batched
    call. Skewed routing, where that padding would more than double the work, rounds each expert's
    count up to a power of two instead: one batched call per distinct ``cap`` (at most
    ``log2(tokens) + 1`` calls, padding under 2x), never a loop over experts or tokens. Every token's K
    outputs are then gathered back and summed with their weights: no scatter (``index_add_`` on CPU is
    a serial scatter several times slower than the gathers).
    """
    N, K = idx.shape
    dev = x2.device
    flat_e = idx.reshape(-1)
    flat_w = w.reshape(-1)
    keep = flat_w != 0
    pair = None if bool(keep.all()) else keep.nonzero().squeeze(1)  # kept pairs, as n * K + k
    e = flat_e if pair is None else flat_e[pair]
    M = e.numel()
    if M == 0:
        return x2.new_zeros(N, getattr(stack, "delta_out", stack.d_out))
    counts_all = torch.bincount(e, minlength=stack_size(stack, e))
    used = counts_all.nonzero().squeeze(1)
    counts = counts_all[used]
    U = used.numel()
    C = int(counts.max())
    order = torch.argsort(e, stable=True)
    pair_s = order if pair is None else pair[order]  # the kept pairs, grouped by expert (ascending id)
    tok_s = torch.div(pair_s, K, rounding_mode="floor")
    g = torch.repeat_interleave(torch.arange(U, device=dev), counts, output_size=M)  # used-expert of each pair
    j = torch.arange(M, device=dev) - (torch.cumsum(counts, 0) - counts)[g]  # its rank among that expert's pairs
    if U * C <= 2 * M:  # balanced enough: one run of C slots per used expert, one batched call
        slot = g * C + j
        runs = [(U, C)]
    else:  # skewed: runs of 2^ceil(log2(count)) slots, experts ordered by run length
        cap = torch.pow(2, torch.ceil(torch.log2(counts.double()))).long()
        by_cap = torch.argsort(cap, stable=True)
        used, cap = used[by_cap], cap[by_cap]
        first = torch.cumsum(cap, 0) - cap  # first slot of each (reordered) expert's run
        pos = torch.empty_like(by_cap)
        pos[by_cap] = torch.arange(U, device=dev)
        slot = first[pos[g]] + j
        caps, n_exp = torch.unique_consecutive(cap, return_counts=True)
        runs = list(zip(n_exp.tolist(), caps.tolist()))
    slot_tok = torch.zeros(sum(n * c for n, c in runs), dtype=torch.long, device=dev)
    slot_tok[slot] = tok_s
    X = x2.index_select(0, slot_tok)
    outs, s0, u0 = [], 0, 0
    for n, c in runs:
        outs.append(stack.grouped(X[s0: s0 + n * c].view(n, c, -1), used[u0: u0 + n]).reshape(n * c, -1))
        s0, u0 = s0 + n * c, u0 + n
    Y = outs[0] if len(outs) == 1 else torch.cat(outs)
    # Row of Y holding each pair's output; dropped pairs point at row 0 and have weight 0.
    where = torch.zeros(N * K, dtype=torch.long, device=dev)
    where[pair_s] = slot
    Yp = Y.index_select(0, where).view(N, K, -1)
    wk = flat_w.view(N, K, 1)
    if K == 1:
        return Yp[:, 0] * wk[:, 0]
    return torch.bmm(wk.transpose(1, 2), Yp)[:, 0]
