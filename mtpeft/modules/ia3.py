"""(IA)3 (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors rescale the keys, the values and the FFN intermediate activation.

Two kinds of site:
- key/value projections: the vector scales the layer's OUTPUT, ``y * l`` (l: ``[d_out]``);
- the FFN output projection (``feedforward_modules``): the vector scales its INPUT, ``W (x * l)``
  (l: ``[d_in]``), i.e. the intermediate activation; the bias is not scaled.

Vectors start at ones (identity). Routing is a mixture of *deltas* so an example no module serves is
unchanged: ``y + sum_k w_k y (l_k - 1)`` and ``y + W (x * sum_k w_k (l_k - 1))``. Being linear in
``l``, mixing outputs and mixing parameters give the same result. Mergeable: ``W' = l[:, None] W``,
``b' = l b`` (key/value) and ``W' = W l[None, :]`` (FFN); unmerge divides.

Note: the routed mixture composes modules additively, merging composes them multiplicatively, so a
merged module plus other routed ones equals the unmerged mixture only up to the cross terms
``(l_i - 1)(l_j - 1)``; a single merged module is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import MtpeftError
from ..kernels import routed_delta
from .base import LinearStack, ModuleConfig, ModuleType, match_targets, register

# The FFN output projection of each family (what (IA)3 scales the input of). BERT's FFN output is
# ``encoder.layer.N.output.dense``; a plain "output.dense" would also match ``attention.output.dense``.
FFN_OUTPUT = {"encoder": [r"re:layer\.\d+\.output\.dense$"], "causal": ["down_proj"]}


@dataclass
class IA3Config(ModuleConfig):
    feedforward_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Which of the targeted layers are FFN output projections: their INPUT is scaled "
                  "(W (x * l)); the others' output is scaled (y * l). Names or 're:' regexes like "
                  "target_modules. None: the family's FFN output (BERT layer.N.output.dense, Llama down_proj)."},
    )

    def validate(self):
        super().validate()
        ff = self.feedforward_modules
        if ff is not None:
            if not isinstance(ff, (list, tuple)) or not all(isinstance(p, str) for p in ff):
                raise MtpeftError("feedforward_modules must be a list of layer names, e.g. ['down_proj']")
            if self.target_modules is not None:
                missing = [p for p in ff if p not in self.target_modules]
                if missing:
                    raise MtpeftError(f"feedforward_modules {missing} are not in target_modules "
                                      f"{list(self.target_modules)}; every feed-forward module must be targeted")


class _Expert(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ia3_l = nn.Parameter(torch.ones(d))


class IA3Stack(LinearStack):
    """Experts ``ia3_l: [d]``; ``d = d_out`` (scales the output) or ``d_in`` (FFN: scales the input)."""

    param_names = ("ia3_l",)

    def __init__(self, config: IA3Config, base: nn.Linear, feedforward: bool):
        super().__init__(config, base)
        self.feedforward = feedforward
        self.dim = self.d_in if feedforward else self.d_out
        object.__setattr__(self, "_base", base)  # a reference to the frozen layer, not a submodule

    def new_expert(self, generator):
        return _Expert(self.dim)

    def _dl(self, idx: Tensor, dtype) -> Tensor:
        return self.gather("ia3_l", idx).to(dtype) - 1

    def source(self, x: Tensor, y: Tensor) -> Tensor:
        return x if self.feedforward else y

    @property
    def input_scaling(self) -> bool:
        """FFN sites scale the layer input: the bank folds a leading one into the base matmul,
        ``W (x + x * dl) + b``, so no second matmul is paid (see ``BankedLinear.forward``)."""
        return self.feedforward

    @property
    def delta_out(self) -> int:
        """Width of what the routed computations return: ``x * dl`` [.., d_in] on FFN sites."""
        return self.dim

    def _out(self, s: Tensor, dl: Tensor) -> Tensor:
        """The routed part from the source ``s`` and the scale offsets ``dl`` (broadcast against ``s``):
        ``s * dl``; on FFN sites ``combine`` maps it through the base weight, once, after mixing."""
        return s * dl

    def _example_scale(self, local, like: Tensor) -> Tensor | None:
        """Per-example routing: each example's scale ``1 + sum_k w_k (l_k - 1)``, shaped to broadcast
        against ``like`` ([B,T,d] or [B,d]); None for per-token routing (the routed-delta kernels)."""
        if local.per_token:
            return None
        w = local.weights.to(like.dtype)
        scale = 1 + torch.einsum("bk,bkd->bd", w, self._dl(local.indices, like.dtype))
        return scale[:, None, :] if like.dim() == 3 else scale

    def scaled_input(self, x: Tensor, local) -> Tensor:
        """FFN sites: ``x * (1 + dl)``, the input the base matmul then sees (one elementwise op)."""
        s = self._example_scale(local, x)
        return x * s if s is not None else x + routed_delta(self, x, local)

    def forward(self, x: Tensor, y: Tensor, local) -> Tensor:
        s = None if self.feedforward else self._example_scale(local, y)
        if s is None:
            return super().forward(x, y, local)
        return y * s  # like peft's y * l: one elementwise op on the output, not y + y * dl

    def combine(self, x: Tensor, y: Tensor, delta: Tensor) -> Tensor:
        if self.feedforward:
            return y + F.linear(delta, self._base.weight.to(delta.dtype))
        return y + delta

    def per_example(self, x: Tensor, idx: Tensor, w: Tensor, mix: str) -> Tensor:
        # Linear in l: mix "output" and "params" coincide.
        dl = torch.einsum("bk,bkd->bd", w, self._dl(idx, x.dtype))
        return self._out(x, dl[:, None, :])

    def dense_tokens(self, x: Tensor, w: Tensor) -> Tensor:
        dl = w @ (self.stacked("ia3_l").to(x.dtype) - 1)  # [N,d]
        return self._out(x, dl)

    def grouped(self, x: Tensor, used: Tensor) -> Tensor:
        return self._out(x, self._dl(used, x.dtype)[:, None, :])

    @torch.no_grad()
    def merge_into(self, base: nn.Linear, i: int, sign: int) -> None:
        l_ = self.experts[i].ia3_l.to(base.weight.dtype)
        op = torch.Tensor.mul_ if sign > 0 else torch.Tensor.div_
        if self.feedforward:
            op(base.weight, l_[None, :])
        else:
            op(base.weight, l_[:, None])
            if base.bias is not None:
                op(base.bias, l_)


def _site_name(model: nn.Module, layer: nn.Linear) -> str:
    for name, m in model.named_modules():
        if m is layer:
            return name.removesuffix(".base")  # the bank wraps targeted layers (the base lives at .base)
    raise MtpeftError("(IA)3: the layer to act on is not part of the backbone")


@register("ia3")
class IA3(ModuleType):
    config_cls = IA3Config
    mergeable = True
    identity_at_init = True
    default_targets: ClassVar[dict[str, list[str]]] = {
        "encoder": ["key", "value", *FFN_OUTPUT["encoder"]],
        "causal": ["k_proj", "v_proj", *FFN_OUTPUT["causal"]],
    }

    @classmethod
    def feedforward_patterns(cls, family: str, config: IA3Config) -> list[str]:
        if config.feedforward_modules is not None:
            return list(config.feedforward_modules)
        return FFN_OUTPUT.get(family, [])

    @classmethod
    def make_stack(cls, config, site, backbone):
        name = _site_name(backbone.model, site)
        ff = bool(match_targets([name], cls.feedforward_patterns(backbone.family, config)))
        return IA3Stack(config, site, feedforward=ff)
