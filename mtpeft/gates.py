"""Post-hoc routing state of a trained expert: its PHATGOOSE gates and its retrieval centroid.

``fit_gates`` trains one gate vector per site of one expert on that expert's task data, with the expert and
the backbone frozen (bit-identical after), through the same Lightning phase as every other fit
(``fit_phase`` with a ``PhatgooseGates`` router whose parameters are the gates, at their own learning rate).
``fit_centroid`` averages the frozen backbone's pooled embedding of a sample of the task's training inputs.
Both store their result as the module's artifacts (saved with the bank); ``prepare_expert`` does both.

Settings (the reference repo r-three/phatgoose, ``colm/experiments/train.gin``): 100 steps, AdamW at lr
5e-3 with no weight decay, constant schedule after a linear warmup over 6% of the steps, gates zero-init.
"""
from __future__ import annotations

import dataclasses
import random
import time

import torch

from .io import MtpeftError
from .routers.base import Router
from .routers.phatgoose import PhatgooseGates, gate_key, gates_of
from .routers.retrieval import CENTROID, COUNT
from .routing import Routing

GATE_STEPS = 100
GATE_LR = 5e-3
GATE_WARMUP = 0.06  # fraction of the steps
CENTROID_EXAMPLES = 256


def fit_gates(bank, scorer, task, module: str, cfg=None, *, steps: int = GATE_STEPS, lr: float = GATE_LR,
              warmup: float = GATE_WARMUP) -> dict:
    """Train the PHATGOOSE gates of ``module`` on ``task``'s training split for ``steps`` steps, every module
    of the bank and the backbone frozen; store them as ``phatgoose_gate:<site>`` artifacts of the module.

    ``cfg`` (a ``TrainConfig``) gives the batch size, seed, progress bar and run directory; steps, lr, warmup,
    no weight decay and one validation at the end (its accuracy is reported, the last gates are kept) are the
    gate recipe's. Returns steps, val_acc (with the gates), train_seconds, sites, lr, seed.
    """
    from .train import TrainConfig, fit_phase

    if int(steps) < 1:
        raise MtpeftError(f"gate training needs at least one step, got steps={steps}; e.g. --steps 100")
    if not lr > 0:
        raise MtpeftError(f"gate training needs a positive learning rate, got {lr}; e.g. --lr 5e-3")
    if len(task.splits["train"]) == 0:
        raise MtpeftError(f"task {task.name!r} has no training examples to gate module {module!r} on")
    if bank.record(module).merged:
        raise MtpeftError(f"module {module!r} is merged into the base weights, so a gate cannot scale it; "
                          f"unmerge it first (bank.unmerge({module!r}))")
    router = PhatgooseGates.for_module(bank, module)
    cfg = cfg or TrainConfig()
    steps = int(steps)
    cfg = dataclasses.replace(cfg, lr=lr, max_steps=steps, max_epochs=-1, weight_decay=0.0,
                              warmup_steps=max(1, round(warmup * steps)) if warmup > 0 else 0,
                              val_check_interval=steps, patience=steps)
    bank.freeze()  # only the gates train
    t0 = time.perf_counter()
    metrics = fit_phase(bank, scorer, [task], router, cfg, router_lr=lr, name=f"{module}.gates")
    for site, g in router.gate_tensors().items():
        bank.set_artifact(module, gate_key(site), g)
    out = {"steps": metrics["steps"], "val_acc": metrics["best_val_acc"], "sites": len(router.sites),
           "lr": lr, "seed": metrics["seed"], "train_seconds": round(time.perf_counter() - t0, 2)}
    bank.record(module).metrics["phatgoose"] = {k: out[k] for k in ("steps", "val_acc", "lr")}
    return out


class _Pooled(Router):
    """Collects ``ctx.pooled()`` of each batch it routes and routes to nothing (the bare backbone runs)."""

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def route(self, bank, ctx) -> Routing | None:
        self.seen.append(ctx.pooled().float().cpu())
        return None


@torch.no_grad()
def fit_centroid(bank, scorer, task, module: str, n: int = CENTROID_EXAMPLES, seed: int = 0,
                 batch_size: int = 64) -> dict:
    """Store the mean frozen-backbone pooled embedding of ``n`` training inputs of ``task`` (a seeded sample)
    as ``module``'s ``retrieval_centroid`` (and ``retrieval_count``). The inputs go through ``scorer`` as the
    routers see them at evaluation (formatted by the task's template)."""
    bank.index(module)
    texts = list(task.splits["train"]["text"])
    if not texts:
        raise MtpeftError(f"task {task.name!r} has no training examples for the centroid of module {module!r}")
    if n < 1:
        raise MtpeftError(f"a centroid needs at least one example, got n={n}")
    if len(texts) > n:
        texts = [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), n))]
    probe = _Pooled()
    was = bank.training
    bank.eval()
    try:
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            scorer.logits(bank, chunk, [task] * len(chunk), probe)
    finally:
        bank.train(was)
    pooled = torch.cat(probe.seen)
    bank.set_artifact(module, CENTROID, pooled.mean(0))
    bank.set_artifact(module, COUNT, torch.tensor([len(texts)], dtype=torch.long))
    return {"centroid_n": len(texts)}


def prepare_expert(bank, scorer, task, module: str, cfg=None, *, steps: int = GATE_STEPS, lr: float = GATE_LR,
                   centroid_examples: int = CENTROID_EXAMPLES) -> dict:
    """Gate ``module`` on ``task`` (``fit_gates``) and compute its retrieval centroid (``fit_centroid``)."""
    seed = 0 if cfg is None else cfg.seed
    out = fit_gates(bank, scorer, task, module, cfg, steps=steps, lr=lr)
    out.update(fit_centroid(bank, scorer, task, module, n=centroid_examples, seed=seed))
    return out


__all__ = ["CENTROID_EXAMPLES", "GATE_LR", "GATE_STEPS", "fit_centroid", "fit_gates", "gates_of", "prepare_expert"]
