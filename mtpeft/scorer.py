"""One scorer for every task: no task needs its own head, and unseen tasks score zero-shot.

- Encoder: cosine similarity between the pooled input (through the bank's modules) and the pooled
  label names (through the bare backbone, cached per task), divided by a temperature.
- Causal LM: rank classification by the length-normalised log-likelihood of each label name after
  a prompt. All (example, label) pairs of a batch go through the model in one forward pass.

Scorers take a list of tasks, one per example, so a mixed-task batch is scored in one call.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .routing import RoutingLike


def _as_list(tasks, n: int) -> list:
    return list(tasks) if isinstance(tasks, (list, tuple)) else [tasks] * n


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
        uniq = list({id(t): t for t in tasks}.values())
        pos = {id(t): i for i, t in enumerate(uniq)}
        embs = [self.label_embeddings(bank, t) for t in uniq]
        L = max(e.shape[0] for e in embs)
        table = torch.zeros(len(uniq), L, embs[0].shape[1], device=embs[0].device)
        mask = torch.zeros(len(uniq), L, dtype=torch.bool, device=embs[0].device)
        for i, e in enumerate(embs):  # one row per distinct task in the batch
            table[i, : e.shape[0]] = e
            mask[i, : e.shape[0]] = True
        which = torch.tensor([pos[id(t)] for t in tasks], device=table.device)
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
        """Mean log-probability of each label's tokens after the prompt: ``[B, L_max]``."""
        tasks = _as_list(tasks, len(texts))
        B = len(texts)
        dev = bank.device
        body_ids, body_len = self._ids([t.format_input(s) for t, s in zip(tasks, texts)], self.max_length)
        suf_ids, suf_len = self._ids([t.prompt_suffix for t in tasks])
        uniq = list({id(t): t for t in tasks}.values())
        which = torch.tensor([next(i for i, u in enumerate(uniq) if u is t) for t in tasks])
        label_texts = [" " + lt for t in uniq for lt in t.label_texts]
        lab_ids, lab_len = self._ids(label_texts)
        L = max(t.num_labels for t in uniq)
        # Label slot (task u, j) -> row in lab_ids; missing slots reuse row 0 and are masked at the end.
        slot = torch.zeros(len(uniq), L, dtype=torch.long)
        valid = torch.zeros(len(uniq), L, dtype=torch.bool)
        start = 0
        for u, t in enumerate(uniq):
            slot[u, : t.num_labels] = torch.arange(start, start + t.num_labels)
            valid[u, : t.num_labels] = True
            start += t.num_labels
        rows = slot[which]  # [B, L]
        # Sequence for (b, l): body[b] + suffix[b] + label[rows[b, l]], right-padded, built with scatters.
        p_len = body_len + suf_len  # prompt length per example
        l_len = lab_len[rows]  # [B, L]
        S = int((p_len[:, None] + l_len).max())
        pad = self.tokenizer.pad_token_id
        seq = torch.full((B, L, S + 1), pad, dtype=torch.long)  # the last column is scratch space
        ar = torch.arange(S)
        body_pos = ar[None, : body_ids.shape[1]].expand(B, -1)
        seq[:, :, : body_ids.shape[1]] = torch.where(body_pos < body_len[:, None], body_ids, pad)[:, None, :]
        self._place(seq, suf_ids, suf_len, body_len[:, None].expand(B, L))
        self._place(seq, lab_ids[rows.reshape(-1)].reshape(B, L, -1), l_len, p_len[:, None].expand(B, L))
        seq = seq[..., :S]
        total = p_len[:, None] + l_len
        attn = (ar[None, None, :] < total[..., None]).long()
        seq, attn = seq.reshape(B * L, S).to(dev), attn.reshape(B * L, S).to(dev)
        if routing is not None and not callable(routing):
            routing = routing.repeat_interleave(L)
        out = bank(seq, attn, routing=routing)
        h = out.output[:, out.n_virtual:]
        # Positions that predict label tokens: p_len-1 .. p_len+l_len-2.
        Tl = int(l_len.max())
        j = torch.arange(Tl)
        pred_pos = (p_len[:, None, None] - 1 + j).expand(B, L, Tl).reshape(B * L, Tl)
        tgt_pos = pred_pos + 1
        tok_valid = (j[None, None, :] < l_len[..., None]).reshape(B * L, Tl)
        pred_pos = pred_pos.clamp_max(S - 1).to(dev)
        hsel = h.gather(1, pred_pos[..., None].expand(-1, -1, h.shape[-1]))  # [BL, Tl, H]
        targets = seq.gather(1, tgt_pos.clamp_max(S - 1).to(dev))
        logp = bank.lm_head(hsel).float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        tok_valid = tok_valid.to(dev)
        mean = (logp * tok_valid).sum(-1) / tok_valid.sum(-1).clamp_min(1)
        mean = mean.reshape(B, L)
        return mean.masked_fill(~valid[which].to(dev), float("-inf"))

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
