"""Built-in module types. Importing this package registers them (one file per type)."""
from .adapter import (
    AdapterConfig,
    HoulsbyAdapter,
    HoulsbyConfig,
    ParallelAdapter,
    ParallelConfig,
    PfeifferAdapter,
    PfeifferConfig,
    ScaledParallelAdapter,
    ScaledParallelConfig,
)
from .base import MODULE_TYPES, ModuleConfig, ModuleType, Stack, register
from .ia3 import IA3, IA3Config
from .krona import KronA, KronAConfig
from .lora import LoRA, LoRAConfig
from .mam import MAMAdapter, MAMConfig
from .mpt import MPTConfig, MultitaskPromptTuning
from .prefix import PrefixConfig, PrefixTuning
from .prompt import PromptConfig, PromptTuning
from .ptuning import PTuning, PTuningConfig

__all__ = [
    "IA3", "MODULE_TYPES", "AdapterConfig", "HoulsbyAdapter", "HoulsbyConfig", "IA3Config", "KronA",
    "KronAConfig", "LoRA", "LoRAConfig", "MAMAdapter", "MAMConfig", "MPTConfig", "ModuleConfig", "ModuleType",
    "MultitaskPromptTuning", "PTuning",
    "PTuningConfig", "ParallelAdapter", "ParallelConfig", "PfeifferAdapter", "PfeifferConfig",
    "PrefixConfig", "PrefixTuning", "PromptConfig", "PromptTuning", "ScaledParallelAdapter",
    "ScaledParallelConfig", "Stack", "register",
]
