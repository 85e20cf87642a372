"""``conpet-dynamic`` (Dynamic ConPET, Song et al. 2023): one expert module per task (the very experts
``expert-oracle`` trains with the same seed) plus a selector: a module of the same type and a linear head
over the tasks learnt so far, trained as a task classifier on the memory's examples and the current task's.

At test, for each input the selector keeps its ``top_k`` experts (default 1); each kept expert scores the
input over the full, growing label space (one forward per rank, every example routed to its own expert in
the same batch), its logits are kept on its own task's labels and every other label gets ``NEG`` (a large
negative value); where several kept experts share a label the larger logit wins.

Training the selector (after each expert, ``selector_steps`` batches, AdamW, every task equally likely in a
batch whatever its share of the examples): cross-entropy over task ids,
plus, with ``top_k > 1``, the likelihood of the true label under the kept experts (the selector's softmax over
its picks weighting each expert's probability of the label); in training the true task replaces the last
pick when the selector missed it (teacher forcing, ``select_topk``). The frozen experts' outputs on the
training examples are cached (``ExpertCache``, keyed by (task, text, expert)): experts are never re-run
while the selector trains, and an example is scored by an expert once per run. The head grows by one row
per task, the old rows copied (``grow_head``): what the selector said about the old tasks is kept until it
is trained again. The memory keeps its examples by k-means (as ``conpet-static``).
"""
from __future__ import annotations

import time
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import MtpeftError
from ...routing import Routing
from ...scoring.labels import LabelSpace
from .base import check_steps_option, only, register_strategy
from .conpet_static import use_kmeans_memory
from .expert_oracle import ExpertOracle
from .replay import remember

NEG = -1e4  # the logit of a label no kept expert speaks for
SELECTOR = "conpet-selector"
HEAD_W, HEAD_B = "selector_head_weight", "selector_head_bias"


def select_topk(scores: Tensor, k: int, true: Tensor | None = None) -> Tensor:
    """``[B, k]`` the ``k`` best tasks per row of ``scores`` ``[B, T]``; with ``true`` ``[B]`` (training),
    a row whose true task is not among its picks gets it in place of its last pick."""
    picks = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    if true is not None:
        missed = ~(picks == true[:, None]).any(-1)
        picks[:, -1] = torch.where(missed, true, picks[:, -1])
    return picks


