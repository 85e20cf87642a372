"""One scorer for every task: no task needs its own head, and unseen tasks score zero-shot.

- Encoder: cosine similarity between the pooled input (through the bank's modules) and the pooled
  label names (through the bare backbone, cached per task), divided by a temperature.
- Causal LM: rank classification by the length-normalised log-likelihood of each label name after
  a prompt. Batched: one pass over the prompts, one over every label of every example.

Scorers take a list of tasks, one per example, so a mixed-task batch is scored in one call.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .io import MtpeftError
from .routing import Routing, RoutingLike


def _as_list(tasks, n: int) -> list:
    return list(tasks) if isinstance(tasks, (list, tuple)) else [tasks] * n


def _distinct(tasks: list) -> tuple[list, Tensor]:
    """The distinct tasks of a batch, in first-seen order, and each example's index among them ``[B]``."""
    uniq = list({id(t): t for t in tasks}.values())
    pos = {id(t): i for i, t in enumerate(uniq)}
    return uniq, torch.tensor([pos[id(t)] for t in tasks])


class EncoderScorer:
    family = "encoder"

    def __init__(self, tokenizer, temperature: float = 0.05, max_length: int = 128):
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.max_length = max_length
        self._label_cache: dict[tuple, Tensor] = {}

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

    def label_embeddings(self, bank, task) -> Tensor:
        key = (task.name, tuple(task.label_texts), bank.device.type)
        if key not in self._label_cache:
            with torch.no_grad(), bank.disabled():
                self._label_cache[key] = self.encode(bank, task.label_texts)
        return self._label_cache[key]

    def logits(self, bank, texts: Sequence[str], tasks, routing: RoutingLike | None = None) -> Tensor:
        """``[B, L_max]`` logits; label slots a task does not have are ``-inf``."""
        tasks = _as_list(tasks, len(texts))
        x = self.encode(bank, [t.format_input(s) for t, s in zip(tasks, texts)], routing)
        table, mask, which = self._label_table(bank, tasks)
        sims = torch.einsum("bh,blh->bl", x, table[which])
        return (sims / self.temperature).masked_fill(~mask[which], float("-inf"))

    def _label_table(self, bank, tasks):
        uniq, which = _distinct(tasks)
        embs = [self.label_embeddings(bank, t) for t in uniq]
        L = max(e.shape[0] for e in embs)
        table = torch.zeros(len(uniq), L, embs[0].shape[1], device=embs[0].device)
        mask = torch.zeros(len(uniq), L, dtype=torch.bool, device=embs[0].device)
        for i, e in enumerate(embs):  # one row per distinct task in the batch
            table[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        which = which.to(table.device)
        return table, mask, which


class CausalScorer:
    family = "causal"

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def _ids(self, texts: Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, padding=True, truncation=max_length is not None,
                             max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].sum(1)

    def logits(self, bank, texts: Sequence[str], tasks, routing: RoutingLike | None = None) -> Tensor:
        """Mean log-probability of each label's tokens after the prompt: ``[B, L_max]``.

        Two batched passes, no loop over examples or labels: the prompts once (keeping their keys and
        values), then every label of every example packed into one row per example, each label
        attending to its own prompt and to its own earlier tokens only (a block-causal mask). The
        prompt is not recomputed per label: the cost is ``B*(P + L*l)`` tokens, not ``B*L*(P + l)``.
        """
        tasks = _as_list(tasks, len(texts))
        if isinstance(routing, Routing) and routing.per_token:
            raise MtpeftError("the causal scorer takes per-example routing ([batch, K] weights) or a per-layer "
                              "router: per-token weights given for the prompt cannot cover the label tokens")
        B, dev = len(texts), bank.device
        prompt, p_len = self._prompts(tasks, texts)
        lab, l_len, valid, which = self._labels(tasks)  # [B, L, Tl], [B, L], [U, L], [B]
        L, Tl = lab.shape[1], lab.shape[2]
        with bank.route(routing) if routing is not None else contextlib.nullcontext():  # None: the scope's
            first = bank(prompt.to(dev), (torch.arange(prompt.shape[1]) < p_len[:, None]).long().to(dev),
                         use_cache=True)
            h_last = first.output[:, first.n_virtual:][torch.arange(B, device=dev), (p_len - 1).to(dev)]  # [B, H]
            logp_first = bank.lm_head(h_last).float().log_softmax(-1)  # predicts every label's first token
            tok_logp = logp_first.gather(1, lab[:, :, 0].to(dev))[..., None]  # [B, L, 1]
            if Tl > 1:  # the second pass: label tokens after the first predict the ones after them
                cont = lab[:, :, :-1].reshape(B, L * (Tl - 1)).to(dev)
                mask4d, pos = self._continuation_mask(first, L, Tl - 1, l_len - 1, bank.dtype)
                second = bank(cont, mask4d, cache=first.cache, position_ids=pos)
                h = second.output.reshape(B, L, Tl - 1, -1)
                rest = bank.lm_head(h).float().log_softmax(-1).gather(-1, lab[:, :, 1:, None].to(dev))[..., 0]
                tok_logp = torch.cat([tok_logp, rest], dim=2)
        tok_valid = (torch.arange(Tl)[None, None, :] < l_len[..., None]).to(dev)
        mean = (tok_logp * tok_valid).sum(-1) / tok_valid.sum(-1).clamp_min(1)
        return mean.masked_fill(~valid[which].to(dev), float("-inf"))

    def _prompts(self, tasks, texts) -> tuple[Tensor, Tensor]:
        """Right-padded prompt ids ``[B, P]`` (input truncated to ``max_length``, then the task's suffix)
        and their lengths ``[B]``."""
        body_ids, body_len = self._ids([t.format_input(s) for t, s in zip(tasks, texts)], self.max_length)
        suf_ids, suf_len = self._ids([t.prompt_suffix for t in tasks])
        B, p_len = len(texts), body_len + suf_len
        P = int(p_len.max())
        pad = self.tokenizer.pad_token_id
        seq = torch.full((B, 1, P + 1), pad, dtype=torch.long)  # the last column is scratch space
        self._place(seq, body_ids, body_len, torch.zeros(B, 1, dtype=torch.long))
        self._place(seq, suf_ids, suf_len, body_len[:, None])
        return seq[:, 0, :P], p_len

    def _labels(self, tasks) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each example's label token ids ``[B, L, Tl]`` (right-padded; missing label slots reuse a real
        label and are masked at the end), their lengths ``[B, L]``, which slots are real per distinct
        task ``[U, L]``, and each example's task ``[B]``."""
        uniq, which = _distinct(tasks)
        lab_ids, lab_len = self._ids([" " + lt for t in uniq for lt in t.label_texts])
        if int(lab_len.min()) < 1:
            raise MtpeftError("a label name tokenises to nothing; give every label a non-empty name")
        L = max(t.num_labels for t in uniq)
        slot = torch.zeros(len(uniq), L, dtype=torch.long)
        valid = torch.zeros(len(uniq), L, dtype=torch.bool)
        start = 0
        for u, t in enumerate(uniq):  # one row per distinct task in the batch, not per example
            slot[u, : t.num_labels] = torch.arange(start, start + t.num_labels)
            valid[u, : t.num_labels] = True
            start += t.num_labels
        rows = slot[which]  # [B, L]
        return lab_ids[rows], lab_len[rows], valid, which

    @staticmethod
    def _continuation_mask(first, L: int, n: int, n_len: Tensor, dtype) -> tuple[Tensor, Tensor]:
        """The additive mask ``[B, 1, L*n, C + L*n]`` and position ids ``[B, L*n]`` of the packed labels.

        Query (label a, token i) sees the cached prompt positions that are real and the tokens (a, j<=i)
        of its own label; padding tokens see only themselves (their outputs are discarded)."""
        dev = first.cache_mask.device
        B = first.cache_mask.shape[0]
        a = torch.arange(L, device=dev).repeat_interleave(n)  # label of each packed position
        i = torch.arange(n, device=dev).repeat(L)  # token index within its label
        own = (a[:, None] == a[None, :]) & (i[None, :] <= i[:, None])  # [Ln, Ln]
        real = (i[None, :] < n_len.to(dev).repeat_interleave(n, dim=1))  # [B, Ln] key is a real token
        new = (own[None] & real[:, None, :]) | torch.eye(L * n, dtype=torch.bool, device=dev)[None]
        cached = first.cache_mask.bool()[:, None, :].expand(B, L * n, -1)
        allowed = torch.cat([cached, new], dim=2)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask, first.next_positions[:, None] + i[None, :]

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


def make_scorer(backbone, **kw):
    if backbone.family == "encoder":
        return EncoderScorer(backbone.tokenizer, **kw)
    return CausalScorer(backbone.tokenizer, **kw)
