"""The distillation objective (MPT's source stage, usable by any phase): task loss + KL + hidden-state MSE.

``loss = task * CE(student, target) + kl * T^2 * KL(p_teacher^T || p_student^T) + mse * MSE(h_student, h_teacher)``

- ``p^T``: the softmax of the logits divided by the temperature ``T`` over the labels an example can take
  (the ``-inf`` columns carry no mass); ``T^2`` keeps the gradient's scale as ``T`` grows (Hinton et al.).
- ``h``: the last layer's hidden states of the input, from the first routed bank forward of the step (the
  encoder's input pass; the causal scorer's prompt pass, not its label continuations): ``hidden="pooled"``
  their mean over the real tokens ``[B, H]``, ``hidden="tokens"`` every real token ``[B, T, H]`` (virtual
  prompt positions excluded, so teacher and student need not have the same prompt length).

The teacher: ``teachers`` maps each task to its teacher module; the teacher's forward runs in ``__call__``
under ``torch.no_grad()``, with the bank's modules in eval mode (a teacher is a fixed function: no dropout), with
task-id routing to those modules, on the same texts, tasks and label space.

The teachers are frozen, so their answer for an example never changes: it is computed the first time the example
is seen and kept (``cache_mb`` of CPU memory at most, 0: never kept), so later epochs run only the student. Each
example's row is kept at its own width (its task's labels, its real tokens) and re-padded to the batch it is in.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

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
                 mse: float = 0.0, temperature: float = 1.0, hidden: str = "pooled", cache_mb: float = 1024.0):
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
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or not cache_mb >= 0:
            raise MtpeftError(f"cache_mb must be a number >= 0 (MiB of teacher outputs kept; 0: none), got {cache_mb!r}")
        from ..routers import TaskIdRouter

        self.teachers = dict(teachers)
        self.router = TaskIdRouter(self.teachers)
        self.task, self.kl, self.mse = float(task), float(kl), float(mse)
        self.temperature, self.hidden = float(temperature), hidden
        self.cache_mb = float(cache_mb)
        self._student: list = []
        self._cache: dict = {}  # (task, text, label space) -> (logits row, hidden row or None)
        self._cached_bytes = 0

    def capture(self, module, batch):
        self._student = []
        return capture_hidden(module.bank, self._student) if self.mse else contextlib.nullcontext()

    @torch.no_grad()
    def teacher(self, module, batch: dict) -> tuple[Tensor, Tensor | None]:
        """The teachers' logits on the batch and, when the MSE term is on, their hidden states: kept rows for the
        examples seen before, one teacher forward for the others."""
        tasks = [module.tasks[i] for i in batch["task"].tolist()]
        texts = list(batch["text"])
        space = None if module.labels is None else module.labels.key
        keys = [(t.name, s, space) for t, s in zip(tasks, texts)]
        fresh: dict = {}
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            at = {k: i for i, k in enumerate(keys)}
            sub = [at[k] for k in todo]
            logits, hidden, real = self._forward(module, [texts[i] for i in sub], [tasks[i] for i in sub])
            if self.mse and self.hidden == "tokens" and bool((real < 0).any()):
                # the real tokens are not the leading ones (left padding): rows cannot be re-padded, none kept;
                # the whole batch from one forward (unless that was it)
                if len(sub) < len(keys):
                    logits, hidden, _ = self._forward(module, texts, tasks)
                return logits, hidden
            for j, (k, i) in enumerate(zip(todo, sub)):
                fresh[k] = self._row(logits[j], None if hidden is None else hidden[j], real[j], tasks[i], space)
            self._keep(fresh)
        rows = [self._cache[k] if k in self._cache else fresh[k] for k in keys]
        dev = module.bank.device
        logits = _stack([r[0] for r in rows], float("-inf")).to(dev)
        hidden = _stack([r[1] for r in rows], 0.0).to(dev) if self.mse else None
        return logits, hidden

    def _forward(self, module, texts: list, tasks: list) -> tuple[Tensor, Tensor | None, Tensor]:
        """One teacher forward (eval mode, task-id routing): logits, hidden states and each row's real token count
        (``-1`` where the real tokens are not the leading ones, which are then not kept)."""
        bank = module.bank
        ctx = RouteContext.for_tasks([t.name for t in tasks], texts=texts)
        kw = {"labels": module.labels} if module.labels is not None else {}
        seen: list = []
        grab = capture_hidden(bank, seen) if self.mse else contextlib.nullcontext()
        was = bank.training
        bank.train(False)
        try:
            with grab, bank.route(self.router, ctx):
                logits = module.scorer.logits(bank, texts, tasks, **kw)
        finally:
            bank.train(was)
        if not self.mse:
            return logits, None, torch.full((len(texts),), -1)
        out = seen[0]
        m = out.attention_mask[:, out.n_virtual:].bool().cpu()
        n = m.sum(1)
        leading = (m == (torch.arange(m.shape[1])[None, :] < n[:, None])).all(1)
        return logits, hidden_of(out, self.hidden), torch.where(leading, n, -1)

    def _row(self, logits: Tensor, hidden: Tensor | None, real: int, task, space) -> tuple:
        """One example's kept row: its logits (the task's own labels only in task-local columns) and hidden
        states (the real tokens only, with ``hidden='tokens'``)."""
        logits = logits.cpu() if space is not None else logits[: task.num_labels].cpu()
        if hidden is not None and self.hidden == "tokens":
            hidden = hidden[: int(real)]
        return logits, None if hidden is None else hidden.cpu()

    def _keep(self, fresh: dict) -> None:
        """Keep the fresh rows while the cache is under its budget."""
        budget = self.cache_mb * 2 ** 20
        for k, (lg, h) in fresh.items():
            size = lg.numel() * lg.element_size() + (0 if h is None else h.numel() * h.element_size())
            if self._cached_bytes + size > budget:
                return
            self._cache[k] = (lg, h)
            self._cached_bytes += size

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
                h = hidden_of(self._student[0], self.hidden).float()
                mse = F.mse_loss(h, _pad_to(t_hidden.float(), h.shape))
                loss, logs["mse"] = loss + self.mse * mse, mse.detach()
        self._student = []
        return loss, logs

    def get_config(self):
        return {"teachers": self.teachers, "task": self.task, "kl": self.kl, "mse": self.mse,
                "temperature": self.temperature, "hidden": self.hidden, "cache_mb": self.cache_mb}


def _stack(rows: list[Tensor], fill: float) -> Tensor:
    """Rows of different lengths (first dimension) right-padded with ``fill`` and stacked."""
    return pad_sequence(rows, batch_first=True, padding_value=fill)


def _pad_to(teacher: Tensor, shape) -> Tensor:
    """The teacher's token states ``[B, T', H]`` zero-padded to the student's ``[B, T, H]`` (pooled: as is)."""
    if teacher.shape == shape:
        return teacher
    if teacher.dim() != 3 or teacher.shape[1] > shape[1]:
        raise MtpeftError(f"teacher hidden states {tuple(teacher.shape)} do not fit the student's {tuple(shape)}")
    return F.pad(teacher, (0, 0, 0, shape[1] - teacher.shape[1]))
