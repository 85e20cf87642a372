"""MbPA++ local adaptation (d'Autume et al. 2019) at test time, over a strategy's one shared module.

For each input: its ``k`` nearest neighbours in the replay memory (frozen-backbone embeddings, inner
product); ``steps`` gradient steps (SGD, ``lr``) on the module on those neighbours, minimising their
cross-entropy plus ``l2 / 2 * ||theta - theta_0||^2`` (MbPA++'s pull back to the stored weights); predict the
input; put the stored weights back. Inputs whose neighbour sets are the same share one adaptation (one
group of the batch per distinct set). The module is adapted in place and restored bit for bit afterwards
(the cheapest copy), so the stored module never changes; ``LocalAdapted.stats`` counts the examples and the
seconds spent, for the latency per example.

Enabled per strategy (``strategies: {replay: {local_adapt: {k: 8, steps: 5, lr: 0.01}}}``) or for the run's
strategies by ``mtpeft continual --local-adapt``; strategies with a memory and one shared module take it
(``replay``, ``conpet-static``). It costs ``steps`` forward and backward passes on ``k`` examples per distinct
neighbour set, about one per test input: ``final_only: true`` adapts only in the evaluation after the last
task (the final accuracies, where its gain is read; the earlier rows are the plain module's).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MtpeftError
from ..routers import FixedRouter

DEFAULTS = {"k": 8, "steps": 5, "lr": 0.01, "l2": 0.001, "final_only": False}


@dataclass(frozen=True)
class LocalAdaptConfig:
    k: int = 8
    steps: int = 5
    lr: float = 0.01
    l2: float = 0.001
    final_only: bool = False  # adapt only when evaluating after the stream's last task (the rest plain)

    @classmethod
    def parse(cls, value, who: str) -> LocalAdaptConfig | None:
        """``value``: None/False (off), True (the defaults) or a mapping of some of k, steps, lr, l2."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise MtpeftError(f"{who}: local_adapt must be true or a mapping {{k: 8, steps: 5, lr: 0.01, l2: 0.001, "
                              f"final_only: false}}, got {value!r}")
        unknown = sorted(set(value) - set(DEFAULTS))
        if unknown:
            raise MtpeftError(f"{who}: local_adapt has unknown key(s) {unknown}; it takes {', '.join(DEFAULTS)}")
        conf = {**DEFAULTS, **value}
        for key in ("k", "steps"):
            v = conf[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MtpeftError(f"{who}: local_adapt.{key} must be a positive integer, got {v!r}")
        for key in ("lr", "l2"):
            v = conf[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf") \
                    or (key == "lr" and v == 0):
                raise MtpeftError(f"{who}: local_adapt.{key} must be a finite number > 0 (l2: >= 0), got {v!r}")
        if not isinstance(conf["final_only"], bool):
            raise MtpeftError(f"{who}: local_adapt.final_only must be true or false, got {conf['final_only']!r}")
        return cls(conf["k"], conf["steps"], float(conf["lr"]), float(conf["l2"]), conf["final_only"])


def neighbour_groups(ids: Tensor) -> tuple[Tensor, Tensor]:
    """``ids`` ``[B, k]`` neighbour ids per input -> ``(sets [G, k], group [B])``: the distinct sets (sorted
    ids, -1 padding dropped at use) and each input's set."""
    sets, group = torch.unique(ids.sort(-1).values, dim=0, return_inverse=True)
    return sets, group


class LocalAdapted:
    """What ``evaluate.task_accuracy`` calls instead of a router (``predict_logits``): ``module`` adapted to
    each input's neighbours in ``memory``, then restored."""

    def __init__(self, module: str, memory, tasks: dict, conf: LocalAdaptConfig, timings: dict | None = None):
        self.module, self.memory, self.tasks, self.conf = module, memory, tasks, conf
        self.stats = {"examples": 0, "seconds": 0.0, "adaptations": 0}
        self.timings = timings  # a run step's timings: local_adapt_s and local_adapt_n added up there

    def predict_logits(self, bank, scorer, texts, task, space) -> Tensor:
        from ..memory import embed_texts

        t0 = time.perf_counter()
        router = FixedRouter({self.module: 1.0})
        q = embed_texts(bank, task.format_inputs(list(texts)))
        _, ids = self.memory.search(q, min(self.conf.k, len(self.memory)))
        sets, group = neighbour_groups(ids)
        params = bank.module_parameters(self.module)
        saved = {k: p.detach().clone() for k, p in params.items()}
        grad_was = {k: p.requires_grad for k, p in params.items()}
        out = None
        try:
            for g in range(sets.shape[0]):  # one adaptation per distinct neighbour set
                rows = (group == g).nonzero().flatten()
                nb = [int(i) for i in sets[g].tolist() if i >= 0]
                if nb:
                    self._adapt(bank, scorer, router, params, saved, nb, space)
                with torch.no_grad():
                    part = scorer.logits(bank, [texts[int(r)] for r in rows], task, router, labels=space)
                if out is None:
                    out = part.new_full((len(texts), part.shape[1]), float("-inf"))
                out[rows.to(part.device)] = part
                _restore(bank, self.module, params, saved)
        finally:
            _restore(bank, self.module, params, saved)
            for k, p in params.items():
                p.requires_grad_(grad_was[k])
            bank.eval()
        self.stats["examples"] += len(texts)
        self.stats["adaptations"] += int(sets.shape[0])
        dt = time.perf_counter() - t0
        self.stats["seconds"] += dt
        if self.timings is not None:
            self.timings["local_adapt_s"] = self.timings.get("local_adapt_s", 0.0) + dt
            self.timings["local_adapt_n"] = self.timings.get("local_adapt_n", 0) + len(texts)
        return out

    def _adapt(self, bank, scorer, router, params, saved, nb: list[int], space) -> None:
        examples = self.memory.get(nb)
        tasks = [self.tasks[e.task] for e in examples]
        labels = torch.tensor([e.label for e in examples])
        if space is not None:
            labels = torch.stack([space.to_global(t, y.reshape(1))[0] for t, y in zip(tasks, labels)])
        texts = [e.text for e in examples]
        for p in params.values():
            p.requires_grad_(True)
        bank.train()
        with torch.enable_grad():  # evaluation runs under no_grad
            self._steps(bank, scorer, router, params, saved, texts, tasks, labels, space)
        bank.eval()
        for _, stack in bank.stacks_of(self.module):
            stack.invalidate()

    def _steps(self, bank, scorer, router, params, saved, texts, tasks, labels, space) -> None:
        opt = torch.optim.SGD(list(params.values()), lr=self.conf.lr)
        for _ in range(self.conf.steps):
            logits = scorer.logits(bank, texts, tasks, router, labels=space)
            loss = F.cross_entropy(logits, labels.to(logits.device))
            if self.conf.l2:
                loss = loss + self.conf.l2 / 2 * sum(((p - saved[k]) ** 2).sum() for k, p in params.items())
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def _restore(bank, module: str, params: dict, saved: dict) -> None:
    for k, p in params.items():
        p.copy_(saved[k])
    for _, stack in bank.stacks_of(module):
        stack.invalidate()


__all__ = ["LocalAdaptConfig", "LocalAdapted", "neighbour_groups"]
