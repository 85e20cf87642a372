"""Prompt tuning: ``n`` trainable embeddings prepended to the input embeddings (Lester et al., 2021).

Also home of ``VirtualTokenStack``, the input-level stack that P-tuning shares: each expert yields
``n`` virtual token embeddings; an example's prompt is ``sum_k w[b,k] * P[idx[b,k]]`` (one gather
and one einsum for the batch). Input-level modules mix what they inject (the virtual tokens),
whatever the routing's ``mix`` says: there is no per-expert output to mix before the backbone runs.

Examples a stack does not serve (all their weights for it are zero, e.g. another task's LoRA in a
mixed batch) still get ``n`` prepended positions, masked out (attention 0), and keep position ids
``0..T-1``, so their outputs equal those of a forward without the prompt. Served examples get the
virtual tokens at positions ``0..n-1`` and their real tokens at ``n..n+T-1``, as peft does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from ..kernels import _sparsify_rows
from ..routing import LocalRouting
from .base import ModuleConfig, ModuleType, Stack, check_positive, register


def check_no_targets(config: ModuleConfig, what: str) -> None:
    """Input- and attention-level types have no linear targets: ``what`` says where they act."""
    if config.target_modules is not None:
        raise MtpeftError(f"{what}, not on linear layers; leave target_modules unset")


def embedding_std(backbone) -> float:
    """The spread of the backbone's word embeddings: the scale random virtual tokens start at."""
    w = backbone.model.get_input_embeddings().weight
    return float(w.detach().float().std())


class VirtualTokenStack(Stack):
    """Experts that each yield ``n_tokens`` virtual token embeddings ``[n, H]`` (``expert.tokens()``)."""

    def __init__(self, config: ModuleConfig, n_tokens: int, hidden: int):
        super().__init__(config)
        self.n_tokens = n_tokens
        self.hidden = hidden

    def _all_tokens(self) -> Tensor:
        """``[E, n, H]``, cached while no expert trains (inference)."""
        t = self._cache.get("tokens")
        if t is None:
            with torch.no_grad():
                t = torch.stack([e.tokens() for e in self.experts])
            self._cache["tokens"] = t
        return t

    def tokens_of(self, idx: Tensor) -> Tensor:
        """``[*idx.shape, n, H]``: the virtual tokens of experts ``idx``; only selected experts run."""
        if not self._any_trainable():
            return self._all_tokens()[idx]
        uniq, inv = torch.unique(idx, return_inverse=True)
        return torch.stack([self.experts[i].tokens() for i in uniq.tolist()])[inv]

    def mixed(self, local: LocalRouting, batch_size: int) -> tuple[Tensor, Tensor]:
        """Each example's prompt ``[B, n, H]`` and whether any expert of this stack serves it ``[B]``."""
        if local.per_token:
            raise MtpeftError("prompt-like modules (prompt, ptuning) are routed per example: give weights of shape "
                              "[batch, K], not per token")
        if local.weights.shape[0] != batch_size:
            raise MtpeftError(f"routing covers {local.weights.shape[0]} examples but the batch has {batch_size}")
        idx, w = _sparsify_rows(local.indices, local.weights)
        routed = (w != 0).any(-1)
        V = self.tokens_of(idx)  # [B, K, n, H]
        w = w.to(V.dtype)
        if w.shape[1] == 1:
            return V[:, 0] * w[:, 0, None, None], routed
        return torch.einsum("bk,bknh->bnh", w, V), routed

    def extend(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
               local: LocalRouting) -> tuple[Tensor, Tensor, Tensor, int]:
        """Prepend the virtual tokens: ``(embeds', mask', position_ids', n_prepended)``."""
        B, _, H = embeds.shape
        if H != self.hidden:
            raise MtpeftError(f"prompt width {self.hidden} does not match the backbone's hidden size {H}")
        n = self.n_tokens
        prompt, routed = self.mixed(local, B)
        embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
        attention_mask = torch.cat([routed[:, None].to(attention_mask.dtype).expand(B, n), attention_mask], dim=1)
        virtual_pos = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype).expand(B, n)
        shifted = position_ids + n * routed[:, None].to(position_ids.dtype)
        return embeds, attention_mask, torch.cat([virtual_pos, shifted], dim=1), n


# ---- prompt tuning ----------------------------------------------------------------------------
@dataclass
class PromptConfig(ModuleConfig):
    n_tokens: int = field(default=20, metadata={"help": "number of virtual tokens prepended to the input"})
    init_text: str | None = field(
        default=None,
        metadata={"help": "initialise the prompt from the embeddings of this text (tokenised with the backbone's "
                  "tokenizer, repeated or truncated to n_tokens); None: random"})
    init_std: float | None = field(
        default=None,
        metadata={"help": "standard deviation of the random init; None: that of the backbone's word embeddings"})

    def validate(self):
        super().validate()
        check_no_targets(self, "prompt modules act on the input embeddings")
        check_positive(n_tokens=self.n_tokens)
        if self.init_text is not None and not str(self.init_text).strip():
            raise MtpeftError("init_text is empty; give a text or leave it None for a random init")
        if self.init_std is not None:
            check_positive(init_std=self.init_std)


class _PromptExpert(nn.Module):
    def __init__(self, prompt: Tensor):
        super().__init__()
        self.prompt = nn.Parameter(prompt)

    def tokens(self) -> Tensor:
        return self.prompt


def text_init_tokens(backbone, text: str, n: int) -> Tensor:
    """``[n, H]``: the embeddings of ``text``'s tokens, repeated or truncated to ``n`` (as peft does)."""
    tok = getattr(backbone, "tokenizer", None)
    if tok is None:
        raise MtpeftError("init_text needs the backbone's tokenizer, and this backbone has none; "
                          "load it with mtpeft.backbone.load_backbone or use a random init")
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise MtpeftError(f"init_text {text!r} gives no tokens")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    emb = backbone.model.get_input_embeddings().weight
    return emb.detach()[torch.tensor(ids, device=emb.device)].float().cpu().clone()


class PromptStack(VirtualTokenStack):
    param_names = ("prompt",)

    def __init__(self, config: PromptConfig, backbone):
        hidden = backbone.model.get_input_embeddings().weight.shape[1]
        super().__init__(config, config.n_tokens, hidden)
        self.init_std = config.init_std or embedding_std(backbone)
        self._init = text_init_tokens(backbone, config.init_text, config.n_tokens) if config.init_text else None

    def new_expert(self, generator):
        if self._init is not None:
            return _PromptExpert(self._init.clone())
        return _PromptExpert(torch.randn(self.n_tokens, self.hidden, generator=generator) * self.init_std)


@register("prompt")
class PromptTuning(ModuleType):
    config_cls = PromptConfig
    level = "input"

    @classmethod
    def make_stack(cls, config, site, backbone):
        return PromptStack(config, backbone)