def grow_head(weight: Tensor, bias: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The head over ``n`` tasks: the old rows copied, the new ones zero (a new task starts at logit 0)."""
    if n < weight.shape[0]:
        raise MtpeftError(f"the selector's head covers {weight.shape[0]} tasks; it cannot shrink to {n}")
    w = torch.zeros(n, weight.shape[1], dtype=weight.dtype)
    b = torch.zeros(n, dtype=bias.dtype)
    w[: weight.shape[0]], b[: bias.shape[0]] = weight, bias
    return w, b


class ExpertCache:
    """The frozen experts' logits on examples, over each expert's own task labels: ``(task, text, expert) ->
    [L_expert]``. ``fill`` scores only what is missing, one batched call per expert."""

    def __init__(self, score):
        self.score = score  # score(expert, texts, tasks) -> [B, L_expert]
        self.store: dict[tuple[str, str, str], Tensor] = {}

    def fill(self, rows: list[tuple], experts: list[str], batch_size: int = 64) -> int:
        """``rows``: (task, text); returns how many were scored."""
        n = 0
        for e in experts:
            todo = [(t, x) for t, x in rows if (t.name, x, e) not in self.store]
            for s in range(0, len(todo), batch_size):
                chunk = todo[s: s + batch_size]
                out = self.score(e, [x for _, x in chunk], [t for t, _ in chunk]).float().cpu()
                for (t, x), o in zip(chunk, out):
                    self.store[(t.name, x, e)] = o
                n += len(chunk)
        return n

    def get(self, task, text: str, expert: str) -> Tensor:
        return self.store[(task.name, text, expert)]


class SelectedExperts:
    """What ``evaluate.task_accuracy`` calls instead of a router: the selector's top-k experts' logits in the
    full label space (``predict_logits``)."""

    def __init__(self, strategy, step: int):
        self.strategy, self.step = strategy, step

    def predict_logits(self, bank, scorer, texts, task, space: LabelSpace | None) -> Tensor:
        s = self.strategy
        learnt = s.learnt(self.step)
        space = space if space is not None else LabelSpace.of(task)
        picks = select_topk(s.selector_logits(texts), s.options["top_k"])  # [B, k]
        speaks = torch.stack([_mask(space, t) for t in learnt])  # [T, L]: the labels each expert speaks for
        ids = bank.ids([s.module_name(t) for t in learnt])
        out = None
        for j in range(picks.shape[1]):  # one forward per rank: each example routed to its own expert
            col = picks[:, j].cpu()
            logits = scorer.logits(bank, texts, task, Routing.one_hot(ids[col]).to(bank.device), labels=space)
            mask = speaks[col].to(logits.device)
            logits = torch.where(mask, logits, torch.full_like(logits, NEG))
            out = logits if out is None else torch.maximum(out, logits)
        return out


def _mask(space: LabelSpace, task) -> Tensor:
    m = torch.zeros(len(space), dtype=torch.bool)
    ids = [space.id_of(t) for t in LabelSpace.of(task).texts if t in space]
    m[ids] = True
    return m


@register_strategy("conpet-dynamic")
class ConPETDynamic(ExpertOracle):
    uses_task_id = False
    uses_memory = True
    defaults: ClassVar[dict] = {"top_k": 1, "selector_steps": None, "selector_lr": None, "mix_weight": 1.0,
                                "policy": "kmeans"}

    def check_options(self):
        o = self.options
        if isinstance(o["top_k"], bool) or not isinstance(o["top_k"], int) or o["top_k"] < 1:
            raise MtpeftError(f"conpet-dynamic: top_k must be a positive integer, got {o['top_k']!r}")
        check_steps_option("conpet-dynamic", "selector_steps", o["selector_steps"], self.ctx.train.max_steps,
                           "selector_steps", "selector_steps")
        for k in ("selector_lr", "mix_weight"):
            v = o[k]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")
                                  or (k == "selector_lr" and v == 0)):
                raise MtpeftError(f"conpet-dynamic: {k} must be a finite number > 0, got {v!r}")
        if o["policy"] not in ("kmeans", "config"):
            raise MtpeftError(f"conpet-dynamic: policy must be kmeans or config, got {o['policy']!r}")
        if not hasattr(self.ctx.scorer, "encode"):
            raise MtpeftError("conpet-dynamic: the selector reads the encoder's pooled embedding; use an encoder "
                              "backbone (minilm, tiny-bert, ...)")
        if o["policy"] == "kmeans":
            use_kmeans_memory(self.ctx, self.name)
        self.cache = ExpertCache(self._expert_logits)

    # ---- the experts --------------------------------------------------------------------------------
    def _expert_logits(self, expert: str, texts: list[str], tasks: list) -> Tensor:
        """One frozen expert's logits over its own task's labels (counted by the tests)."""
        own = self.ctx.bank.record(expert).task
        space = LabelSpace.of(self.ctx.stream.tasks[self.ctx.stream.index(own)])
        with torch.no_grad():
            return self.ctx.scorer.logits(self.ctx.bank, texts, tasks, only(expert), labels=space)

    # ---- the selector -------------------------------------------------------------------------------
    def _head(self) -> tuple[Tensor, Tensor]:
        bank = self.ctx.bank
        return bank.artifact(SELECTOR, HEAD_W), bank.artifact(SELECTOR, HEAD_B)

    def selector_logits(self, texts: list[str], head: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``[B, tasks learnt]`` the selector's scores of raw ``texts`` (no task template: no task id leaks)."""
        from ...scoring.common import routed

        bank = self.ctx.bank
        w, b = head or self._head()
        with routed(bank, only(SELECTOR), texts, None):
            x = self.ctx.scorer.encode(bank, texts)
        return x @ w.to(x.device, x.dtype).t() + b.to(x.device, x.dtype)

    def _grow(self, n: int) -> None:
        bank = self.ctx.bank
        if SELECTOR not in bank:
            self.add_module(SELECTOR, trainable=False)
            bank.set_artifact(SELECTOR, HEAD_W, torch.zeros(1, bank.backbone.hidden_size))
            bank.set_artifact(SELECTOR, HEAD_B, torch.zeros(1))
        w, b = self._head()
        if w.shape[0] < n:
            w, b = grow_head(w.cpu(), b.cpu(), n)
            bank.set_artifact(SELECTOR, HEAD_W, w)
            bank.set_artifact(SELECTOR, HEAD_B, b)

    def train_selector(self, step: int, task) -> dict:
        """Train the selector over the tasks learnt up to ``step`` on the memory's examples and ``task``'s."""
        from ...train import fit_seed

        ctx, bank = self.ctx, self.ctx.bank
        learnt = self.learnt(step)
        self._grow(len(learnt))
        if len(learnt) < 2:
            return {"selector_steps": 0}
        pos = {t.name: i for i, t in enumerate(learnt)}
        by_name = {t.name: t for t in learnt}
        mem = ctx.memory.get(ctx.memory.ids) if len(ctx.memory) else []
        rows = [(by_name[e.task], e.text, e.label) for e in mem if e.task in by_name and e.task != task.name]
        ds = task.splits["train"]
        rows += [(task, x, int(y)) for x, y in zip(ds["text"], ds["label"])]
        true = torch.tensor([pos[t.name] for t, _, _ in rows])
        k = self.options["top_k"]
        probs = None
        if k > 1 and self.options["mix_weight"]:
            experts = [self.module_name(t) for t in learnt]
            self.cache.fill([(t, x) for t, x, _ in rows], experts)  # old experts run here, never in the loop
            probs = self._label_probs(rows, learnt)  # [N, T]
        steps = self.options["selector_steps"] or ctx.train.max_steps
        lr = self.options["selector_lr"] or ctx.train.lr
        w, b = (t.clone().float().to(bank.device).requires_grad_(True) for t in self._head())
        bank.freeze()
        bank.unfreeze(SELECTOR)
        params = [*bank.module_parameters(SELECTOR).values(), w, b]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        g = torch.Generator().manual_seed(fit_seed(ctx.seed, f"{self.name}-selector-{task.name}"))
        bs, t0 = ctx.train.batch_size, time.perf_counter()
        # every task equally likely in a batch: the current task has all its examples, the old ones a share
        balance = (1.0 / torch.bincount(true, minlength=len(learnt)).clamp_min(1).float())[true]
        bank.train()
        try:
            for _ in range(steps):
                idx = torch.multinomial(balance, min(bs, len(rows)), replacement=True, generator=g)
                scores = self.selector_logits([rows[i][1] for i in idx.tolist()], (w, b))
                y = true[idx].to(scores.device)
                loss = F.cross_entropy(scores, y)
                if probs is not None:
                    picks = select_topk(scores.detach(), k, y)
                    weights = scores.gather(1, picks).log_softmax(-1)
                    p = probs[idx].to(scores.device).gather(1, picks)
                    mix = -torch.logsumexp(weights + p.clamp_min(1e-8).log(), -1).mean()
                    loss = loss + float(self.options["mix_weight"]) * mix
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            bank.eval()
            bank.freeze(SELECTOR)
            for _, stack in bank.stacks_of(SELECTOR):
                stack.invalidate()
        bank.set_artifact(SELECTOR, HEAD_W, w.detach().cpu())
        bank.set_artifact(SELECTOR, HEAD_B, b.detach().cpu())
        return {"selector_steps": steps, "selector_s": round(time.perf_counter() - t0, 3)}

    def _label_probs(self, rows, learnt) -> Tensor:
        """``[N, T]``: each expert's probability of each row's true label (0 where it does not have it), from
        the cache."""
        out = torch.zeros(len(rows), len(learnt))
        for j, t in enumerate(learnt):
            e, labels = self.module_name(t), LabelSpace.of(t)
            for i, (task, text, y) in enumerate(rows):
                label = LabelSpace.of(task).texts[y]
                if label in labels:
                    out[i, j] = self.cache.get(task, text, e).softmax(-1)[labels.id_of(label)]
        return out

    # ---- the hooks ----------------------------------------------------------------------------------
    def train_task(self, step, task):
        fit = super().train_task(step, task)
        name = self.module_name(task)
        self.ctx.bank.finalize(name)
        self.ctx.bank.freeze(name)
        sel = self.train_selector(step, task)
        steps = (fit.get("steps") or 0) + sel["selector_steps"]
        return {**fit, "steps": steps, "expert_steps": fit.get("steps"), **sel}

    def after_task(self, step, task):
        super().after_task(step, task)
        remember(self.ctx, task)

    def eval_key(self, step, task):
        return None  # the selector changes after every task

    def eval_router(self, step, task):
        return SelectedExperts(self, step)
