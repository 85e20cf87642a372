"""LoRA: ``y = W x + s * B A x`` with A Kaiming-uniform, B zero (identity at init); mergeable."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from .base import ModuleConfig, ModuleType, check_positive, register
from .lowrank import LowRankStack


@dataclass
class LoRAConfig(ModuleConfig):
    r: int = field(default=8, metadata={"help": "rank of the update B A"})
    alpha: float = field(default=16.0, metadata={"help": "scale s = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})

    def validate(self):
        super().validate()
        check_positive(r=self.r, alpha=self.alpha)
        if not 0 <= self.dropout < 1:
            raise MtpeftError(f"dropout must be in [0, 1), got {self.dropout}")


class _Expert(nn.Module):
    def __init__(self, r, d_in, d_out, generator):
        super().__init__()
        A = torch.empty(r, d_in)
        # Kaiming-uniform with a = sqrt(5), as nn.Linear and the LoRA reference do.
        bound = 1.0 / math.sqrt(d_in)
        A.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))


class LoRAStack(LowRankStack):
    down_name = "lora_A"
    up_name = "lora_B"

    def __init__(self, config: LoRAConfig, base: nn.Linear):
        super().__init__(config, base, rank=config.r, scale=config.alpha / config.r, dropout=config.dropout)

    def new_expert(self, generator):
        return _Expert(self.rank, self.d_in, self.d_out, generator)

    def delta_weight(self, i: int) -> Tensor:
        e = self.experts[i]
        return self.scale * (e.lora_B @ e.lora_A)


@register("lora")
class LoRA(ModuleType):
    config_cls = LoRAConfig
    mergeable = True
    identity_at_init = True
    default_targets: ClassVar[dict[str, list[str]]] = {"encoder": ["query", "value"], "causal": ["q_proj", "v_proj"]}

    @classmethod
    def make_stack(cls, config, site, backbone):
        return LoRAStack(config, site)
