"""Continual learning: streams and scenarios, strategies (one file each), the runner with checkpoints and
resume, the accuracy matrix and its metrics, and the report rendered from a run's saved JSON.

Names are imported on first use (PEP 562), so reading a report does not import the training stack."""
_LAZY = {
    "METRICS": ".matrix",
    "AccuracyMatrix": ".matrix",
    "AverageAccuracy": ".metrics",
    "BackwardTransfer": ".metrics",
    "ContinualMetric": ".metrics",
    "Forgetting": ".metrics",
    "ForwardTransfer": ".metrics",
    "Intransigence": ".metrics",
    "SCENARIOS": ".stream",
    "STREAMS": ".stream",
    "Stream": ".stream",
    "load_stream": ".stream",
    "STRATEGIES": ".strategies",
    "Context": ".strategies",
    "Strategy": ".strategies",
    "register_strategy": ".strategies",
    "ContinualRun": ".runner",
    "run_continual": ".runner",
    "check_config": ".config",
    "load_config": ".config",
    "build_report": ".report",
    "recompute": ".report",
    "write_report": ".report",
    "plot_report": ".plots",
    "render_markdown": ".report_md",
    "summary_table": ".report_md",
}

from .._lazy import lazy_names

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = [
    "METRICS",
    "SCENARIOS",
    "STRATEGIES",
    "STREAMS",
    "AccuracyMatrix",
    "AverageAccuracy",
    "BackwardTransfer",
    "Context",
    "ContinualMetric",
    "ContinualRun",
    "Forgetting",
    "ForwardTransfer",
    "Intransigence",
    "Strategy",
    "Stream",
    "build_report",
    "check_config",
    "load_config",
    "load_stream",
    "plot_report",
    "recompute",
    "register_strategy",
    "render_markdown",
    "run_continual",
    "summary_table",
    "write_report",
]
