"""Bottleneck adapters: ``h <- h + s * f(h W_down) W_up``, with W_up zero (identity at init); not mergeable.

Four registered types share one stack and differ in where the adapter reads and writes:

- ``houlsby`` (sequential, after attention and after the FFN): reads the sublayer's output ``y``
  (the output projection's output, before the residual add and the norm) and adds to it.
- ``pfeiffer`` (sequential, after the FFN only).
- ``parallel`` (He et al., "Towards a Unified View"): reads the sublayer's *input* and adds to its
  output. The input is stashed by the bank at the sublayer's first linear of the same layer
  (``intermediate.dense`` / ``up_proj`` for the FFN, ``query`` / ``q_proj`` for attention).
- ``scaled_parallel``: parallel with a scale ``s`` (4 by default, as in He et al.).

Every adapter sits at an output projection (d_out = the hidden size) and reads a hidden-size
tensor, so ``W_down: [r, d]`` and ``W_up: [d, r]``. Like He et al.'s reference code the projections
have no bias, W_down is Kaiming-uniform (LoRA's init) and dropout acts on the adapter's input.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import MtpeftError
from .base import ModuleConfig, ModuleType, check_positive, register
from .lowrank import LowRankStack

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
PLACEMENTS = ("ffn", "attention", "both")
PLACEMENT_HELP = f"sublayers that get an adapter, one of {PLACEMENTS} (used when target_modules is None)"

# Where each sublayer's output projection is, per family.
SITES = {
    "encoder": {"attention": ["attention.output.dense"], "ffn": [r"re:layer\.\d+\.output\.dense$"]},
    "causal": {"attention": ["o_proj"], "ffn": ["down_proj"]},
}
# Output projection of a sublayer -> the linear layer of the SAME layer that reads the sublayer's input.
# (Llama's gate_proj and up_proj share their input; up_proj stands for both.)
SOURCE_RULES = [
    (re.compile(r"^(.*)\.attention\.output\.dense$"), r"\1.attention.self.query"),
    (re.compile(r"^(.*\blayer\.\d+)\.output\.dense$"), r"\1.intermediate.dense"),
    (re.compile(r"^(.*)\.o_proj$"), r"\1.q_proj"),
    (re.compile(r"^(.*)\.down_proj$"), r"\1.up_proj"),
]


def placement_targets(family: str, placement: str) -> list[str]:
    parts = ("attention", "ffn") if placement == "both" else (placement,)
    return [t for p in parts for t in SITES[family][p]]


def source_site(site: str) -> str:
    """The linear layer whose input is the input of the sublayer ``site`` ends (same layer prefix)."""
    for pattern, repl in SOURCE_RULES:
        if pattern.match(site):
            return pattern.sub(repl, site)
    raise MtpeftError(
        f"a parallel adapter at {site} needs the input of its sublayer, but {site} is not the output "
        "projection of an attention or FFN sublayer (attention.output.dense / <layer>.output.dense for "
        "BERT-like encoders, o_proj / down_proj for Llama-like models); target one of those"
    )


@dataclass
class AdapterConfig(ModuleConfig):
    r: int = field(default=64, metadata={"help": "bottleneck size (ignored when reduction_factor is set)"})
    reduction_factor: float | None = field(
        default=None, metadata={"help": "if set, bottleneck size = hidden size // reduction_factor (overrides r)"})
    scale: float = field(default=1.0, metadata={"help": "scale s of the adapter's output"})
    activation: str = field(default="relu", metadata={"help": f"non-linearity f: one of {sorted(ACTIVATIONS)}"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    placement: str = field(default="ffn", metadata={"help": PLACEMENT_HELP})

    def validate(self) -> None:
        super().validate()
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise MtpeftError(f"r must be an integer, got {self.r!r}")
        check_positive(r=self.r, scale=self.scale)
        if self.reduction_factor is not None:
            check_positive(reduction_factor=self.reduction_factor)
        if self.activation not in ACTIVATIONS:
            raise MtpeftError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0 <= self.dropout < 1:
            raise MtpeftError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.placement not in PLACEMENTS:
            raise MtpeftError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")

    def bottleneck(self, d_hidden: int) -> int:
        if self.reduction_factor is None:
            return self.r
        return max(1, int(d_hidden // self.reduction_factor))


@dataclass
class HoulsbyConfig(AdapterConfig):
    placement: str = field(default="both", metadata={"help": PLACEMENT_HELP})


@dataclass
class PfeifferConfig(AdapterConfig):
    pass


@dataclass
class ParallelConfig(AdapterConfig):
    pass


@dataclass
class ScaledParallelConfig(AdapterConfig):
    scale: float = field(default=4.0, metadata={"help": "scale s of the adapter's output (He et al.: 4)"})


class _Expert(nn.Module):
    def __init__(self, r: int, d_in: int, d_out: int, generator: torch.Generator | None):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)  # Kaiming-uniform with a = sqrt(5), as He et al.'s "lora" init
        self.adapter_down = nn.Parameter(torch.empty(r, d_in).uniform_(-bound, bound, generator=generator))
        self.adapter_up = nn.Parameter(torch.zeros(d_out, r))


class AdapterStack(LowRankStack):
    """Adapters at one output projection; ``parallel`` ones read the sublayer input from the stash."""

    down_name = "adapter_down"
    up_name = "adapter_up"

    def __init__(self, config: AdapterConfig, base: nn.Linear, parallel: bool):
        d = base.out_features  # the hidden size: what the adapter reads and writes
        super().__init__(config, base, rank=config.bottleneck(d), scale=config.scale, dropout=config.dropout,
                         act=ACTIVATIONS[config.activation], d_in=d, d_out=d)
        self.parallel = parallel

    def new_expert(self, generator):
        return _Expert(self.rank, self.d_in, self.d_out, generator)

    def expert_outputs(self, x: Tensor, ids: Tensor | None = None) -> Tensor:
        """Each selected adapter's own output on the source ``x`` (``source(x, y)``), side by side: ``x``
        ``[..., d]`` -> ``[..., n, d]`` for the adapters ``ids`` (positions in this stack; None: all). It is what
        each adapter alone adds to the layer (scale included, no residual): AdapterFusion's keys and values.
        Two matmuls over the stacked weights, no loop over adapters."""
        A = self.stacked(self.down_name)  # [E, r, d]
        U = self.stacked(self.up_name)  # [E, d, r]
        if ids is not None:
            ids = ids.to(A.device)
            A, U = A.index_select(0, ids), U.index_select(0, ids)
        n, r, d = A.shape
        h = self._act(self.dropout(x) @ A.reshape(n * r, d).t())  # [..., n*r]
        h = h.unflatten(-1, (n, r))
        return torch.einsum("...nr,nor->...no", h, U * self.scale)

    def stash_sources(self, site: str) -> list[str]:
        return [source_site(site)] if self.parallel else []

    def source(self, x: Tensor, y: Tensor) -> Tensor:
        if not self.parallel:
            return y
        src = source_site(self.site)
        h = self.state.stash.get(src)
        if h is None:
            raise MtpeftError(f"parallel adapter at {self.site}: the input of {src} was not recorded in this "
                              "forward pass; run the whole model through the bank")
        if h.shape[:-1] != y.shape[:-1] or h.shape[-1] != self.d_in:
            raise MtpeftError(f"parallel adapter at {self.site}: the input of {src} has shape {tuple(h.shape)}, "
                              f"expected {(*y.shape[:-1], self.d_in)}")
        return h


class _Adapter(ModuleType):
    parallel: ClassVar[bool] = False
    mergeable = False
    identity_at_init = True

    @classmethod
    def targets(cls, family: str, config: AdapterConfig) -> list[str]:
        if config.target_modules:
            return list(config.target_modules)
        if family not in SITES:
            raise MtpeftError(f"module type {cls.name!r} has no default targets for the {family} family; "
                              "give target_modules")
        return placement_targets(family, config.placement)

    @classmethod
    def make_stack(cls, config, site, backbone):
        return AdapterStack(config, site, parallel=cls.parallel)


def _defaults(config_cls: type[AdapterConfig]) -> dict[str, list[str]]:
    return {fam: placement_targets(fam, config_cls().placement) for fam in SITES}


@register("houlsby")
class HoulsbyAdapter(_Adapter):
    config_cls = HoulsbyConfig
    default_targets = _defaults(HoulsbyConfig)


@register("pfeiffer")
class PfeifferAdapter(_Adapter):
    config_cls = PfeifferConfig
    default_targets = _defaults(PfeifferConfig)


@register("parallel")
class ParallelAdapter(_Adapter):
    config_cls = ParallelConfig
    parallel = True
    default_targets = _defaults(ParallelConfig)


@register("scaled_parallel")
class ScaledParallelAdapter(_Adapter):
    config_cls = ScaledParallelConfig
    parallel = True
    default_targets = _defaults(ScaledParallelConfig)
