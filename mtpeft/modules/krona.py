"""KronA (Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter").

``Delta W = s * (A kron B)`` with ``A: [a_out, a_in]`` and ``B: [b_out, b_in]``, ``d_out = a_out * b_out``,
``d_in = a_in * b_in``. A is Kaiming-uniform, B zero (identity at init); mergeable.

``Delta W`` is never materialised in a forward pass: with ``x`` reshaped row-major to
``X: [a_in, b_in]``, ``(A kron B) x`` is ``A X B^T`` (``[a_out, b_out]``) flattened, two small matmuls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from .base import LinearStack, ModuleConfig, ModuleType, check_positive, register


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` not above ``at_most`` (1 at least)."""
    for k in range(min(n, at_most), 0, -1):
        if n % k == 0:
            return k
    return 1


@dataclass
class KronAConfig(ModuleConfig):
    a_out: int | None = field(
        default=None,
        metadata={"help": "rows of the factor A (must divide the layer's output size); B has d_out / a_out "
                  "rows. None: the largest divisor of d_out not above max_factor."},
    )
    a_in: int | None = field(
        default=None,
        metadata={"help": "columns of the factor A (must divide the layer's input size); B has d_in / a_in "
                  "columns. None: the largest divisor of d_in not above max_factor."},
    )
    max_factor: int = field(
        default=16, metadata={"help": "upper bound for a_out / a_in when they are not given"},
    )
    alpha: float = field(default=1.0, metadata={"help": "scale s of the update s * (A kron B)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the KronA branch input"})

    def validate(self):
        super().validate()
        for name in ("a_out", "a_in", "max_factor"):
            v = getattr(self, name)
            if v is None and name != "max_factor":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise MtpeftError(f"{name} must be a positive integer, got {v!r}")
            check_positive(**{name: v})
        check_positive(alpha=self.alpha)
        if not 0 <= self.dropout < 1:
            raise MtpeftError(f"dropout must be in [0, 1), got {self.dropout}")


class _Expert(nn.Module):
    def __init__(self, a_out, a_in, b_out, b_in, generator):
        super().__init__()
        A = torch.empty(a_out, a_in)
        bound = 1.0 / math.sqrt(a_in)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and LoRA's A
        A.uniform_(-bound, bound, generator=generator)
        self.krona_A = nn.Parameter(A)
        self.krona_B = nn.Parameter(torch.zeros(b_out, b_in))


class KronAStack(LinearStack):
    param_names = ("krona_A", "krona_B")

    def __init__(self, config: KronAConfig, base: nn.Linear):
        super().__init__(config, base)
        self.a_out = config.a_out or largest_divisor(self.d_out, config.max_factor)
        self.a_in = config.a_in or largest_divisor(self.d_in, config.max_factor)
        for a, d, what in ((self.a_out, self.d_out, "a_out"), (self.a_in, self.d_in, "a_in")):
            if d % a:
                raise MtpeftError(f"KronA: {what}={a} does not divide the layer size {d}; pick a divisor of {d} "
                                  "or leave it unset")
        self.b_out = self.d_out // self.a_out
        self.b_in = self.d_in // self.a_in
        self.scale = config.alpha
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def new_expert(self, generator):
        return _Expert(self.a_out, self.a_in, self.b_out, self.b_in, generator)

    def _X(self, x: Tensor) -> Tensor:
        return self.dropout(x).reshape(*x.shape[:-1], self.a_in, self.b_in)

    def _Y(self, Y: Tensor) -> Tensor:
        return self.scale * Y.reshape(*Y.shape[:-2], self.d_out)

    def per_example(self, x: Tensor, idx: Tensor, w: Tensor, mix: str) -> Tensor:
        X = self._X(x)  # [B,T,a_in,b_in]
        A = self.gather("krona_A", idx).to(x.dtype)  # [B,K,a_out,a_in]
        Bf = self.gather("krona_B", idx).to(x.dtype)  # [B,K,b_out,b_in]
        if mix == "params":  # one mixed pair of factors per example (Poly-style: each factor mixed)
            if A.shape[1] > 1:
                A = torch.einsum("bk,bkij->bij", w, A)[:, None]
                Bf = torch.einsum("bk,bkij->bij", w, Bf)[:, None]
            else:
                Bf = Bf * w[:, :, None, None]
        else:
            A = A * w[:, :, None, None]
        h = X[:, None] @ Bf.transpose(-1, -2)[:, :, None]  # [B,K,T,a_in,b_out]
        Y = (A[:, :, None] @ h).sum(1)  # [B,T,a_out,b_out]
        return self._Y(Y)

    def dense_tokens(self, x: Tensor, w: Tensor) -> Tensor:
        # Two GEMMs with the experts side by side (einsum picked a path ~5x slower on CPU):
        # h[n,j,(e,m)] = X_n B_e^T, then Y_n = [A_1 .. A_E] @ (w-weighted h stacked over e).
        N = x.shape[0]
        X = self._X(x)  # [N,a_in,b_in]
        A = self.stacked("krona_A").to(x.dtype)  # [E,a_out,a_in]
        Bf = self.stacked("krona_B").to(x.dtype)  # [E,b_out,b_in]
        E = A.shape[0]
        h = X.reshape(-1, self.b_in) @ Bf.reshape(E * self.b_out, self.b_in).t()  # [N*a_in, E*b_out]
        h = h.view(N, self.a_in, E, self.b_out) * w[:, None, :, None]
        h = h.permute(0, 2, 1, 3).reshape(N, E * self.a_in, self.b_out)  # rows (e, j)
        Y = A.permute(1, 0, 2).reshape(self.a_out, E * self.a_in) @ h  # [N,a_out,b_out]
        return self._Y(Y)

    def grouped(self, x: Tensor, used: Tensor) -> Tensor:
        X = self._X(x)  # [U,C,a_in,b_in]
        A = self.gather("krona_A", used).to(x.dtype)  # [U,a_out,a_in]
        Bf = self.gather("krona_B", used).to(x.dtype)  # [U,b_out,b_in]
        Y = A[:, None] @ (X @ Bf.transpose(-1, -2)[:, None])  # [U,C,a_out,b_out]
        return self._Y(Y)

    def delta_weight(self, i: int) -> Tensor:
        e = self.experts[i]
        return self.scale * torch.kron(e.krona_A, e.krona_B)


@register("krona")
class KronA(ModuleType):
    config_cls = KronAConfig
    mergeable = True
    identity_at_init = True
    default_targets: ClassVar[dict[str, list[str]]] = {"encoder": ["query", "value"], "causal": ["q_proj", "v_proj"]}

    @classmethod
    def make_stack(cls, config, site, backbone):
        return KronAStack(config, site)
