"""ModuleBank: the growing set of task modules attached to a frozen backbone.

The bank replaces each targeted ``nn.Linear`` with a ``BankedLinear`` (``layers.py``) that holds one
``Stack`` per group of same-type, same-config modules. Routing weights, or a router and its context,
reach the layers through a scoped context (``with bank.route(routing_or_router, ctx): ...``), never
global state. The bank knows no router class: it applies what a router returns.

Every change (add, remove, merge, unmerge, finalize, an artifact set or deleted) bumps ``bank.version``,
so caches and routers can tell that what they were built for has changed.
"""
from __future__ import annotations

import contextlib
import uuid
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import modules as _modules  # noqa: F401  (registers the built-in module types)
from ..checks import check_weights
from ..io import MtpeftError
from ..modules.base import MODULE_TYPES, ModuleConfig, ModuleType, Stack
from ..routing import LocalRouting, RouteContext, Routing, SiteFn, check_routing, localize
from .artifacts import ArtifactsAPI, ArtifactStore
from .input_level import BankOutput, InputLevelForward
from .layers import BankedLinear, BankState
from .manifest import check_name
from .plan import check_fits, check_size
from .sites import SiteWiring, group_key, is_pseudo


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


class ModuleBank(SiteWiring, ArtifactsAPI, InputLevelForward, nn.Module):
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
        self.uid = uuid.uuid4().hex  # this bank object (a loaded copy is another bank)
        self.version = 0
        self._artifacts = ArtifactStore()
        self._stash_sites: set[str] = set()
        self._group_ids: dict[str, Tensor] = {}
        self._active: dict[str, Tensor] = {}
        self._all_active: dict[str, bool] = {}

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, name) -> bool:
        return any(r.name == name for r in self.records)

    def index(self, name: str) -> int:
        for i, r in enumerate(self.records):
            if r.name == name:
                return i
        raise MtpeftError(f"no module {name!r} in the bank; it has: {', '.join(self.names) or '(none)'}")

    def ids(self, names) -> Tensor:
        """Module ids ``[len(names)]`` of ``names`` (each must be in the bank)."""
        pos = {r.name: i for i, r in enumerate(self.records)}
        missing = [n for n in names if n not in pos]
        if missing:
            raise MtpeftError(f"no module(s) {missing} in the bank; it has: {', '.join(self.names) or '(none)'}")
        return torch.tensor([pos[n] for n in names], dtype=torch.long)

    def record(self, name: str) -> ModuleRecord:
        return self.records[self.index(name)]

    def task_index(self, task: str) -> int:
        """The id of the (last added) module trained for ``task``: task-id routing."""
        for i in range(len(self.records) - 1, -1, -1):
            if self.records[i].task == task:
                return i
        raise MtpeftError(f"no module in the bank was trained on task {task!r}; tasks in the bank: "
                          f"{sorted({r.task for r in self.records if r.task})}")

    def locate(self, name: str) -> tuple[Group, int]:
        """The module's group and its position in the group's stacks (``stack.experts[j]``)."""
        for g in self.groups.values():
            if name in g.members:
                return g, g.members.index(name)
        raise MtpeftError(f"no module {name!r} in the bank; it has: {', '.join(self.names) or '(none)'}")

    def group_of(self, name: str) -> Group:
        return self.locate(name)[0]

    def common_group(self, names, what: str) -> Group:
        """The one group every module of ``names`` is in; an error naming ``what`` (e.g. "the skills") when
        they span several (another type or config)."""
        names = list(names)
        keys = {self.group_of(n).key for n in names}
        if len(keys) != 1:
            raise MtpeftError(f"{what} {names} must be modules of one type and config (one group of the bank); "
                              f"they span {sorted(keys)}")
        return self.group_of(names[0])

    def _changed(self) -> None:
        """Every change of what the bank holds: ids refreshed, version bumped."""
        pos = {r.name: i for i, r in enumerate(self.records)}
        self._group_ids = {k: torch.tensor([pos[m] for m in g.members], dtype=torch.long)
                           for k, g in self.groups.items()}
        self._active = {k: torch.tensor([not self.records[pos[m]].merged for m in g.members])
                        for k, g in self.groups.items()}
        self._all_active = {k: bool(a.all()) for k, a in self._active.items()}
        self.version += 1

    def _sites(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def stacks_of(self, which: str | Group) -> Iterator[tuple[str, Stack]]:
        """``(site, stack)`` of a group, or of the group of module ``which`` (a name)."""
        group = self.group_of(which) if isinstance(which, str) else which
        mods = self._sites()
        for site in group.sites:
            if is_pseudo(site):
                yield site, self.input_stacks[group.key]
            else:
                yield site, mods[site].stacks[group.key]

    def module_sites(self, name: str) -> list[str]:
        """Where the module acts: linear layer paths, or ``<input>`` / ``<attention>`` for prompts and prefixes."""
        return list(self.group_of(name).sites)

    def banked_layer(self, site: str) -> BankedLinear:
        m = self.model.get_submodule(site)
        if not isinstance(m, BankedLinear):
            raise MtpeftError(f"{site} is not a site of this bank")
        return m

    @torch.no_grad()
    def delta_weight(self, name: str) -> dict[str, Tensor]:
        """``{site: Delta W [d_out, d_in]}``: what the module adds to each linear layer's weight (LoRA ``B A``
        times its scale, KronA ``A kron B``; (IA)3 as ``W' - W`` of the unmerged weight)."""
        group, j = self.locate(name)
        if group.mtype.level != "linear" or not group.mtype.mergeable:
            raise MtpeftError(f"module {name!r} of type {group.mtype.name!r} has no weight delta; types with one: "
                              f"{', '.join(n for n in MODULE_TYPES.names() if MODULE_TYPES.get(n).mergeable)}")
        out = {}
        for site, stack in self.stacks_of(group):
            layer = self.banked_layer(site)
            if hasattr(stack, "merge_into"):
                w0 = layer.base.weight if layer.original is None else layer.original
                tmp = nn.Linear(w0.shape[1], w0.shape[0], bias=layer.base.bias is not None,
                                device=w0.device, dtype=w0.dtype)
                tmp.weight.copy_(w0)
                stack.merge_into(tmp, j, +1)
                out[site] = tmp.weight - w0
            else:
                out[site] = stack.delta_weight(j).detach().clone()
        return out

    # ---- growing and shrinking ---------------------------------------------------------------
    def add(self, name: str, module_type: str, config: ModuleConfig | dict | None = None, *,
            task: str | None = None, metadata: dict | None = None, seed: int = 0,
            trainable: bool = True) -> int:
        """Add a module; existing modules' outputs do not change. Returns its id."""
        check_name(name)
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
        check_size(self, name, module_type, config)  # before anything is allocated
        key = group_key(module_type, config)
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
        self._changed()
        return len(self.records) - 1

    def add_from(self, name: str, module_type: str, config: ModuleConfig | dict | None,
                 tensors: Mapping[str, Tensor], *, task: str | None = None, metadata: dict | None = None,
                 trainable: bool = False, finalized: bool = False, what: str | None = None) -> int:
        """Add a module whose parameters are ``tensors`` (``{site.param: tensor}``, as ``module_parameters``
        names them). The tensors must cover exactly the module's parameters with their shapes; on any
        mismatch nothing is added. ``finalized``: the tensors are in the layout ``finalize`` leaves."""
        what = what or f"module {name!r}"
        check_weights(tensors, what)
        if not finalized:  # the shapes the config makes, checked before the module is built
            mtype = MODULE_TYPES.get(module_type)
            cfg = config if isinstance(config, ModuleConfig) else mtype.config_cls.from_dict(dict(config or {}))
            check_fits(check_size(self, name, module_type, cfg), tensors, what)
        idx = self.add(name, module_type, config, task=task, metadata=metadata, trainable=trainable)
        try:
            if finalized:
                self.finalize(name)
            params = self.module_parameters(name)
            if set(params) != set(tensors):
                raise MtpeftError(f"{what}: the weights do not fit its config (missing "
                                  f"{sorted(set(params) - set(tensors))[:3]}, unexpected "
                                  f"{sorted(set(tensors) - set(params))[:3]})")
            with torch.no_grad():
                for k, p in params.items():
                    t = tensors[k]
                    if tuple(p.shape) != tuple(t.shape):
                        raise MtpeftError(f"{what}: {k} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                    p.copy_(t)
            for _, stack in self.stacks_of(name):
                stack.invalidate()
        except BaseException:
            self.remove(name)
            raise
        return idx

    def remove(self, name: str) -> None:
        """Drop a module with its artifacts; ids of the modules after it shift down by one (the version says so)."""
        i = self.index(name)
        if self.records[i].merged:
            self.unmerge(name)
        group, j = self.locate(name)
        for _, stack in self.stacks_of(group):
            stack.remove_expert(j)
        group.members.pop(j)
        del self.records[i]
        self._artifacts.delete("module", name)
        if not group.members:
            self._uninstall(group.key, group.sites)
            del self.groups[group.key]
            self._artifacts.delete("group", group.key)
        self._changed()

    def module_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """``{site.param: Parameter}`` of one module."""
        group, j = self.locate(name)
        out = {}
        for site, stack in self.stacks_of(group):
            for pname, p in stack.experts[j].named_parameters():
                out[f"{site}.{pname}"] = p
        return out

    def set_trainable(self, name: str | None, trainable: bool) -> None:
        for n in ([name] if name is not None else self.names):
            for p in self.module_parameters(n).values():
                p.requires_grad_(trainable)
            for _, stack in self.stacks_of(n):
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
        group, j = self.locate(name)
        changed = False
        for _, stack in self.stacks_of(group):
            fin = getattr(stack, "finalize_expert", None)
            if fin is not None:
                changed = bool(fin(j)) or changed
        if changed:
            self.record(name).finalized = True
            self._changed()
        return changed

    # ---- merging -----------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        """Fold the module into the base weights (LoRA, (IA)3, KronA); routing to it is then a no-op.
        The bare backbone (``bare()``, the scorer's label side) still runs on the unmerged weights."""
        rec = self.record(name)
        group, j = self.locate(name)
        if not group.mtype.mergeable:
            raise MtpeftError(f"modules of type {rec.type!r} cannot be merged into the base weights")
        if rec.merged:
            raise MtpeftError(f"module {name!r} is already merged")
        self._apply_delta(group, j, +1, name)
        rec.merged = True
        self._changed()

    def unmerge(self, name: str) -> None:
        rec = self.record(name)
        if not rec.merged:
            raise MtpeftError(f"module {name!r} is not merged")
        group, j = self.locate(name)
        self._apply_delta(group, j, -1, name)
        rec.merged = False
        self._changed()

    @torch.no_grad()
    def _apply_delta(self, group: Group, j: int, sign: int, name: str) -> None:
        for site, stack in self.stacks_of(group):
            layer = self.banked_layer(site)
            if sign > 0:
                layer.note_merge(name)
            base = layer.base
            stack.merge_into(base, j, sign) if hasattr(stack, "merge_into") else \
                base.weight.add_(sign * stack.delta_weight(j).to(base.weight.dtype))
            if sign < 0:
                layer.note_unmerge(name)

    # ---- routing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, routing=None, ctx: RouteContext | None = None):
        """Scope in which the layers apply ``routing``: a ``Routing``, a router (an object with ``per_site``
        and ``route(bank, ctx)`` or ``at_site(site, x, ctx)``, e.g. from ``mtpeft.routers``), a function
        ``fn(site, x)`` called at each site, or None (the backbone with merged modules)."""
        st = self.state
        router = None
        if isinstance(routing, Routing):
            check_routing(routing, len(self))
        elif routing is not None:
            router = routing if hasattr(routing, "per_site") else SiteFn(routing) if callable(routing) else None
            if router is None:
                raise MtpeftError(f"cannot route with a {type(routing).__name__}; give a Routing, a router "
                                  "(mtpeft.routers) or a function (site, x) -> Routing")
            check = getattr(router, "check_bank", None)
            if check is not None:
                check(self)  # a router built for another state of the bank refuses (or rebinds) here
            routing = None
        snap = st.snapshot()
        st.routing, st.router, st.ctx, st.bare, st.local, st.stash, st.resolved = routing, router, ctx, False, {}, {}, False
        try:
            yield self
        finally:
            st.restore(snap)

    @contextlib.contextmanager
    def select_rows(self, examples: Tensor):
        """Scope in which row ``i`` of each forward's batch is example ``examples[i]`` of the batch in scope (a
        cache continuation that spreads an example's work over several rows, or drops examples): the routing
        in force and the router's context are re-indexed; what a per-example router answered is kept."""
        st = self.state
        snap = st.snapshot()
        if st.routing is not None:
            st.routing = st.routing.index_select(examples)
        if st.ctx is not None:
            st.ctx = st.ctx.index_select(examples)
        st.local, st.stash = {}, {}
        try:
            yield self
        finally:
            st.restore(snap)

    def disabled(self):
        """Scope in which the backbone runs with no module routed (merged modules stay merged)."""
        return self.route(None)

    @contextlib.contextmanager
    def bare(self):
        """Scope in which the bare pretrained backbone runs: no module acts, merged ones included."""
        with self.route(None):
            self.state.bare = True
            yield self

    def localize(self, key: str, routing: Routing) -> LocalRouting | None:
        """``routing`` (already checked against the bank) restricted to group ``key``; merged modules drop out."""
        local = localize(routing, self._group_ids[key], len(self.records), check=False)
        if local is None or self._all_active[key]:
            return local
        active = self._active[key].to(local.weights.device)
        w = local.weights * active[local.indices].to(local.weights.dtype)
        if not bool((w != 0).any()):
            return None
        return LocalRouting(w, local.indices, local.mix, local.num_experts, local.rows)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, routing=None, *, ctx: RouteContext | None = None,
                **kwargs) -> BankOutput:
        """Run the backbone with the bank's modules under ``routing`` (a Routing or a router, with ``ctx``),
        or under what is in scope (``bank.route``)."""
        if routing is not None:
            with self.route(routing, ctx):
                return self.forward(input_ids, attention_mask, **kwargs)
        st = self.state
        if st.router is not None and not st.bare:
            if st.ctx is None:
                st.ctx = ctx or RouteContext()
            st.ctx.bind(input_ids, attention_mask, lambda: self.pooled(input_ids, attention_mask))
            if not st.router.per_site and not st.resolved:  # a per-example router: once per scope
                r = st.router.route(self, st.ctx)
                if r is not None:
                    if not isinstance(r, Routing):
                        raise MtpeftError(f"router {type(st.router).__name__}.route returned {type(r).__name__}; "
                                          "return a Routing (or None: no module)")
                    check_routing(r, len(self))
                st.routing, st.resolved = r, True
        return self._run(input_ids, attention_mask, kwargs)

    @torch.no_grad()
    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The bare backbone's mean-pooled, L2-normalised embedding ``[B, H]`` of a batch."""
        with self.bare():
            out = self._run(input_ids, attention_mask, {})
        m = attention_mask.unsqueeze(-1).to(out.output.dtype)
        return F.normalize((out.output * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)

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

    # ---- persistence (persist.py) ------------------------------------------------------------
    def save(self, path: str | Path, only: list[str] | None = None) -> None:
        """Write the bank to directory ``path`` (see ``persist.save_bank``); ``only``: just these modules
        changed, the other modules' files are kept."""
        from .persist import save_bank

        save_bank(self, path, only)

    @classmethod
    def load(cls, path: str | Path, backbone, trainable: bool = False) -> ModuleBank:
        """A saved bank on ``backbone``: schema, fingerprint, files and checksums checked before anything changes."""
        from .persist import load_bank

        return load_bank(cls, path, backbone, trainable)
