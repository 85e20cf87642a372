"""The bank's forward: the backbone under the routing in scope, with the input-level modules applied.

Prompts prepend virtual tokens to the embeddings; prefixes pre-fill every attention layer's keys and values;
a key/value cache given back continues without applying them again. ``ModuleBank`` inherits this mixin;
it holds no state of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from ..modules.base import Stack
from ..routing import LocalRouting, Routing


@dataclass
class BankOutput:
    """Last hidden states (for a causal LM, before ``bank.lm_head``), with the mask of the positions they cover.

    ``n_virtual`` positions were prepended by input-level modules (prompts) before the real tokens.
    Prefix modules add keys and values inside attention, not positions: they do not count here.

    With ``use_cache=True`` (causal LMs) also: ``cache``, the keys and values of every position the
    model attended to (prefixes, virtual tokens, the input); ``cache_mask`` ``[B, cache length]``, which
    of them are real; ``next_positions`` ``[B]``, the position id each example's next token takes.
    Pass ``cache=out.cache`` (or ``past_key_values=``) to continue: input-level modules are then not applied again.
    """

    output: Tensor
    attention_mask: Tensor
    n_virtual: int = 0
    cache: Any = None
    cache_mask: Tensor | None = None
    next_positions: Tensor | None = None


class InputLevelForward:
    """The forward half of ``ModuleBank`` (see there): expects ``model``, ``family``, ``state``,
    ``input_stacks`` and ``localize`` on the bank."""

    def _run(self, input_ids: Tensor, attention_mask: Tensor, kwargs: dict) -> BankOutput:
        r = self.state.routing if not self.state.bare else None
        kwargs = self._cache_kwargs(kwargs)
        past = kwargs.get(self._cache_arg)
        continuing = past is not None and past.get_seq_length() > 0
        # A continuation: the input-level modules' virtual tokens and prefixes are already in the cache.
        used = [] if continuing else self._input_level_routing(r)
        if not used:
            out = self._body()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            res = BankOutput(out.last_hidden_state, attention_mask, 0)
            if kwargs.get("use_cache") and not continuing and attention_mask.dim() == 2:
                res = self._with_cache(res, out, attention_mask, kwargs.get("position_ids"), attention_mask)
            return res
        return self._forward_input_level(input_ids, attention_mask, r, used, kwargs)

    @staticmethod
    def _with_cache(res: BankOutput, out, cache_mask: Tensor, position_ids: Tensor | None,
                    real_mask: Tensor) -> BankOutput:
        """``res`` plus what a continuation needs: the cache, its mask, each example's next position id
        (``position_ids`` None: the backbone's default, 0..T-1)."""
        T = real_mask.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=real_mask.device).expand_as(real_mask)
        pos = position_ids[:, -T:]
        nxt = torch.where(real_mask.bool(), pos, torch.full_like(pos, -1)).max(1).values + 1
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return BankOutput(res.output, res.attention_mask, res.n_virtual, cache, cache_mask, nxt)

    @property
    def _cache_arg(self) -> str:
        """The name the backbone's forward takes a key/value cache by (``cache`` from transformers 5.2x)."""
        import inspect

        arg = getattr(self, "_cache_arg_name", None)
        if arg is None:
            params = inspect.signature(self._body().forward).parameters
            arg = self._cache_arg_name = "cache" if "cache" in params else "past_key_values"
        return arg

    def _cache_kwargs(self, kwargs: dict) -> dict:
        """Accept a cache as ``cache=`` or ``past_key_values=`` and pass it on under the backbone's name."""
        given = [k for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
        if not given:
            return kwargs
        if len(given) > 1:
            raise MtpeftError("give the key/value cache once, as cache= or past_key_values=, not both")
        value = kwargs[given[0]]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        kwargs[self._cache_arg] = value
        return kwargs

    def _body(self) -> nn.Module:
        return self.model.get_decoder() if self.family == "causal" else self.model

    def _input_level_routing(self, r: Routing | None) -> list[tuple[Stack, LocalRouting]]:
        """The input/attention-level stacks (prompts, prefixes) that ``r`` routes some example to."""
        if not len(self.input_stacks) or self.state.bare:
            return []
        if self.state.router is not None and self.state.router.per_site:
            raise MtpeftError("input-level modules (prompts, prefixes) need per-example routing (a Routing, or a "
                              "router with per_site = False), not a per-layer router")
        if r is None:
            return []
        used = []
        for key, stack in self.input_stacks.items():
            local = self.localize(key, r)
            if local is not None:
                used.append((stack, local))
        return used

    def _forward_input_level(self, input_ids, attention_mask, r, used, kwargs) -> BankOutput:
        """Prompts prepend virtual tokens to the embeddings; prefixes pre-fill every attention layer's
        keys and values (a transformers ``DynamicCache``, which Llama and BERT both accept).

        Examples a module does not serve get its positions masked out (attention 0) and keep their
        own position ids, so their outputs are those of a forward without the module. Position ids
        are explicit: absolute-position models (BERT) and RoPE models (Llama) both read them.
        """
        B, T = attention_mask.shape
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self.model.get_input_embeddings()(input_ids)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is None:  # what the backbone uses by default, so unrouted examples are unchanged
            position_ids = torch.arange(T, device=embeds.device).expand(B, T)
        n_virtual = 0
        for stack, local in used:
            if hasattr(stack, "extend"):
                embeds, attention_mask, position_ids, n = stack.extend(embeds, attention_mask, position_ids, local)
                n_virtual += n
        if n_virtual and kwargs.get("token_type_ids") is not None:
            tt = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(B, n_virtual), tt], dim=1)
        model_mask = attention_mask
        prefixes = [(stack, local) for stack, local in used if hasattr(stack, "prefix_kv")]
        if prefixes:
            if kwargs.get(self._cache_arg) is not None:
                raise MtpeftError("prefix modules fill the key/value cache (past_key_values) themselves; do not pass an empty cache with "
                                  "them (a cache that already holds positions continues it, modules not re-applied)")
            from transformers import DynamicCache

            keys, values, masks = [], [], []
            for stack, local in prefixes:
                k, v, routed = stack.prefix_kv(local, B, embeds.dtype, embeds.device)
                keys.append(k)
                values.append(v)
                masks.append(routed[:, None].to(attention_mask.dtype).expand(B, k[0].shape[2]))
                position_ids = position_ids + k[0].shape[2] * routed.long()[:, None]
            cache = DynamicCache()
            for layer in range(len(keys[0])):
                cache.update(torch.cat([k[layer] for k in keys], dim=2),
                             torch.cat([v[layer] for v in values], dim=2), layer)
            kwargs[self._cache_arg] = cache
            model_mask = torch.cat(masks + [attention_mask], dim=1)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if self.family == "encoder" and max_pos and int(position_ids.max()) >= max_pos:
            raise MtpeftError(f"inputs of {T} tokens plus {int(position_ids.max()) + 1 - T} virtual/prefix positions "
                              f"exceed the backbone's {max_pos} positions; use fewer virtual tokens (option n_tokens) "
                              "or truncate the inputs to fewer tokens (the scorer's max_length)")
        st = self.state
        if n_virtual and r.per_token:
            st.routing, st.local = r.pad_tokens(n_virtual), {}
        try:
            out = self._body()(inputs_embeds=embeds, attention_mask=model_mask, position_ids=position_ids, **kwargs)
        finally:
            if n_virtual and r.per_token:
                st.routing, st.local = r, {}
        res = BankOutput(out.last_hidden_state, attention_mask, n_virtual)
        if kwargs.get("use_cache"):
            res = self._with_cache(res, out, model_mask, position_ids, attention_mask[:, n_virtual:])
        return res
