"""Causal-LM scoring: rank classification by the length-normalised log-likelihood of each label text
after a prompt. Batched: one pass over the prompts, then each example's candidate labels packed into rows of at
most ``label_chunk``, each row continuing its example's rows of the prompts' key/value cache."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from ..io import MtpeftError
from ..routing import RouteContext, Routing, RoutingLike
from .common import LRU, as_list, distinct, inputs, need_tasks, pack_candidates, routed, suffixes, to_local
from .labels import LabelSpace


class CausalScorer:
    family = "causal"

    def __init__(self, tokenizer, max_length: int = 128, label_chunk: int = 16, cache_size: int = 64):
        if isinstance(label_chunk, bool) or not isinstance(label_chunk, int) or label_chunk < 1:
            raise MtpeftError(f"label_chunk must be a positive integer (labels per packed pass), got {label_chunk!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_chunk = label_chunk
        self._label_tokens = LRU(cache_size)  # space key -> (ids [L, Tl], lengths [L])
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def _ids(self, texts: Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, padding=True, truncation=max_length is not None,
                             max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].sum(1)

    def label_tokens(self, labels: LabelSpace) -> tuple[Tensor, Tensor]:
        """The space's label texts (each after a space) as right-padded ids ``[L, Tl]`` and lengths ``[L]``,
        tokenised once per label space."""
        def tokenize():
            ids, lengths = self._ids([" " + t for t in labels.texts])
            if int(lengths.min()) < 1:
                bad = labels.texts[int(lengths.argmin())]
                raise MtpeftError(f"the label {bad!r} tokenises to nothing; give every label a non-empty name")
            return ids, lengths

        return self._label_tokens.get_or(labels.key, tokenize)

    def logits(self, bank, texts: Sequence[str], tasks=None, routing: RoutingLike | None = None, *,
               labels: LabelSpace | None = None, candidates=None, ctx: RouteContext | None = None) -> Tensor:
        """Mean log-probability of each label's tokens after the prompt.

        Without ``labels``: ``[B, L_max]``, column ``j`` the ``j``-th label of the example's task, ``-inf``
        in the slots a task does not have. With ``labels``: ``[B, len(labels)]`` over the space's global
        ids, only each example's ``candidates`` scored (see :meth:`LabelSpace.candidate_mask`; ``None``:
        all of them), the others ``-inf``. The prompt is ``task.format_input(text) + task.prompt_suffix``;
        with ``tasks=None`` (only with ``labels``) the raw text + ``"\\nAnswer:"``.

        No loop over examples or labels: the prompts once (keeping their keys and values), then the
        candidates, up to ``label_chunk`` of one example packed into a row that continues that example's
        prompt, each label attending to its own prompt and its own earlier tokens only (a block-causal mask).
        Rows of one width run together (one pass per width), so an example pays for its own candidates, not
        for the largest label set in the batch. The cost is ``B*P + sum_i K_i*l`` tokens for ``K_i``
        candidates, not ``B*K*(P + l)``; results do not depend on the chunk.
        """
        need_tasks(tasks, labels)
        tasks = as_list(tasks, len(texts))
        if labels is None:
            space = LabelSpace.union(distinct(tasks)[0])
            return to_local(self._score(bank, texts, tasks, routing, space, space.candidates_of(tasks), ctx), space,
                            tasks)
        return self._score(bank, texts, tasks, routing, labels, labels.candidate_mask(candidates, len(texts)), ctx)

    def _score(self, bank, texts, tasks, routing, space: LabelSpace, mask: Tensor, ctx=None) -> Tensor:
        if isinstance(routing, Routing) and routing.per_token:
            raise MtpeftError("the causal scorer takes per-example routing ([batch, K] weights) or a per-layer "
                              "router: per-token weights given for the prompt cannot cover the label tokens")
        B, dev = len(texts), bank.device
        prompt, p_len = self._prompts(tasks, texts)
        mask = mask.cpu()  # indexes the label tokens, which stay on the CPU
        order, _ = pack_candidates(mask)  # [B, K] global ids, each example's candidates first
        with routed(bank, routing, texts, tasks, ctx):  # routing None: the caller's scope
            first = bank(prompt.to(dev), (torch.arange(prompt.shape[1]) < p_len[:, None]).long().to(dev),
                         use_cache=True)
            h_last = first.output[:, first.n_virtual:][torch.arange(B, device=dev), (p_len - 1).to(dev)]  # [B, H]
            logp_first = bank.lm_head(h_last).float().log_softmax(-1)  # predicts every label's first token
            n_cached = first.cache.get_seq_length()
            parts = [self._pass(bank, first, logp_first, space, order[ex[:, None], start[:, None] + torch.arange(w)],
                                ex, n_cached) for ex, start, w in self._rows(mask.sum(1))]
        out = torch.full((B, len(space)), float("-inf"), device=dev, dtype=logp_first.dtype)
        if parts:  # each (example, label) scored once: no slot written twice
            ex, gid, mean = (torch.cat([x.reshape(-1) for x in xs]) for xs in zip(*parts))
            out = out.index_put((ex.to(dev), gid.to(dev)), mean)
        return out.masked_fill(~mask.to(dev), float("-inf"))

    def _rows(self, count: Tensor):
        """The label passes: each example's ``count`` candidates cut into rows of at most ``label_chunk``; rows of
        one width go together, at most ``B`` rows a pass (the prompts' memory). Yields (each row's example
        ``[r]``, its first candidate's slot ``[r]``, the width). A 3-label task in a batch with a 26-label one costs
        3 labels, not 26: one pass per distinct width (at most ``label_chunk``), not per example."""
        c, B = self.label_chunk, count.shape[0]
        n = (count + c - 1) // c  # rows of each example
        ex = torch.repeat_interleave(torch.arange(B), n)
        start = (torch.arange(ex.shape[0]) - (torch.cumsum(n, 0) - n)[ex]) * c
        width = (count[ex] - start).clamp_max(c)
        for w in width.unique().tolist():
            sel = (width == w).nonzero()[:, 0]
            for j in range(0, sel.shape[0], B):
                yield ex[sel[j:j + B]], start[sel[j:j + B]], int(w)

    def _pass(self, bank, first, logp_first: Tensor, space: LabelSpace, gid: Tensor, ex: Tensor,
              n_cached: int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean label-token log-probabilities of the labels ``gid`` ``[r, k]``, row ``i`` continuing example
        ``ex[i]``'s prompt; returns each score's example, label and mean, ``[r, k]`` each."""
        dev = logp_first.device
        ids, lengths = self.label_tokens(space)
        lab, l_len = ids[gid], lengths[gid]  # [r, k, Tl], [r, k]
        r, k = l_len.shape
        Tl = int(l_len.max())
        lab = lab[:, :, :Tl].to(dev)
        exd = ex.to(dev)
        tok_logp = logp_first[exd[:, None], lab[:, :, 0]][..., None]  # [r, k, 1]
        if Tl > 1:  # label tokens after the first predict the ones after them, after the cached prompt
            whole = r == logp_first.shape[0] and bool((ex == torch.arange(r)).all())  # every example, in order
            cont = lab[:, :, :-1].reshape(r, k * (Tl - 1))
            cache_mask, nxt = (first.cache_mask, first.next_positions) if whole else \
                (first.cache_mask[exd], first.next_positions[exd])
            mask4d, pos = self._continuation_mask(cache_mask, nxt, k, Tl - 1, l_len - 1, bank.dtype)
            try:
                with contextlib.nullcontext() if whole else bank.select_rows(exd):
                    second = bank(cont, mask4d, cache=first.cache if whole else _select_cache(first.cache, exd),
                                  position_ids=pos)
            finally:  # the forward grew the shared cache in place: back to the prompts for the next pass
                if whole:
                    _crop(first.cache, n_cached)
            h = second.output.reshape(r, k, Tl - 1, -1)
            rest = bank.lm_head(h).float().log_softmax(-1).gather(-1, lab[:, :, 1:, None])[..., 0]
            tok_logp = torch.cat([tok_logp, rest], dim=2)
        tok_valid = (torch.arange(Tl, device=dev)[None, None, :] < l_len.to(dev)[..., None])
        return ex[:, None].expand(r, k), gid, (tok_logp * tok_valid).sum(-1) / tok_valid.sum(-1).clamp_min(1)

    def _prompts(self, tasks, texts) -> tuple[Tensor, Tensor]:
        """Right-padded prompt ids ``[B, P]`` (input truncated to ``max_length``, then the task's suffix)
        and their lengths ``[B]``."""
        B = len(texts)
        tasks = as_list(tasks, B)
        body_ids, body_len = self._ids(inputs(tasks, texts), self.max_length)
        suf_ids, suf_len = self._ids(suffixes(tasks, B))
        p_len = body_len + suf_len
        P = int(p_len.max())
        pad = self.tokenizer.pad_token_id
        seq = torch.full((B, 1, P + 1), pad, dtype=torch.long)  # the last column is scratch space
        self._place(seq, body_ids, body_len, torch.zeros(B, 1, dtype=torch.long))
        self._place(seq, suf_ids, suf_len, body_len[:, None])
        return seq[:, 0, :P], p_len

    def _labels(self, tasks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each example's task's label token ids ``[B, L, Tl]`` (right-padded), their lengths ``[B, L]``,
        which slots are real ``[B, L]`` and the global id of each slot in the batch's label space ``[B, L]``.
        (The benchmark's one-sequence-per-label baseline builds on it; with one task, slot == local label.)"""
        space = LabelSpace.union(distinct(tasks)[0])
        order, valid = pack_candidates(space.candidates_of(tasks))
        ids, lengths = self.label_tokens(space)
        return ids[order], lengths[order], valid, order

    @staticmethod
    def _continuation_mask(cache_mask: Tensor, next_positions: Tensor, L: int, n: int, n_len: Tensor,
                           dtype) -> tuple[Tensor, Tensor]:
        """The additive mask ``[B, 1, L*n, C + L*n]`` and position ids ``[B, L*n]`` of the packed labels.

        Query (label a, token i) sees the cached prompt positions that are real and the tokens (a, j<=i)
        of its own label; padding tokens see only themselves (their outputs are discarded)."""
        dev = cache_mask.device
        B = cache_mask.shape[0]
        a = torch.arange(L, device=dev).repeat_interleave(n)  # label of each packed position
        i = torch.arange(n, device=dev).repeat(L)  # token index within its label
        own = (a[:, None] == a[None, :]) & (i[None, :] <= i[:, None])  # [Ln, Ln]
        real = (i[None, :] < n_len.to(dev).repeat_interleave(n, dim=1))  # [B, Ln] key is a real token
        new = (own[None] & real[:, None, :]) | torch.eye(L * n, dtype=torch.bool, device=dev)[None]
        cached = cache_mask.bool()[:, None, :].expand(B, L * n, -1)
        allowed = torch.cat([cached, new], dim=2)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask, next_positions[:, None] + i[None, :]

    @staticmethod
    def _place(seq: Tensor, ids: Tensor, lengths: Tensor, offset: Tensor) -> None:
        """Write ``ids[..., :lengths]`` into ``seq`` at ``offset`` (per row), in place."""
        B, L, S = seq.shape
        if ids.dim() == 2:
            ids = ids[:, None, :].expand(B, L, -1)
            lengths = lengths[:, None].expand(B, L)
        T = ids.shape[-1]
        j = torch.arange(T)
        pos = offset[..., None] + j  # [B, L, T]
        ok = j < lengths[..., None]
        pos = torch.where(ok, pos, S - 1)  # invalid slots write into the scratch column
        seq.scatter_(2, pos, torch.where(ok, ids, 0))


def _select_cache(cache, rows: Tensor):
    """A new key/value cache holding rows ``rows`` of ``cache`` (a row may appear several times)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), i)
    return out


def _crop(cache, length: int) -> None:
    """Cut a key/value cache back to its first ``length`` positions. ``crop`` with a negative count removes
    that many positions in every transformers version that has it (4.x also takes a final length, 5.x
    only the negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
