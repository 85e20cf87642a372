"""Prefix tuning / P-tuning v2 (deep): ``l`` trainable keys and values in every attention layer.

Each expert holds ``kv: [L, 2, l, D]`` (layers, key/value, prefix length, ``D = kv_heads * head_dim``;
Llama's GQA has fewer key/value heads than query heads). With ``projection=True`` it is
reparameterised during training as ``MLP(embedding)`` (Li & Liang, 2021: ``embedding [l, H]`` ->
Linear -> tanh -> Linear -> ``L * 2 * D``); ``bank.finalize(name)`` computes ``kv`` once and drops
the MLP, so only ``kv`` is saved.

How the prefixes reach attention: the bank pre-fills a transformers ``DynamicCache`` with each
layer's prefix keys/values, extends the 2D attention mask by ``l`` in front and offsets position ids
by ``l``. Llama's attention appends its own (rotated) keys to the cache; so does BERT's
self-attention when given a cache, and ``create_bidirectional_mask`` takes the key length from the
2D mask (the path transformers keeps for peft's prefix tuning), so a non-decoder BertModel works
too (checked in tests/test_prompt_prefix.py against a reference computation). This uses the
backbones' own attention code (sdpa, eager, GQA, mask creation) instead of re-implementing it in a
wrapper. Prefix keys are not rotated (as in peft).

Mixed batches: each example's prefix is ``sum_k w[b,k] * kv[idx[b,k]]`` (one gather, one einsum);
examples no expert of the stack serves get zero prefixes whose positions are masked out and keep
their own position ids, so their outputs are those of the bare backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from ..kernels import _sparsify_rows
from ..routing import LocalRouting
from .base import ModuleConfig, ModuleType, Stack, check_positive, register
from .prompt import check_no_targets, embedding_std
from .ptuning import seeded


@dataclass
class PrefixConfig(ModuleConfig):
    n_tokens: int = field(default=20, metadata={"help": "prefix length l: key/value vectors added per attention layer"})
    projection: bool = field(
        default=False,
        metadata={"help": "reparameterise the prefixes through an MLP during training (drop it with bank.finalize)"})
    projection_hidden: int = field(default=512, metadata={"help": "hidden width of the reparameterisation MLP"})
    init_std: float | None = field(
        default=None,
        metadata={"help": "standard deviation of the random init of the prefixes (or of the MLP's input "
                  "embeddings); None: that of the backbone's word embeddings"})

    def validate(self):
        super().validate()
        check_no_targets(self, "prefix modules act on every attention layer")
        check_positive(n_tokens=self.n_tokens, projection_hidden=self.projection_hidden)
        if not isinstance(self.projection, bool):
            raise MtpeftError(f"projection must be true or false, got {self.projection!r}")
        if self.init_std is not None:
            check_positive(init_std=self.init_std)


def attention_shape(config) -> tuple[int, int, int]:
    """``(layers, key/value heads, head dim)`` of a transformers config (BERT, Llama and kin)."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        raise MtpeftError(f"cannot find the attention layout of {type(config).__name__} "
                          "(num_hidden_layers, num_attention_heads); prefix modules need it")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


class _KVExpert(nn.Module):
    def __init__(self, kv: Tensor):
        super().__init__()
        self.kv = nn.Parameter(kv)

    def prefix(self) -> Tensor:
        return self.kv


class _MLPExpert(nn.Module):
    """Training-time reparameterisation: ``kv = MLP(embedding)``."""

    def __init__(self, embedding: Tensor, mlp: nn.Module, shape: tuple[int, int, int, int]):
        super().__init__()
        self.embedding = nn.Parameter(embedding)
        self.mlp = mlp
        self.shape = shape  # (L, 2, l, D)

    def prefix(self) -> Tensor:
        L, two, n, D = self.shape
        return self.mlp(self.embedding).reshape(n, L, two, D).permute(1, 2, 0, 3)


class PrefixStack(Stack):
    def __init__(self, config: PrefixConfig, backbone):
        super().__init__(config)
        self.layers, self.kv_heads, self.head_dim = attention_shape(backbone.model.config)
        self.hidden = backbone.model.get_input_embeddings().weight.shape[1]
        self.n_tokens = config.n_tokens
        self.init_std = config.init_std or embedding_std(backbone)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return self.layers, 2, self.n_tokens, self.kv_heads * self.head_dim

    def new_expert(self, generator):
        if not self.config.projection:
            return _KVExpert(torch.randn(self.kv_shape, generator=generator) * self.init_std)
        h = self.config.projection_hidden
        with seeded(generator):
            emb = torch.randn(self.n_tokens, self.hidden) * self.init_std
            mlp = nn.Sequential(nn.Linear(self.hidden, h), nn.Tanh(),
                                nn.Linear(h, self.layers * 2 * self.kv_heads * self.head_dim))
        return _MLPExpert(emb, mlp, self.kv_shape)

    def finalize_expert(self, i: int) -> bool:
        e = self.experts[i]
        if isinstance(e, _KVExpert):
            return False
        with torch.no_grad():
            kv = e.prefix().detach().clone()
        new = _KVExpert(kv)
        new.requires_grad_(any(p.requires_grad for p in e.parameters()))
        self.experts[i] = new
        self.invalidate()
        return True

    def prefixes_of(self, idx: Tensor) -> Tensor:
        """``[*idx.shape, L, 2, l, D]``; only the selected experts run (all, cached, at inference)."""
        if not self._any_trainable():
            t = self._cache.get("kv")
            if t is None:
                with torch.no_grad():
                    t = torch.stack([e.prefix() for e in self.experts])
                self._cache["kv"] = t
            return t[idx]
        uniq, inv = torch.unique(idx, return_inverse=True)
        return torch.stack([self.experts[i].prefix() for i in uniq.tolist()])[inv]

    def prefix_kv(self, local: LocalRouting, batch_size: int, dtype, device
                  ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per layer keys and values ``[B, kv_heads, l, head_dim]`` and which examples are served ``[B]``."""
        if local.per_token:
            raise MtpeftError("prefix modules are routed per example: give weights of shape [batch, K], not per token")
        if local.weights.shape[0] != batch_size:
            raise MtpeftError(f"routing covers {local.weights.shape[0]} examples but the batch has {batch_size}")
        idx, w = _sparsify_rows(local.indices, local.weights)
        routed = (w != 0).any(-1)
        P = self.prefixes_of(idx)  # [B, K, L, 2, l, D]
        w = w.to(P.dtype)
        P = P[:, 0] * w[:, 0, None, None, None, None] if w.shape[1] == 1 else torch.einsum("bk,bk...->b...", w, P)
        B, L, _, n, _ = P.shape
        P = P.to(device=device, dtype=dtype).reshape(B, L, 2, n, self.kv_heads, self.head_dim).transpose(3, 4)
        return list(P[:, :, 0].unbind(1)), list(P[:, :, 1].unbind(1)), routed


@register("prefix")
class PrefixTuning(ModuleType):
    config_cls = PrefixConfig
    level = "attention"

    @classmethod
    def make_stack(cls, config, site, backbone):
        return PrefixStack(config, backbone)
