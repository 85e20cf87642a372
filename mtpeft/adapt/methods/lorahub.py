"""``lorahub`` (Huang et al., 2023): weights ``w`` in ``[-1.5, 1.5]^N`` over the N source experts, found without
gradients by nevergrad's NGOpt (about 40 evaluations, from ``w = 0``) on the few-shot cross-entropy plus
``0.05 * mean |w|``; the experts' factors are composed as LoraHub does, ``A = sum_i w_i A_i`` and
``B = sum_i w_i B_i`` (``merge.compose_factors``: the factors summed apart, not the deltas), and the composed
module is added to the bank. Nothing is trained by gradient; the parameters searched are the N weights.

During the search each candidate is scored by routing the shots through the experts with ``mix='params'``
weights ``w`` (the same computation as the composed module, without building it each time).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import MtpeftError
from ...routing import Routing
from .base import AdaptContext, AdaptMethod, AdaptResult, register_method

EVAL_BATCH = 64


def same_group(bank, experts: list[str], method: str) -> None:
    """Parameter mixing composes experts of one LoRA configuration (one stack at every site)."""
    odd = [e for e in experts if bank.record(e).type != "lora"]
    if odd:
        raise MtpeftError(f"{method} composes LoRA experts; {odd} are not LoRA modules: choose LoRA experts with "
                          "--experts")
    keys = {bank.group_of(e).key for e in experts}
    if len(keys) > 1:
        raise MtpeftError(f"{method} composes experts of one LoRA configuration; the experts {experts} have "
                          f"{len(keys)} different ones: choose experts of one configuration with --experts")


@torch.no_grad()
def fewshot_loss(bank, scorer, task, experts: list[str], w, batch_size: int = EVAL_BATCH) -> float:
    """Mean cross-entropy on ``task``'s train split (the shots) with the experts' parameters mixed by ``w``."""
    ds = task.splits["train"]
    texts, labels = ds["text"], torch.tensor(ds["label"], dtype=torch.long)
    ids = bank.ids(experts).to(bank.device)
    wt = torch.as_tensor(np.asarray(w, dtype=np.float32), device=bank.device)
    total = 0.0
    bank.eval()
    for s in range(0, len(texts), batch_size):  # batches of the shots, one forward each
        chunk = texts[s: s + batch_size]
        B = len(chunk)
        r = Routing(wt[None].expand(B, -1), ids[None].expand(B, -1), "params")
        logits = scorer.logits(bank, chunk, task, r)
        total += float(F.cross_entropy(logits, labels[s: s + B].to(logits.device), reduction="sum"))
    return total / max(1, len(texts))


def search_weights(loss, n: int, evals: int, bound: float, l1: float, seed: int) -> tuple[np.ndarray, float, int]:
    """NGOpt over ``w`` in ``[-bound, bound]^n`` from ``w = 0`` minimising ``loss(w) + l1 * mean |w|``.
    Returns the recommended weights (clipped to the box), their objective and the evaluations made."""
    try:
        import nevergrad as ng
    except ImportError as e:
        raise MtpeftError("lorahub needs nevergrad: `pip install 'nevergrad>=1.0'` (or `make setup`)") from e
    calls = {"n": 0, "seen": {}}

    def objective(w):
        calls["n"] += 1
        v = float(loss(w)) + l1 * float(np.abs(w).mean())
        calls["seen"][tuple(np.round(w, 12))] = v
        return v

    param = ng.p.Array(init=np.zeros(n), lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=evals, num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy/nevergrad chatter about their internal settings
        rec = opt.minimize(objective)
    w = np.clip(np.asarray(rec.value, dtype=np.float64), -bound, bound)
    value = calls["seen"].get(tuple(np.round(w, 12)))
    if value is None:
        value = objective(w)
    return w, value, calls["n"]


@register_method("lorahub")
class LoraHub(AdaptMethod):
    def check(self, bank, experts):
        same_group(bank, experts, "lorahub")

    def run(self, ctx: AdaptContext) -> AdaptResult:
        from ...merge import compose_factors

        b = ctx.budget
        zero = fewshot_loss(ctx.bank, ctx.scorer, ctx.task, ctx.experts, np.zeros(len(ctx.experts)))
        w, value, n_evals = search_weights(
            lambda w: fewshot_loss(ctx.bank, ctx.scorer, ctx.task, ctx.experts, w), len(ctx.experts),
            b.lorahub_evals, b.lorahub_bound, b.lorahub_l1, ctx.seed)
        compose_factors(ctx.bank, ctx.experts, [float(x) for x in w], ctx.module_name, method="lorahub",
                        task=ctx.task.name, metadata={"adapt": self.name})
        weights = {e: round(float(x), 4) for e, x in zip(ctx.experts, w)}
        ctx.log(f"lorahub weights {weights} (objective {value:.4f}, at w=0 {zero:.4f})")
        return AdaptResult(ctx.module_name, len(ctx.experts),
                           {"weights": weights, "objective": round(value, 6), "loss_at_zero": round(zero, 6),
                            "evaluations": n_evals})
