"""Built-in module types. Importing this package registers them (one file per type)."""
from .base import MODULE_TYPES, ModuleConfig, ModuleType, Stack, register
from .lora import LoRA, LoRAConfig
from .prefix import PrefixConfig, PrefixTuning
from .prompt import PromptConfig, PromptTuning
from .ptuning import PTuning, PTuningConfig

__all__ = ["MODULE_TYPES", "ModuleConfig", "ModuleType", "Stack", "register", "LoRA", "LoRAConfig",
           "PromptTuning", "PromptConfig", "PTuning", "PTuningConfig", "PrefixTuning", "PrefixConfig"]
