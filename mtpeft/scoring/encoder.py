"""Encoder scoring: cosine similarity between the pooled input (through the bank's modules) and the
pooled label texts (through the bare backbone), divided by a temperature."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..routing import RouteContext, RoutingLike
from .common import LRU, as_list, bare, distinct, inputs, need_tasks, routed
from .labels import LabelSpace

_LABEL_BATCH = 256  # label texts embedded per forward


class EncoderScorer:
    family = "encoder"

    def __init__(self, tokenizer, temperature: float = 0.05, max_length: int = 128, cache_size: int = 64):
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.max_length = max_length
        self._label_cache = LRU(cache_size)  # (space key, bank version, device, dtype) -> [L, H]

    def tokenize(self, texts: Sequence[str], device) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def encode(self, bank, texts: Sequence[str], routing: RoutingLike | None = None) -> Tensor:
        """Mean-pooled, L2-normalised embeddings of ``texts`` (virtual prompt positions excluded)."""
        enc = self.tokenize(texts, bank.device)
        out = bank(enc["input_ids"], enc["attention_mask"], routing=routing)
        h = out.output[:, out.n_virtual:]
        m = out.attention_mask[:, out.n_virtual:].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def label_embeddings(self, bank, labels) -> Tensor:
        """``[len(labels), H]``: the label texts through the bare backbone (no module acts, merged ones
        included), cached per (label space, ``bank.version``, device, dtype). ``labels``: a
        :class:`LabelSpace` or a task (its own space)."""
        space = labels if isinstance(labels, LabelSpace) else LabelSpace.of(labels)
        key = (space.key, getattr(bank, "version", None), str(bank.device), bank.dtype)

        def embed():
            texts = space.texts
            with torch.no_grad(), bare(bank):
                return torch.cat([self.encode(bank, texts[i:i + _LABEL_BATCH])
                                  for i in range(0, len(texts), _LABEL_BATCH)])

        return self._label_cache.get_or(key, embed)

    def logits(self, bank, texts: Sequence[str], tasks=None, routing: RoutingLike | None = None, *,
               labels: LabelSpace | None = None, candidates=None, ctx: RouteContext | None = None) -> Tensor:
        """Similarity logits of each text against labels.

        Without ``labels``: ``[B, L_max]``, column ``j`` the ``j``-th label of the example's task, ``-inf``
        in the slots a task does not have. With ``labels``: ``[B, len(labels)]`` over the space's global
        ids; labels outside an example's ``candidates`` (see :meth:`LabelSpace.candidate_mask`; ``None``:
        all of them) are ``-inf``. ``tasks`` format the inputs (``template``); ``None`` (only with
        ``labels``): the raw texts.
        """
        need_tasks(tasks, labels)
        tasks = as_list(tasks, len(texts))
        with routed(bank, routing, texts, tasks, ctx):
            x = self.encode(bank, inputs(tasks, texts))
        if labels is not None:
            mask = labels.candidate_mask(candidates, len(texts)).to(x.device)
            sims = x @ self.label_embeddings(bank, labels).t()
            return (sims / self.temperature).masked_fill(~mask, float("-inf"))
        return self._task_logits(bank, x, tasks)

    def _task_logits(self, bank, x: Tensor, tasks: list) -> Tensor:
        """``[B, L_max]``: each example against its own task's labels, one product per distinct task of the
        batch (``[b_t, H] x [H, L_t]``), never a ``[B, L, H]`` copy of the label embeddings (14 GB for
        10^5 labels and a batch of 64)."""
        uniq, which = distinct(tasks)
        embs = [self.label_embeddings(bank, t) for t in uniq]
        if len(uniq) == 1:
            return (x @ embs[0].t()) / self.temperature
        sims = x.new_full((x.shape[0], max(e.shape[0] for e in embs)), float("-inf"))
        which = which.to(x.device)
        for u, e in enumerate(embs):
            rows = (which == u).nonzero().flatten()
            sims[rows, : e.shape[0]] = (x[rows] @ e.t()) / self.temperature
        return sims
