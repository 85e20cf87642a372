"""The accuracy matrix of a continual run and the metrics computed from it (shared/METHODS.md,
"Continual-learning evaluation").

``R[i][j]``: accuracy on task ``j`` (the columns, ``tasks``) after training steps ``0..i`` (the rows; step
``i`` trains ``steps[i]``, the stream's order, by default ``tasks``). A cell never evaluated is NaN. ``b``
(``untrained``): each task's accuracy before any training; ``joint``: a jointly trained model's. With
``L`` the last row and ``s_j`` the step that trains task ``j`` (none for a task outside ``steps``), task
``j`` is *learnt* when ``s_j <= L``, and over learnt tasks:

- ``ACC = mean_j R[L][j]``;
- ``BWT = mean_{j: s_j < L} (R[L][j] - R[s_j][j])``;
- ``FWT = mean_{j: s_j > 0} (R[s_j - 1][j] - b_j)``;
- forgetting ``f_j = max_{l < L} R[l][j] - R[L][j]`` (every earlier row, as METHODS.md and Chaudhry et al.
  2018 write it), averaged over ``j`` with ``s_j < L``;
- intransigence ``I_j = joint_j - R[s_j][j]``, averaged.

A term whose cells are NaN is left out of its mean (and the per-task value is None); a metric with no
term at all is None, never 0 (one task has no BWT, FWT or forgetting; FWT needs ``b`` and each task
evaluated before it is trained; intransigence needs ``joint``). Avalanche's stream metrics read 0 in
such cases, which looks like a result: here they read None.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import MtpeftError

FORMAT, VERSION = "mtpeft-acc-matrix", 1
NAN = float("nan")
METRICS = ("acc", "bwt", "fwt", "forgetting", "intransigence")


def _names(xs, what: str) -> list[str]:
    xs = list(xs)
    if not xs or not all(isinstance(x, str) and x for x in xs) or len(set(xs)) != len(xs):
        raise MtpeftError(f"AccuracyMatrix: {what} must be a non-empty list of distinct task names, got {xs!r}")
    return xs


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class AccuracyMatrix:
    def __init__(self, tasks: Sequence[str], steps: Sequence[str] | None = None, rows=(), untrained=None,
                 joint=None):
        self.tasks = _names(tasks, "tasks")
        self.steps = _names(self.tasks if steps is None else steps, "steps")
        self.R: list[list[float]] = []
        self.untrained = None if untrained is None else self._vector(untrained, "untrained accuracies")
        self.joint = None if joint is None else self._vector(joint, "joint-training accuracies")
        for r in rows:
            self.add_row(r)

    # ---- filling -----------------------------------------------------------------------------------
    def _vector(self, accs, what: str) -> list[float]:
        """One value per task (a sequence aligned with ``tasks``, or a mapping task -> value; a task left
        out, None or NaN: not evaluated), each a fraction in [0, 1]."""
        if isinstance(accs, Mapping):
            unknown = sorted(set(accs) - set(self.tasks))
            if unknown:
                raise MtpeftError(f"{what} name unknown tasks {unknown}; the matrix's tasks are {self.tasks}")
            accs = [accs.get(t) for t in self.tasks]
        else:
            accs = accs.tolist() if hasattr(accs, "tolist") else list(accs)
            if len(accs) != len(self.tasks):
                raise MtpeftError(f"{what}: {len(accs)} values for {len(self.tasks)} tasks; give one per task "
                                  "(NaN or None where a task was not evaluated)")
        out = []
        for t, a in zip(self.tasks, accs):
            a = NAN if a is None else a
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not (math.isnan(a) or 0.0 <= a <= 1.0):
                raise MtpeftError(f"{what}: task {t!r} has {a!r}; accuracies are fractions in [0, 1] (NaN or "
                                  "None: not evaluated)")
            out.append(float(a))
        return out

    def add_row(self, accs) -> None:
        """The accuracies after the next training step (``steps[len(R)]``)."""
        if len(self.R) >= len(self.steps):
            raise MtpeftError(f"AccuracyMatrix: all {len(self.steps)} steps ({self.steps}) already have a row; "
                              "a row is added once per training step")
        self.R.append(self._vector(accs, f"row {len(self.R)} (after training {self.steps[len(self.R)]!r})"))

    def set_untrained(self, accs) -> None:
        self.untrained = self._vector(accs, "untrained accuracies")

    def set_joint(self, accs) -> None:
        self.joint = self._vector(accs, "joint-training accuracies")

    # ---- metrics -----------------------------------------------------------------------------------
    @property
    def last(self) -> int:
        """The last row's index (-1 before any)."""
        return len(self.R) - 1

    def step_of(self, task: str) -> int | None:
        return self.steps.index(task) if task in self.steps else None

    def _learnt(self):
        """``(j, s_j)`` of each learnt task."""
        for j, t in enumerate(self.tasks):
            s = self.step_of(t)
            if s is not None and s <= self.last:
                yield j, s

    @staticmethod
    def _ok(*xs) -> bool:
        return all(x is not None and not math.isnan(x) for x in xs)

    def _per_task(self, term, when=lambda s: True) -> dict[str, float | None]:
        """``term(j, s_j)`` of each learnt task whose step passes ``when``."""
        return {self.tasks[j]: term(j, s) for j, s in self._learnt() if when(s)}

    def _diff(self, a, b):
        return a - b if self._ok(a, b) else None

    def acc_per_task(self) -> dict[str, float | None]:
        return self._per_task(lambda j, s: self.R[-1][j] if self._ok(self.R[-1][j]) else None)

    def bwt_per_task(self) -> dict[str, float | None]:
        return self._per_task(lambda j, s: self._diff(self.R[-1][j], self.R[s][j]), lambda s: s < self.last)

    def fwt_per_task(self) -> dict[str, float | None]:
        b = self.untrained
        return self._per_task(lambda j, s: self._diff(self.R[s - 1][j], b[j]) if b else None, lambda s: s > 0)

    def forgetting_per_task(self) -> dict[str, float | None]:
        def f(j, s):
            before = [self.R[i][j] for i in range(self.last) if self._ok(self.R[i][j])]
            return max(before) - self.R[-1][j] if before and self._ok(self.R[-1][j]) else None

        return self._per_task(f, lambda s: s < self.last)

    def intransigence_per_task(self) -> dict[str, float | None]:
        jt = self.joint
        return self._per_task(lambda j, s: self._diff(jt[j], self.R[s][j]) if jt else None)

    def acc(self) -> float | None:
        return _mean([v for v in self.acc_per_task().values() if v is not None])

    def bwt(self) -> float | None:
        return _mean([v for v in self.bwt_per_task().values() if v is not None])

    def fwt(self) -> float | None:
        return _mean([v for v in self.fwt_per_task().values() if v is not None])

    def forgetting(self) -> float | None:
        return _mean([v for v in self.forgetting_per_task().values() if v is not None])

    def intransigence(self) -> float | None:
        return _mean([v for v in self.intransigence_per_task().values() if v is not None])

    def summary(self) -> dict[str, float | None]:
        """Every metric by name (``METRICS``); None where undefined."""
        return {m: getattr(self, m)() for m in METRICS}

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def clean(v):
            return None if v is None else [None if math.isnan(x) else x for x in v]

        return {"format": FORMAT, "version": VERSION, "tasks": list(self.tasks), "steps": list(self.steps),
                "R": [clean(r) for r in self.R], "untrained": clean(self.untrained), "joint": clean(self.joint)}

    @classmethod
    def from_dict(cls, d) -> AccuracyMatrix:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MtpeftError(f"not an accuracy matrix (format {FORMAT!r} expected); give what to_dict wrote")
        if d.get("version") != VERSION:
            raise MtpeftError(f"accuracy matrix version {d.get('version')!r}; this mtpeft reads {VERSION}")
        extra = set(d) - {"format", "version", "tasks", "steps", "R", "untrained", "joint"}
        if extra or not isinstance(d.get("R"), list):
            raise MtpeftError(f"accuracy matrix: unknown fields {sorted(extra)} or no 'R' list; re-create it")
        return cls(d.get("tasks") or [], d.get("steps"), d["R"], d.get("untrained"), d.get("joint"))

    def save(self, path: str | Path) -> None:
        from ..io import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> AccuracyMatrix:
        from ..io import read_json

        return cls.from_dict(read_json(path, what="accuracy matrix"))
