"""Continual learning: the accuracy matrix and its metrics (the streams, strategies and runner come later)."""
from .matrix import METRICS, AccuracyMatrix
from .metrics import (
    AverageAccuracy,
    BackwardTransfer,
    ContinualMetric,
    Forgetting,
    ForwardTransfer,
    Intransigence,
)

__all__ = ["METRICS", "AccuracyMatrix", "AverageAccuracy", "BackwardTransfer", "ContinualMetric", "Forgetting",
           "ForwardTransfer", "Intransigence"]
