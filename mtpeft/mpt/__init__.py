"""Multitask prompt tuning (MPT): distil single-task prompts into one shared prompt and task factors.

The module family is ``mtpeft.modules.mpt`` (type ``mpt``); here the stages that train it: ``distil`` (the
source stage: teachers, then the student by distillation), ``adapt`` (the target stage: a new task's factors
initialised from the sources, then fine-tuned), the config of ``mtpeft distil`` and the export to peft.
"""
from .export import export_peft_mpt

__all__ = ["export_peft_mpt"]
