"""The continual-learning metrics as torchmetrics ``Metric`` objects: ``update`` with the row of
accuracies measured after each training step, ``compute`` the metric over the rows so far (computed by
:class:`AccuracyMatrix`, see ``matrix.py`` for the definitions and edge cases).

``compute`` returns a 0-d float64 tensor, NaN where the metric is undefined (one task, no untrained or
joint accuracies, cells not evaluated): NaN, not 0, so a missing value cannot pass for a result.
Calling the metric (``metric(row)``) updates it and returns the value over all rows so far. The rows
are the aggregated accuracies of each step, the same on every process: nothing is synced.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from .matrix import NAN, AccuracyMatrix


class ContinualMetric(Metric):
    """Base: ``which`` names the :class:`AccuracyMatrix` method. ``reset()`` drops the rows and puts the
    untrained and joint accuracies back to the constructor's (``set_untrained``/``set_joint`` values go)."""

    which = ""
    full_state_update = True

    def __init__(self, tasks: Sequence[str], steps: Sequence[str] | None = None, untrained=None, joint=None,
                 **kwargs):
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        self._proto = AccuracyMatrix(tasks, steps, (), untrained, joint)  # validates names and vectors
        n = len(self._proto.tasks)
        self.add_state("rows", default=[], dist_reduce_fx=None)
        for name in ("untrained", "joint"):
            v = getattr(self._proto, name)
            self.add_state(name, default=torch.tensor(v if v else [NAN] * n, dtype=torch.float64),
                           dist_reduce_fx=None)

    def update(self, row) -> None:
        """One row: a sequence aligned with ``tasks`` or a mapping task -> accuracy (NaN / None / left out:
        not evaluated)."""
        probe = self.matrix()
        probe.add_row(row)  # validates (and refuses a row past the last step)
        self.rows.append(torch.tensor(probe.R[-1], dtype=torch.float64, device=self.untrained.device))

    def set_untrained(self, accs) -> None:
        self.untrained = torch.tensor(self._proto._vector(accs, "untrained accuracies"), dtype=torch.float64)
        self._computed = None  # torchmetrics caches compute() until the next update

    def set_joint(self, accs) -> None:
        self.joint = torch.tensor(self._proto._vector(accs, "joint-training accuracies"), dtype=torch.float64)
        self._computed = None

    def matrix(self) -> AccuracyMatrix:
        """The rows so far as an :class:`AccuracyMatrix`."""
        def vec(t):
            return None if bool(torch.isnan(t).all()) else t.tolist()

        p = self._proto
        return AccuracyMatrix(p.tasks, p.steps, [r.tolist() for r in self.rows], vec(self.untrained),
                              vec(self.joint))

    def compute(self) -> torch.Tensor:
        v = getattr(self.matrix(), self.which)()
        return torch.tensor(NAN if v is None else v, dtype=torch.float64)

    def forward(self, row) -> torch.Tensor:
        self.update(row)
        return self.compute()


class AverageAccuracy(ContinualMetric):
    """ACC: mean accuracy over the learnt tasks after the last step."""

    which, higher_is_better = "acc", True


class BackwardTransfer(ContinualMetric):
    """BWT: mean change of each earlier task's accuracy since it was learnt (negative: forgetting)."""

    which, higher_is_better = "bwt", True


class ForwardTransfer(ContinualMetric):
    """FWT: mean accuracy on each task just before it is learnt, minus its untrained accuracy."""

    which, higher_is_better = "fwt", True


class Forgetting(ContinualMetric):
    """Mean over earlier tasks of their best earlier accuracy minus their accuracy now."""

    which, higher_is_better = "forgetting", False


class Intransigence(ContinualMetric):
    """Mean over learnt tasks of the joint model's accuracy minus the accuracy just after learning it."""

    which, higher_is_better = "intransigence", False


__all__ = ["AccuracyMatrix", "AverageAccuracy", "BackwardTransfer", "ContinualMetric", "Forgetting",
           "ForwardTransfer", "Intransigence"]
