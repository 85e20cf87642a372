"""ModuleBank: the growing set of task modules attached to a frozen backbone.

The bank replaces each targeted ``nn.Linear`` with a ``BankedLinear`` that holds one ``Stack``
per group of same-type, same-config modules. Routing weights reach the layers through a scoped
context (``with bank.route(routing): ...``), never global state. The bank knows no router.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import modules as _modules  # noqa: F401  (registers the built-in module types)
from .io import MtpeftError
from .kernels import routed_delta
from .modules.base import MODULE_TYPES, LinearStack, ModuleConfig, ModuleType, Stack, match_targets
from .persist import load_bank, read_manifest, remove_saved_module, save_bank
from .routing import LocalRouting, Routing, RoutingLike, localize


class BankState:
    """The routing in force for one forward pass; shared by the bank and its banked layers."""

    def __init__(self):
        self.routing: RoutingLike | None = None
        self.local: dict[str, LocalRouting | None] = {}
        self.stash: dict[str, Tensor] = {}


@dataclass
class Group:
    """Modules of one type and one config: their weights are stacked at each site."""

    key: str
    mtype: type[ModuleType]
    config: ModuleConfig
    members: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)


@dataclass
class ModuleRecord:
    name: str
    type: str
    config: dict[str, Any]
    task: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    merged: bool = False
    finalized: bool = False  # training-only reparameterisation dropped (see ModuleBank.finalize)


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


class BankedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the stacks of the bank's modules that act on it."""

    def __init__(self, base: nn.Linear, site: str, bank: ModuleBank):
        super().__init__()
        self.base = base
        self.site = site
        self.stacks = nn.ModuleDict()
        object.__setattr__(self, "_bank", bank)  # a back-reference, not a submodule

    @property
    def weight(self) -> Tensor:  # so code that reads layer.weight (e.g. dtype checks) still works
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        bank = self._bank
        state = bank.state
        if state.routing is None:  # bare pass: nothing reads the stash, so keep no activations
            return self.base(x)
        if self.site in bank._stash_sites:
            state.stash[self.site] = x
        # Stacks compose in insertion order. Leading input-scaling stacks ((IA)3 on the FFN output,
        # W (x * l)) fold into the base matmul: W (x (1 + dl)) + b, one matmul instead of two.
        scaled, rest = None, []
        for key, stack in self.stacks.items():
            local = bank._local_routing(key, self.site, x)
            if local is None:
                continue
            if not rest and getattr(stack, "input_scaling", False):
                scaled = stack.scaled_input(x, local) if scaled is None else scaled + routed_delta(stack, x, local)
            else:
                rest.append((stack, local))
        y = self.base(x if scaled is None else scaled)
        for stack, local in rest:
            y = stack(x, y, local)
        return y


