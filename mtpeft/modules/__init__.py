"""Built-in module types. Importing this package registers them (one file per type)."""
from .base import MODULE_TYPES, ModuleConfig, ModuleType, Stack, register
from .lora import LoRA, LoRAConfig

__all__ = ["MODULE_TYPES", "ModuleConfig", "ModuleType", "Stack", "register", "LoRA", "LoRAConfig"]
