"""Multitask prompt tuning (MPT): distil single-task prompts into one shared prompt and task factors.

The module family is ``mtpeft.modules.mpt`` (type ``mpt``); here the stages that train it: ``distil`` (the
source stage: teachers, then the student by distillation), ``adapt`` (the target stage: a new task's factors
initialised from the sources, then fine-tuned), the config of ``mtpeft distil`` and peft's format (out and in).
"""
from .config import DistilConfig, load_distil_config, parse_distil_config
from .interop import export_peft_mpt, import_peft_mpt
from .run import run_distil
from .stages import adapt, distil, init_factors, most_similar, train_teachers

__all__ = ["DistilConfig", "adapt", "distil", "export_peft_mpt", "import_peft_mpt", "init_factors",
           "load_distil_config", "most_similar", "parse_distil_config", "run_distil", "train_teachers"]