class ModuleBank(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        if getattr(backbone.model, "_mtpeft_bank", False) or any(
                isinstance(m, BankedLinear) for m in backbone.model.modules()):
            raise MtpeftError("this backbone already carries a ModuleBank; load a fresh backbone "
                              "(load_backbone(...)) for a second bank, or keep using the first")
        backbone.model._mtpeft_bank = True
        self.backbone = backbone
        self.model = backbone.model
        self.family = backbone.family
        self.records: list[ModuleRecord] = []
        self.groups: dict[str, Group] = {}
        self.input_stacks = nn.ModuleDict()  # group key -> stack for input-level types (prompts)
        self.state = BankState()
        self._stash_sites: set[str] = set()
        self._group_ids: dict[str, Tensor] = {}
        self._active: dict[str, Tensor] = {}

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def index(self, name: str) -> int:
        for i, r in enumerate(self.records):
            if r.name == name:
                return i
        raise MtpeftError(f"no module {name!r} in the bank; it has: {', '.join(self.names) or '(none)'}")

    def record(self, name: str) -> ModuleRecord:
        return self.records[self.index(name)]

    def task_index(self, task: str) -> int:
        """The id of the (last added) module trained for ``task``: task-id routing."""
        for i in range(len(self.records) - 1, -1, -1):
            if self.records[i].task == task:
                return i
        raise MtpeftError(f"no module in the bank was trained on task {task!r}; tasks in the bank: "
                          f"{sorted({r.task for r in self.records if r.task})}")

    def _group_of(self, name: str) -> tuple[Group, int]:
        for g in self.groups.values():
            if name in g.members:
                return g, g.members.index(name)
        raise MtpeftError(f"no module {name!r} in the bank")

    def _refresh_ids(self) -> None:
        pos = {r.name: i for i, r in enumerate(self.records)}
        self._group_ids = {k: torch.tensor([pos[m] for m in g.members], dtype=torch.long)
                           for k, g in self.groups.items()}
        self._active = {k: torch.tensor([not self.records[pos[m]].merged for m in g.members])
                        for k, g in self.groups.items()}

    def _sites(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def stacks_of(self, group: Group) -> Iterator[tuple[str, Stack]]:
        mods = self._sites()
        for site in group.sites:
            if _is_pseudo(site):
                yield site, self.input_stacks[group.key]
            else:
                yield site, mods[site].stacks[group.key]

    # ---- growing and shrinking ---------------------------------------------------------------
    def add(self, name: str, module_type: str, config: ModuleConfig | dict | None = None, *,
            task: str | None = None, metadata: dict | None = None, seed: int = 0,
            trainable: bool = True) -> int:
        """Add a module; existing modules' outputs do not change. Returns its id."""
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise MtpeftError(f"module name {name!r} is not usable as a file name; use letters, digits, - and _")
        if name in self.names:
            raise MtpeftError(f"the bank already has a module named {name!r}; pick another name, or remove it first (bank.remove, or `mtpeft bank rm BANK NAME`)")
        mtype = MODULE_TYPES.get(module_type)
        if config is None:
            config = mtype.config_cls()
        elif isinstance(config, dict):
            config = mtype.config_cls.from_dict(config)
        elif not isinstance(config, mtype.config_cls):
            raise MtpeftError(f"module type {module_type!r} takes a {mtype.config_cls.__name__}, "
                              f"got {type(config).__name__}")
        key = f"{module_type}:" + hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        # The init depends on (seed, name) only, not on what the bank already holds.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        group = self.groups.get(key)
        if group is None:
            group = Group(key, mtype, config, sites=self._install(key, mtype, config))
            self.groups[key] = group
        for site, stack in self.stacks_of(group):
            stack.add_expert(gen)
            stack.experts[-1].to(device=self._site_device(site))  # the first expert of a stack too
            if not trainable:
                stack.experts[-1].requires_grad_(False)
        group.members.append(name)
        self.records.append(ModuleRecord(name, module_type, config.to_dict(), task, {}, dict(metadata or {})))
        self._refresh_ids()
        return len(self.records) - 1

    def _install(self, key: str, mtype: type[ModuleType], config: ModuleConfig) -> list[str]:
        """Create the group's stacks; on failure nothing stays installed."""
        installed: list[str] = []
        try:
            self._install_into(key, mtype, config, installed)
        except BaseException:
            self._uninstall(key, installed)
            raise
        return installed

    def _install_into(self, key: str, mtype: type[ModuleType], config: ModuleConfig, installed: list[str]) -> None:
        if mtype.level == "composite":
            # A composite type (MAM) is several types under one module: each part installs its
            # stacks under the same group key, so one routing weight drives all of them.
            for ptype, pconfig in mtype.parts(config):
                self._install_into(key, ptype, pconfig, installed)
            return
        if mtype.level in ("input", "attention"):
            # One stack for the whole model, at a pseudo-site: "<input>" (prompts: embeddings)
            # or "<attention>" (prefixes: keys and values of every attention layer).
            if any(_is_pseudo(x) for x in installed):
                raise MtpeftError(f"module type {mtype.name!r}: a composite type has two input/attention-level parts")
            stack = mtype.make_stack(config, None, self.backbone)
            stack.to(device=self.model.get_input_embeddings().weight.device)
            site = f"<{mtype.level}>"
            object.__setattr__(stack, "state", self.state)
            object.__setattr__(stack, "site", site)
            self.input_stacks[key] = stack
            installed.append(site)
            return
        mods = self._sites()
        # Sites already wrapped are found by their BankedLinear name (the base lives at .base).
        candidates = [n for n, m in mods.items() if isinstance(m, (nn.Linear, BankedLinear))
                      and not n.endswith(".base") and not _is_head(n, self.family)]
        sites = match_targets(candidates, mtype.targets(self.family, config))
        if not sites:
            raise MtpeftError(f"target_modules {mtype.targets(self.family, config)} match no linear layer of "
                              f"this {self.family} backbone; examples of layer names: {candidates[:6]}")
        for site in sites:
            m = self._ensure_wrapped(site)
            if site in installed:
                raise MtpeftError(f"module type {mtype.name!r}: two parts of a composite type act on {site}")
            stack = mtype.make_stack(config, m.base, self.backbone)
            stack.to(device=m.base.weight.device)
            object.__setattr__(stack, "state", self.state)  # stacks may read inputs stashed by other sites
            object.__setattr__(stack, "site", site)
            m.stacks[key] = stack
            installed.append(site)
            for extra in stack.stash_sources(site):
                self._ensure_wrapped(extra)
                self._stash_sites.add(extra)

    def _uninstall(self, key: str, sites: list[str]) -> None:
        mods = self._sites()
        for site in sites:
            if _is_pseudo(site):
                if key in self.input_stacks:
                    del self.input_stacks[key]
            elif key in mods[site].stacks:
                del mods[site].stacks[key]

    def _site_device(self, site: str) -> torch.device:
        if _is_pseudo(site):
            return self.model.get_input_embeddings().weight.device
        return self.model.get_submodule(site).weight.device

    def _ensure_wrapped(self, site: str) -> BankedLinear:
        m = self.model.get_submodule(site)
        if not isinstance(m, BankedLinear):
            if not isinstance(m, nn.Linear):
                raise MtpeftError(f"{site} is not a linear layer")
            m = BankedLinear(m, site, self)
            parent, _, child = site.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, m)
        return m

    def remove(self, name: str) -> None:
        i = self.index(name)
        if self.records[i].merged:
            self.unmerge(name)
        group, j = self._group_of(name)
        for _, stack in self.stacks_of(group):
            stack.remove_expert(j)
        group.members.pop(j)
        del self.records[i]
        if not group.members:
            self._uninstall(group.key, group.sites)
            del self.groups[group.key]
        self._refresh_ids()

    def module_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """``{site.param: Parameter}`` of one module."""
        group, j = self._group_of(name)
        out = {}
        for site, stack in self.stacks_of(group):
            for pname, p in stack.experts[j].named_parameters():
                out[f"{site}.{pname}"] = p
        return out

    def set_trainable(self, name: str | None, trainable: bool) -> None:
        for n in ([name] if name is not None else self.names):
            for p in self.module_parameters(n).values():
                p.requires_grad_(trainable)
            group, _ = self._group_of(n)
            for _, stack in self.stacks_of(group):
                stack.invalidate()

    def freeze(self, name: str | None = None) -> None:
        self.set_trainable(name, False)

    def unfreeze(self, name: str) -> None:
        self.set_trainable(name, True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the backbone is frozen: its dropout stays off
        for m in self.modules():
            if isinstance(m, Stack):
                m.train(mode)
        return self

    def finalize(self, name: str) -> bool:
        """Drop a module's training-only reparameterisation (prefix MLP, P-tuning encoder).

        The module's effective parameters (prefix keys/values, virtual tokens) are computed once and
        kept; the rest is discarded, so only they are saved. Outputs do not change. Call it after
        training (optimizers holding the old parameters go stale). Returns whether anything changed;
        types without a reparameterisation are left as they are.
        """
        group, j = self._group_of(name)
        changed = False
        for _, stack in self.stacks_of(group):
            fin = getattr(stack, "finalize_expert", None)
            if fin is not None:
                changed = bool(fin(j)) or changed
        if changed:
            self.record(name).finalized = True
        return changed

    # ---- merging -----------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold the module into the base weights (LoRA, (IA)3, KronA); routing to it is then a no-op."""
        rec = self.record(name)
        group, j = self._group_of(name)
        if not group.mtype.mergeable:
            raise MtpeftError(f"modules of type {rec.type!r} cannot be merged into the base weights")
        if rec.merged:
            raise MtpeftError(f"module {name!r} is already merged")
        self._apply_delta(group, j, +1)
        rec.merged = True
        self._refresh_ids()

    def unmerge(self, name: str) -> None:
        rec = self.record(name)
        if not rec.merged:
            raise MtpeftError(f"module {name!r} is not merged")
        group, j = self._group_of(name)
        self._apply_delta(group, j, -1)
        rec.merged = False
        self._refresh_ids()

    @torch.no_grad()
    def _apply_delta(self, group: Group, j: int, sign: int) -> None:
        mods = self._sites()
        for site, stack in self.stacks_of(group):
            base = mods[site].base
            stack.merge_into(base, j, sign) if hasattr(stack, "merge_into") else \
                base.weight.add_(sign * stack.delta_weight(j).to(base.weight.dtype))

    # ---- routing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, routing: RoutingLike | None):
        """Scope in which the layers apply ``routing`` (a Routing, or a per-site router callable)."""
        prev, prev_local = self.state.routing, self.state.local
        self.state.routing, self.state.local = routing, {}
        try:
            yield self
        finally:
            self.state.routing, self.state.local = prev, prev_local
            self.state.stash = {}

    def disabled(self):
        """Scope in which the bare backbone runs (merged modules stay merged)."""
        return self.route(None)

    def _local_routing(self, key: str, site: str, x: Tensor) -> LocalRouting | None:
        st = self.state
        routing = st.routing
        if callable(routing) and not isinstance(routing, Routing):
            r = routing(site, x)
            return self._localize(key, r)
        if key not in st.local:
            st.local[key] = self._localize(key, routing)
        return st.local[key]

    def _localize(self, key: str, routing: Routing) -> LocalRouting | None:
        ids = self._group_ids[key]
        local = localize(routing, ids, len(self.records))
        if local is None:
            return None
        active = self._active[key].to(local.weights.device)
        if not bool(active.all()):
            w = local.weights * active[local.indices].to(local.weights.dtype)
            if not bool((w != 0).any()):
                return None
            local = LocalRouting(w, local.indices, local.mix, local.num_experts)
        return local

    def forward(self, input_ids: Tensor, attention_mask: Tensor, routing: RoutingLike | None = None,
                **kwargs) -> BankOutput:
        """Run the backbone with the bank's modules under ``routing`` (or the routing in scope)."""
        if routing is not None:
            with self.route(routing):
                return self.forward(input_ids, attention_mask, **kwargs)
        r = self.state.routing
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

    def _input_level_routing(self, r: RoutingLike | None) -> list[tuple[Stack, LocalRouting]]:
        """The input/attention-level stacks (prompts, prefixes) that ``r`` routes some example to."""
        if r is None or not len(self.input_stacks):
            return []
        if not isinstance(r, Routing):
            raise MtpeftError("input-level modules (prompts, prefixes) need per-example routing (a Routing), "
                              "not a per-layer router")
        used = []
        for key, stack in self.input_stacks.items():
            local = self._localize(key, r)
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
                              f"exceed the backbone's {max_pos} positions; truncate the inputs to fewer tokens")
        if n_virtual and r.per_token:
            self.state.routing, self.state.local = r.pad_tokens(n_virtual), {}
        try:
            out = self._body()(inputs_embeds=embeds, attention_mask=model_mask, position_ids=position_ids, **kwargs)
        finally:
            if n_virtual and r.per_token:
                self.state.routing, self.state.local = r, {}
        res = BankOutput(out.last_hidden_state, attention_mask, n_virtual)
        if kwargs.get("use_cache"):
            res = self._with_cache(res, out, model_mask, position_ids, attention_mask[:, n_virtual:])
        return res

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def lm_head(self) -> nn.Module:
        """The causal LM's output projection (hidden states -> vocabulary logits)."""
        return self.model.get_output_embeddings()

    # ---- persistence (mtpeft/persist.py) -------------------------------------------------------
    def save(self, path: str | Path, only: list[str] | None = None) -> None:
        """Write ``manifest.json`` plus one safetensors file per module, each atomically (``only``: rewrite
        just these modules' weights, keep the other files)."""
        save_bank(self, path, only)

    @classmethod
    def load(cls, path: str | Path, backbone, trainable: bool = False) -> ModuleBank:
        """A saved bank on ``backbone``: schema, fingerprint, files and checksums checked before anything changes."""
        return load_bank(cls, path, backbone, trainable)


def _is_pseudo(site: str) -> bool:
    """Sites of input- and attention-level stacks ("<input>", "<attention>"), not layer paths."""
    return site.startswith("<")


def _is_head(name: str, family: str) -> bool:
    return name in ("lm_head", "pooler.dense") or name.endswith(".lm_head")


__all__ = ["BankOutput", "BankedLinear", "LinearStack", "ModuleBank", "ModuleRecord", "read_manifest",
           "remove_saved_module"]

