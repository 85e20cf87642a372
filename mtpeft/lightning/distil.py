"""The distillation objective (MPT's source stage, usable by any phase): task loss + KL + hidden-state MSE.

``loss = task * CE(student, target) + kl * T^2 * KL(p_teacher^T || p_student^T) + mse * MSE(h_student, h_teacher)``

- ``p^T``: the softmax of the logits divided by the temperature ``T`` over the labels an example can take
  (the ``-inf`` columns carry no mass); ``T^2`` keeps the gradient's scale as ``T`` grows (Hinton et al.).
- ``h``: the last layer's hidden states of the input, from the first routed bank forward of the step (the
  encoder's input pass; the causal scorer's prompt pass, not its label continuations): ``hidden="pooled"``
  their mean over the real tokens ``[B, H]``, ``hidden="tokens"`` every real token ``[B, T, H]`` (virtual
  prompt positions excluded, so teacher and student need not have the same prompt length).

The teacher: ``teachers`` maps each task to its teacher module; the teacher's forward runs in ``__call__``
under ``torch.no_grad()`` with task-id routing to those modules, on the same texts, tasks and label space.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import MtpeftError
from ..routing import RouteContext
from .objectives import Objective, register_objective

HIDDEN = ("pooled", "tokens")


@contextlib.contextmanager
def capture_hidden(bank, into: list):
    """Append the ``BankOutput`` of each routed (not bare) bank forward in scope to ``into``."""
    def hook(module, args, kwargs, out):
        if not bank.state.bare and not _continuing(kwargs):
            into.append(out)

    handle = bank.register_forward_hook(hook, with_kwargs=True)
    try:
        yield into
    finally:
        handle.remove()


def _continuing(kwargs) -> bool:
    """A forward that continues a key/value cache (the causal scorer's label tokens)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache is not None and cache.get_seq_length() > 0


def hidden_of(out, how: str) -> Tensor:
    """The input's last-layer states of a ``BankOutput``: mean over real tokens ``[B, H]`` or all ``[B, T, H]``."""
    h = out.output[:, out.n_virtual:]
    m = out.attention_mask[:, out.n_virtual:].unsqueeze(-1).to(h.dtype)
    if how == "tokens":
        return h * m
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def kl_teacher_student(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Mean over examples of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over each example's finite
    labels."""
    valid = torch.isfinite(student) & torch.isfinite(teacher)
    ls = (student.float() / temperature).masked_fill(~valid, float("-inf")).log_softmax(-1)
    lt = (teacher.float() / temperature).masked_fill(~valid, float("-inf")).log_softmax(-1)
    kl = torch.where(valid, lt.exp() * (lt - ls), torch.zeros_like(ls)).sum(-1)
    return kl.mean() * temperature ** 2


@register_objective("distil")
class Distillation(Objective):
    def __init__(self, teachers: Mapping[str, str] | None = None, task: float = 1.0, kl: float = 1.0,
                 mse: float = 0.0, temperature: float = 1.0, hidden: str = "pooled"):
        if not teachers:
            raise MtpeftError("the distil objective needs teachers: a mapping task name -> teacher module name")
        for k, v in (("task", task), ("kl", kl), ("mse", mse)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise MtpeftError(f"loss weight {k} must be a number >= 0, got {v!r}")
        if not task + kl + mse > 0:
            raise MtpeftError("every loss weight (task, kl, mse) is 0: nothing would be learnt; give one > 0")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise MtpeftError(f"temperature must be a number > 0, got {temperature!r}")
        if hidden not in HIDDEN:
            raise MtpeftError(f"hidden must be one of {HIDDEN}, got {hidden!r}")
        from ..routers import TaskIdRouter

        self.teachers = dict(teachers)
        self.router = TaskIdRouter(self.teachers)
        self.task, self.kl, self.mse = float(task), float(kl), float(mse)
        self.temperature, self.hidden = float(temperature), hidden
        self._student: list = []

    def capture(self, module, batch):
        self._student = []
        return capture_hidden(module.bank, self._student) if self.mse else contextlib.nullcontext()

    @torch.no_grad()
    def teacher(self, module, batch: dict) -> tuple[Tensor, Tensor | None]:
        """The teachers' logits on the batch and, when the MSE term is on, their hidden states."""
        tasks = [module.tasks[i] for i in batch["task"].tolist()]
        ctx = RouteContext.for_tasks([t.name for t in tasks], texts=list(batch["text"]))
        kw = {"labels": module.labels} if module.labels is not None else {}
        seen: list = []
        grab = capture_hidden(module.bank, seen) if self.mse else contextlib.nullcontext()
        with grab, module.bank.route(self.router, ctx):
            logits = module.scorer.logits(module.bank, batch["text"], tasks, **kw)
        return logits, (hidden_of(seen[0], self.hidden) if self.mse else None)

    def __call__(self, module, batch, logits):
        logs: dict[str, Tensor] = {}
        loss = logits.new_zeros(())
        if self.task:
            ce = F.cross_entropy(logits, batch["target"].to(logits.device))
            loss, logs["task_loss"] = loss + self.task * ce, ce.detach()
        if self.kl or self.mse:
            t_logits, t_hidden = self.teacher(module, batch)
            if self.kl:
                kl = kl_teacher_student(logits, t_logits, self.temperature)
                loss, logs["kl"] = loss + self.kl * kl, kl.detach()
            if self.mse:
                if not self._student:
                    raise MtpeftError("the distil objective saw no student forward to take hidden states from")
                mse = F.mse_loss(hidden_of(self._student[0], self.hidden).float(), t_hidden.float())
                loss, logs["mse"] = loss + self.mse * mse, mse.detach()
        self._student = []
        return loss, logs

    def get_config(self):
        return {"teachers": self.teachers, "task": self.task, "kl": self.kl, "mse": self.mse,
                "temperature": self.temperature, "hidden": self.hidden}
