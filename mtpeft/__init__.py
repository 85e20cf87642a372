"""mtpeft: continual and multi-task learning with banks of parameter-efficient task modules.

The public API, re-exported explicitly. Importing loads nothing heavy: each name is imported on first
use (the module types register themselves then). No files, no network, no global state.
"""
# name -> the submodule that defines it; imported on first use (PEP 562), so `import mtpeft` and
# `mtpeft --help` load no torch. A new public name: one line here and one in __all__.
_LAZY = {
    "Backbone": ".backbone",
    "load_backbone": ".backbone",
    "BankOutput": ".bank",
    "ModuleBank": ".bank",
    "read_manifest": ".bank",
    "MtpeftError": ".io",
    "MODULE_TYPES": ".modules",
    "ModuleConfig": ".modules",
    "ModuleType": ".modules",
    "register": ".modules",
    "merge_modules": ".merge",
    "RouteContext": ".routing",
    "Routing": ".routing",
    "AccuracyMatrix": ".continual",
    "STRATEGIES": ".continual",
    "Stream": ".continual",
    "Strategy": ".continual",
    "load_stream": ".continual",
    "register_strategy": ".continual",
    "run_continual": ".continual",
    "ReplayMemory": ".memory",
    "CausalScorer": ".scorer",
    "EncoderScorer": ".scorer",
    "LabelSpace": ".scorer",
    "make_scorer": ".scorer",
    "builtin_names": ".suite",
    "load_builtin": ".suite",
    "load_task": ".suite",
    "Task": ".tasks",
    "TaskStream": ".tasks",
    "load_task_file": ".tasks",
    "TrainConfig": ".train",
    "evaluate": ".train",
    "expert_vs_zero_shot": ".train",
    "fit_centroid": ".gates",
    "fit_gates": ".gates",
    "fit_expert": ".train",
    "fit_multitask": ".train",
    "route_eval": ".zeroshot",
    "run_distil": ".mpt",
    "export_peft_mpt": ".mpt",
}


from ._lazy import lazy_names

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__version__ = "0.1.0"

__all__ = [
    "MODULE_TYPES",
    "STRATEGIES",
    "AccuracyMatrix",
    "Backbone",
    "BankOutput",
    "CausalScorer",
    "EncoderScorer",
    "LabelSpace",
    "ModuleBank",
    "ModuleConfig",
    "ModuleType",
    "MtpeftError",
    "ReplayMemory",
    "RouteContext",
    "Routing",
    "Strategy",
    "Stream",
    "Task",
    "TaskStream",
    "TrainConfig",
    "builtin_names",
    "evaluate",
    "expert_vs_zero_shot",
    "export_peft_mpt",
    "fit_centroid",
    "fit_expert",
    "fit_gates",
    "fit_multitask",
    "load_backbone",
    "load_builtin",
    "load_stream",
    "load_task",
    "load_task_file",
    "make_scorer",
    "merge_modules",
    "read_manifest",
    "register",
    "register_strategy",
    "route_eval",
    "run_continual",
    "run_distil",
]
