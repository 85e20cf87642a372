"""The computation LoRA and bottleneck adapters share: ``delta = s * up(act(down(x)))`` per expert."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import MtpeftError
from .base import LinearStack


class LowRankStack(LinearStack):
    """Experts with ``down: [r, d_in]`` and ``up: [d_out, r]`` and an optional activation between."""

    down_name = "down"
    up_name = "up"

    def __init__(self, config, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0,
                 act: Callable[[Tensor], Tensor] | None = None, d_in: int | None = None, d_out: int | None = None):
        super().__init__(config, base)
        if d_in is not None:
            self.d_in = d_in
        if d_out is not None:
            self.d_out = d_out
        self.rank = rank
        self.scale = scale
        self.act = act
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.param_names = (self.down_name, self.up_name)

    def _act(self, h: Tensor) -> Tensor:
        return h if self.act is None else self.act(h)

    def per_example(self, x: Tensor, idx: Tensor, w: Tensor, mix: str) -> Tensor:
        x = self.dropout(x)
        B, K = idx.shape
        A = self.gather(self.down_name, idx)  # [B,K,r,d_in]
        U = self.gather(self.up_name, idx)  # [B,K,d_out,r]
        if mix == "params" or K == 1:
            A = torch.einsum("bk,bkrd->brd", w, A) if K > 1 else A[:, 0]
            U = torch.einsum("bk,bkor->bor", w, U) if K > 1 else U[:, 0] * w[:, 0, None, None]
            # the scale rides on the small [B,d_out,r] factor, not on the [B,T,d_out] output
            return torch.bmm(self._act(torch.bmm(x, A.transpose(1, 2))), (U * self.scale).transpose(1, 2))
        r = A.shape[2]
        h = torch.bmm(x, A.reshape(B, K * r, -1).transpose(1, 2))  # [B,T,K*r]
        h = self._act(h) * (w * self.scale).repeat_interleave(r, dim=1)[:, None, :]
        U = U.permute(0, 1, 3, 2).reshape(B, K * r, -1)  # [B,K*r,d_out]
        return torch.bmm(h, U)

    def per_task(self, x: Tensor, idx: Tensor, w: Tensor, rows: Tensor) -> Tensor:
        """Parameters mixed once per row of weights (one row per distinct task), then applied per example.

        x [B,T,d_in]; idx/w [G,K], or [G,n,K] for ``n`` blocks (multi-head routing: block ``j`` of the input
        width reads the ``j``-th column block of the mixed ``down``, block ``j`` of the output width comes from
        the ``j``-th row block of the mixed ``up``); rows [B] -> delta [B,T,d_out]. Two einsums over the rows,
        one gather per example: no loop over examples, tasks or experts.
        """
        x = self.dropout(x)
        if w.dim() == 2:
            w, idx = w[:, None], idx[:, None]
        G, n, _ = w.shape
        A = self.stacked(self.down_name)  # [E,r,d_in]
        U = self.stacked(self.up_name)  # [E,d_out,r]
        E, r, d_in = A.shape
        d_out = U.shape[1]
        if d_in % n or d_out % n:
            raise MtpeftError(f"{n} routing splits do not divide this layer's widths ({d_in} in, {d_out} out); "
                              "give a number of splits that divides both (e.g. 1, 2 or 4)")
        dense = w.new_zeros(G, n, E).scatter_add_(-1, idx, w)  # [G,n,E]: each row's weight on every expert
        A_t = torch.einsum("gne,erni->grni", dense, A.view(E, r, n, d_in // n)).reshape(G, r, d_in)
        U_t = torch.einsum("gne,enor->gnor", dense, U.view(E, n, d_out // n, r)).reshape(G, d_out, r)
        A_b, U_b = A_t.index_select(0, rows), U_t.index_select(0, rows)
        return torch.bmm(self._act(torch.bmm(x, A_b.transpose(1, 2))), (U_b * self.scale).transpose(1, 2))

    def single(self, x: Tensor, i: int) -> Tensor:
        """Expert ``i`` on every example with weight 1: two plain matmuls, no gather or batched product."""
        e = self.experts[i]
        down, up = getattr(e, self.down_name), getattr(e, self.up_name)
        return self._act(self.dropout(x) @ down.t()) @ (up * self.scale).t()

    def dense_tokens(self, x: Tensor, w: Tensor) -> Tensor:
        x = self.dropout(x)
        A = self.stacked(self.down_name)  # [E,r,d_in]
        U = self.stacked(self.up_name)  # [E,d_out,r]
        E, r, _ = A.shape
        h = x @ A.reshape(E * r, -1).t()  # [N,E*r]
        h = self._act(h) * (w * self.scale).repeat_interleave(r, dim=1)  # the scale rides on [N,E*r]
        return h @ U.permute(0, 2, 1).reshape(E * r, -1)

    def grouped(self, x: Tensor, used: Tensor) -> Tensor:
        x = self.dropout(x)
        A = self.gather(self.down_name, used)  # [U,r,d_in]
        Up = self.gather(self.up_name, used)  # [U,d_out,r]
        return torch.bmm(self._act(torch.bmm(x, A.transpose(1, 2))) * self.scale, Up.transpose(1, 2))
