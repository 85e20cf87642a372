"""Lightning phases: data modules, the one module every phase that trains runs on, and objectives."""
from .data import TaskDataModule, mixture_weights
from .distil import Distillation
from .objectives import OBJECTIVES, CrossEntropy, Objective, make_objective, register_objective
from .phase import KeepBest, PhaseModule

__all__ = ["OBJECTIVES", "CrossEntropy", "Distillation", "KeepBest", "Objective", "PhaseModule", "TaskDataModule",
           "make_objective", "mixture_weights", "register_objective"]
