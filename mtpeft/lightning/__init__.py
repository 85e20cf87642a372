"""Lightning phases: data modules and the modules that train bank experts."""
from .data import TaskDataModule, mixture_weights
from .expert import ExpertModule, KeepBest

__all__ = ["ExpertModule", "KeepBest", "TaskDataModule", "mixture_weights"]
