"""``olora`` (O-LoRA, Wang et al. 2023): a new LoRA per task, trained with the earlier tasks' LoRAs frozen and
active (all summed) and a penalty keeping its down-projection A orthogonal to theirs,
``lambda_orth * sum_sites sum |A_new A_old^T|`` (plus ``lambda_l2 * ||new LoRA||^2``); at test every LoRA
learnt so far is summed, with no task id. Defaults as the reference implementation (lamda_1 = 0.5,
lamda_2 = 0, the new LoRA initialised as any LoRA).

``orth_init: true`` (not in the paper) starts the new A orthogonal to the earlier tasks' A at every site
(each row projected on the complement of their span, its norm kept), so the penalty starts near 0: with
Kaiming-initialised A the penalty starts large (about 10-40 at r = 8 on MiniLM's 12 sites) and a short
budget is spent mostly on shrinking it rather than on the task (docs/continual.md)."""
from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import MtpeftError
from ...lightning.objectives import CrossEntropy
from ...routers import FixedRouter
from .base import Strategy, register_strategy


class OrthogonalLoRA(CrossEntropy):
    """Cross-entropy plus O-LoRA's penalties on the new module ``new`` against the frozen ``old`` ones."""

    name = "olora"

    def __init__(self, bank, new: str, old: list[str], lambda_orth: float, lambda_l2: float):
        super().__init__()
        self.lambda_orth, self.lambda_l2 = lambda_orth, lambda_l2
        params = bank.module_parameters(new)
        self.new_A = {k: p for k, p in params.items() if k.endswith(".lora_A")}
        self.new_all = list(params.values())
        self.old_A = {}  # site -> the earlier tasks' A stacked [sum r, d_in], frozen
        for k in self.new_A:
            olds = [bank.module_parameters(o)[k].detach() for o in old]
            if olds:
                self.old_A[k] = torch.cat(olds)

    def __call__(self, module, batch, logits):
        loss, extra = super().__call__(module, batch, logits)
        orth = logits.new_zeros(())
        for k, A in self.new_A.items():
            if k in self.old_A:
                orth = orth + (A @ self.old_A[k].to(A.device).t()).abs().sum()
        l2 = sum((p.float() ** 2).sum() for p in self.new_all) if self.lambda_l2 else logits.new_zeros(())
        return loss + self.lambda_orth * orth + self.lambda_l2 * l2, {**extra, "orth": orth.detach()}

    def get_config(self):
        return {"lambda_orth": self.lambda_orth, "lambda_l2": self.lambda_l2}


@torch.no_grad()
def orthogonal_init(bank, new: str, old: list[str]) -> None:
    """Project each row of ``new``'s A on the orthogonal complement of the span of ``old``'s A rows (per site),
    keeping its norm."""
    params = bank.module_parameters(new)
    for k, A in params.items():
        if not k.endswith(".lora_A"):
            continue
        olds = torch.cat([bank.module_parameters(o)[k].detach() for o in old]).float()
        Q = torch.linalg.qr(olds.t()).Q  # [d_in, sum r]: an orthonormal basis of the old rows
        proj = A.float() - (A.float() @ Q) @ Q.t()
        scale = A.float().norm(dim=1, keepdim=True) / proj.norm(dim=1, keepdim=True).clamp_min(1e-12)
        A.copy_((proj * scale).to(A.dtype))
    for _, stack in bank.stacks_of(new):
        stack.invalidate()


@register_strategy("olora")
class OLoRA(Strategy):
    module_types = ("lora",)
    defaults: ClassVar[dict] = {"lambda_orth": 0.5, "lambda_l2": 0.0, "orth_init": False}

    def check_options(self):
        for k in ("lambda_orth", "lambda_l2"):
            v = self.options[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise MtpeftError(f"olora: {k} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.options["orth_init"], bool):
            raise MtpeftError(f"olora: orth_init must be true or false, got {self.options['orth_init']!r}")

    def _sum_of(self, tasks) -> FixedRouter:
        return FixedRouter({self.module_name(t): 1.0 for t in tasks})

    def before_task(self, step, task):
        self.add_module(self.module_name(task), task)
        if self.options["orth_init"] and step:
            orthogonal_init(self.ctx.bank, self.module_name(task), [self.module_name(t) for t in self.learnt(step - 1)])

    def train_task(self, step, task):
        old = [self.module_name(t) for t in self.learnt(step - 1)] if step else []
        objective = OrthogonalLoRA(self.ctx.bank, self.module_name(task), old, float(self.options["lambda_orth"]),
                                   float(self.options["lambda_l2"]))
        return self.fit([task], self._sum_of(self.learnt(step)), self.fit_name(task), step, objective=objective)

    def after_task(self, step, task):
        self.ctx.bank.freeze(self.module_name(task))

    def eval_router(self, step, task):
        return self._sum_of(self.learnt(step))
