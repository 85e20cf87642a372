"""mtpeft: continual and multi-task learning with banks of parameter-efficient task modules.

The public API, re-exported explicitly. Importing registers the built-in module types and does
nothing else (no files, no network, no global state).
"""
from .backbone import Backbone, load_backbone
from .bank import BankOutput, ModuleBank, read_manifest
from .io import MtpeftError
from .modules import MODULE_TYPES, ModuleConfig, ModuleType, register
from .routing import RouteContext, Routing
from .scorer import CausalScorer, EncoderScorer, LabelSpace, make_scorer
from .suite import builtin_names, load_builtin, load_task
from .tasks import Task, TaskStream, load_task_file
from .train import TrainConfig, evaluate, expert_vs_zero_shot, fit_expert, fit_multitask

__version__ = "0.1.0"

__all__ = [
    "MODULE_TYPES",
    "Backbone",
    "BankOutput",
    "CausalScorer",
    "EncoderScorer",
    "LabelSpace",
    "ModuleBank",
    "ModuleConfig",
    "ModuleType",
    "MtpeftError",
    "RouteContext",
    "Routing",
    "Task",
    "TaskStream",
    "TrainConfig",
    "builtin_names",
    "evaluate",
    "expert_vs_zero_shot",
    "fit_expert",
    "fit_multitask",
    "load_backbone",
    "load_builtin",
    "load_task",
    "load_task_file",
    "make_scorer",
    "read_manifest",
    "register",
]
