"""LoraHub: compose a library of LoRA experts for a new task from a few examples, without gradients.

``A' = sum_i w_i A_i``, ``B' = sum_i w_i B_i`` with ``w`` in ``[-1.5, 1.5]^N``, found by nevergrad's NGOpt (about
40 evaluations) minimising the few-shot loss (the scorer's cross-entropy) + ``0.05 * mean |w|``; the search starts
at ``w = 0``, as the reference does. Each evaluation is one no-grad pass over the few-shot examples with the
experts' parameters mixed once for the whole batch (a factored ``Routing``, one row). The composed module is
added to the bank as a plain LoRA (``metadata.lorahub``: the weights), routed like any expert after.
``mtpeft adapt --methods lorahub`` runs this (``mtpeft/adapt/methods/lorahub.py``).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..io import MtpeftError
from ..routing import Routing

BOUND = 1.5
REG = 0.05
BUDGET = 40


def optimise_weights(loss: Callable[[list[float]], float], n: int, budget: int = BUDGET, bound: float = BOUND,
                     reg: float = REG, seed: int = 0) -> tuple[list[float], float]:
    """``w`` in ``[-bound, bound]^n`` minimising ``loss(w) + reg * mean |w|`` with NGOpt in ``budget`` evaluations
    from ``w = 0``. Returns the weights and their objective."""
    try:
        import nevergrad as ng
        import numpy as np
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise MtpeftError("LoraHub needs nevergrad: pip install nevergrad") from e
    if n < 1:
        raise MtpeftError("LoraHub needs at least one expert to compose")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MtpeftError(f"budget must be a positive number of evaluations, got {budget!r}")
    if not bound > 0 or not reg >= 0:
        raise MtpeftError(f"bound must be > 0 and reg >= 0, got bound={bound!r}, reg={reg!r}")
    param = ng.p.Array(init=np.zeros(n), lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget)

    seen: dict[tuple, float] = {}

    def objective(w) -> float:
        w = [float(x) for x in np.clip(w, -bound, bound)]
        v = float(loss(w)) + reg * sum(abs(x) for x in w) / n
        v = v if math.isfinite(v) else float("inf")  # NaN -> worst
        seen[tuple(w)] = v
        return v

    with warnings.catch_warnings():  # scipy's COBYLA (one of NGOpt's picks) warns about its own default
        warnings.filterwarnings("ignore", message=r".*RHOEND.*")
        rec = opt.minimize(objective)
    w = [float(x) for x in np.clip(rec.value, -bound, bound)]
    return w, seen[tuple(w)] if tuple(w) in seen else objective(w)


def few_shot_loss(bank, scorer, task, experts: Sequence[str], split: str = "train", max_examples: int | None = None,
                  batch_size: int = 64) -> Callable[[list[float]], float]:
    """``loss(w)``: the mean cross-entropy on ``task``'s ``split`` (its first ``max_examples``) with the experts'
    parameters mixed by ``w`` (one mixture for every example)."""
    ids = bank.ids(list(experts))
    group = bank.common_group(experts, "the experts LoraHub composes,")
    if group.mtype.name != "lora":
        raise MtpeftError(f"LoraHub composes LoRA experts, not {group.mtype.name!r} ones")
    ds = task.splits[split]
    n = len(ds) if max_examples is None else min(len(ds), max_examples)
    if n == 0:
        raise MtpeftError(f"task {task.name!r} has no {split} examples to compose the experts on")
    texts, labels = ds["text"][:n], torch.tensor(ds["label"][:n])

    @torch.no_grad()
    def loss(w: list[float]) -> float:
        bank.eval()
        weights = torch.tensor([w], dtype=torch.float32, device=bank.device)
        total = 0.0
        for s in range(0, n, batch_size):
            chunk = texts[s: s + batch_size]
            routing = Routing(weights, ids[None].to(bank.device), "params",
                              torch.zeros(len(chunk), dtype=torch.long, device=bank.device))
            logits = scorer.logits(bank, chunk, task, routing).float()
            total += float(F.cross_entropy(logits, labels[s: s + batch_size].to(logits.device), reduction="sum"))
        return total / n

    return loss


def compose(bank, experts: Sequence[str], weights: Sequence[float], name: str, task: str | None = None,
            metadata: dict | None = None) -> int:
    """Add module ``name``: ``A = sum_i w_i A_i``, ``B = sum_i w_i s_i B_i`` over the LoRA ``experts``
    (``merge.compose_factors``: the factors summed apart, each expert's scale folded into B). Returns its id."""
    from ..merge import compose_factors

    if len(experts) != len(weights):
        raise MtpeftError(f"{len(experts)} experts but {len(weights)} weights")
    meta = {"lorahub": {e: round(float(w), 6) for e, w in zip(experts, weights)}, **(metadata or {})}
    compose_factors(bank, list(experts), [float(w) for w in weights], name, method="lorahub", task=task, metadata=meta)
    return bank.index(name)


def lorahub(bank, scorer, task, experts: Sequence[str] | None = None, name: str | None = None, *,
            budget: int = BUDGET, bound: float = BOUND, reg: float = REG, max_examples: int | None = None,
            split: str = "train", seed: int = 0, metadata: dict | None = None) -> dict:
    """Find the weights for ``task`` from its ``split`` (the few-shot examples), add the composed module
    (``name``, default ``<task>-lorahub``) and return ``{"module", "weights", "objective", "evaluations"}``.
    ``experts``: LoRA modules of one group (default: every unmerged LoRA module of the bank)."""
    if experts is None:
        experts = [r.name for r in bank.records if r.type == "lora" and not r.merged]
    experts = list(experts)
    name = name or f"{task.name}-lorahub"
    if name in bank:
        raise MtpeftError(f"the bank already has a module named {name!r}; give another name")
    loss = few_shot_loss(bank, scorer, task, experts, split, max_examples)
    w, obj = optimise_weights(loss, len(experts), budget, bound, reg, seed)
    compose(bank, experts, w, name, task=task.name, metadata=metadata)
    return {"module": name, "weights": dict(zip(experts, w)), "objective": obj, "evaluations": budget,
            "loss_at_zero": loss([0.0] * len(experts))}
