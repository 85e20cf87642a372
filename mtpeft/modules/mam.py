"""MAM adapter (He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning").

Prefix tuning (``l = 30``, reparameterised through an MLP while training) on attention plus a
scaled parallel adapter (large ``r = 512``, ``s = 4``) on the FFN. A composite type: the bank
installs its two parts (the ``prefix`` and ``scaled_parallel`` types) under one module, so one
routing weight drives both, and saving, freezing, ``finalize`` (drops the prefix MLP) and removal
treat them as one module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .adapter import ScaledParallelAdapter, ScaledParallelConfig
from .base import ModuleConfig, ModuleType, register
from .prefix import PrefixConfig, PrefixTuning


@dataclass
class MAMConfig(ModuleConfig):
    prefix_tokens: int = field(default=30, metadata={"help": "prefix length l on every attention layer"})
    prefix_projection: bool = field(
        default=True, metadata={"help": "reparameterise the prefixes through an MLP while training (as He et al.)"})
    prefix_hidden: int = field(default=512, metadata={"help": "hidden width of the prefix MLP"})
    adapter_r: int = field(default=512, metadata={"help": "bottleneck size of the FFN's scaled parallel adapter"})
    adapter_scale: float = field(default=4.0, metadata={"help": "scale s of the FFN adapter's output"})
    adapter_activation: str = field(default="relu", metadata={"help": "non-linearity of the FFN adapter"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "dropout on the FFN adapter's input"})

    def validate(self):
        super().validate()
        self.prefix_config()  # the parts validate their own fields
        self.adapter_config()

    def prefix_config(self) -> PrefixConfig:
        return PrefixConfig(n_tokens=self.prefix_tokens, projection=self.prefix_projection,
                            projection_hidden=self.prefix_hidden)

    def adapter_config(self) -> ScaledParallelConfig:
        """target_modules, when set, names the adapter's sites (default: each FFN's output projection)."""
        return ScaledParallelConfig(target_modules=self.target_modules, r=self.adapter_r, scale=self.adapter_scale,
                                    activation=self.adapter_activation, dropout=self.adapter_dropout,
                                    placement="ffn")


@register("mam")
class MAMAdapter(ModuleType):
    config_cls = MAMConfig
    level = "composite"

    @classmethod
    def parts(cls, config: MAMConfig) -> list[tuple[type[ModuleType], ModuleConfig]]:
        return [(PrefixTuning, config.prefix_config()), (ScaledParallelAdapter, config.adapter_config())]
