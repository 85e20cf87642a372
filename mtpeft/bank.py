"""ModuleBank: the growing set of task modules attached to a frozen backbone.

The bank replaces each targeted ``nn.Linear`` with a ``BankedLinear`` that holds one ``Stack``
per group of same-type, same-config modules. Routing weights reach the layers through a scoped
context (``with bank.route(routing): ...``), never global state. The bank knows no router.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from . import modules as _modules  # noqa: F401  (registers the built-in module types)
from .io import MtpeftError, read_json, read_tensors, write_json, write_tensors
from .modules.base import MODULE_TYPES, LinearStack, ModuleConfig, ModuleType, Stack, match_targets
from .routing import LocalRouting, Routing, RoutingLike, localize

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


@dataclass
class BankOutput:
    """Last hidden states (for a causal LM, before ``bank.lm_head``), with the mask of the positions they cover.

    ``n_virtual`` positions were prepended by input-level modules (prompts) before the real tokens.
    """

    output: Tensor
    attention_mask: Tensor
    n_virtual: int = 0


class BankedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus the stacks of the bank's modules that act on it."""

    def __init__(self, base: nn.Linear, site: str, bank: "ModuleBank"):
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
        y = self.base(x)
        bank = self._bank
        state = bank.state
        if self.site in bank._stash_sites:
            state.stash[self.site] = x
        if state.routing is None:
            return y
        for key, stack in self.stacks.items():
            local = bank._local_routing(key, self.site, x)
            if local is not None:
                y = stack(x, y, local)
        return y


class ModuleBank(nn.Module):
    def __init__(self, backbone):
        super().__init__()
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
            if site == "<input>":
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
            raise MtpeftError(f"the bank already has a module named {name!r}; pick another name or remove it")
        mtype = MODULE_TYPES.get(module_type)
        if config is None:
            config = mtype.config_cls()
        elif isinstance(config, dict):
            config = mtype.config_cls.from_dict(config)
        elif not isinstance(config, mtype.config_cls):
            raise MtpeftError(f"module type {module_type!r} takes a {mtype.config_cls.__name__}, "
                              f"got {type(config).__name__}")
        key = f"{module_type}:" + hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        gen = torch.Generator().manual_seed(seed * 100003 + len(self.records))
        group = self.groups.get(key)
        if group is None:
            group = Group(key, mtype, config, sites=self._install(key, mtype, config))
            self.groups[key] = group
        for _, stack in self.stacks_of(group):
            stack.add_expert(gen)
            if not trainable:
                stack.experts[-1].requires_grad_(False)
        group.members.append(name)
        self.records.append(ModuleRecord(name, module_type, config.to_dict(), task, {}, dict(metadata or {})))
        self._refresh_ids()
        return len(self.records) - 1

    def _install(self, key: str, mtype: type[ModuleType], config: ModuleConfig) -> list[str]:
        if mtype.level == "input":
            self.input_stacks[key] = mtype.make_stack(config, None, self.backbone)
            return ["<input>"]
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
            stack = mtype.make_stack(config, m.base, self.backbone)
            stack.to(device=m.base.weight.device)
            object.__setattr__(stack, "state", self.state)  # stacks may read inputs stashed by other sites
            object.__setattr__(stack, "site", site)
            m.stacks[key] = stack
            for extra in stack.stash_sources(site):
                self._ensure_wrapped(extra)
                self._stash_sites.add(extra)
        return sites

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
            mods = self._sites()
            for site in group.sites:
                if site == "<input>":
                    del self.input_stacks[group.key]
                else:
                    del mods[site].stacks[group.key]
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
        n_virtual = 0
        if r is not None and len(self.input_stacks):
            if not isinstance(r, Routing):
                raise MtpeftError("input-level modules (prompts) need per-example routing, not a per-layer router")
            embeds = self.model.get_input_embeddings()(input_ids)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            for key, stack in self.input_stacks.items():
                local = self._localize(key, r)
                if local is None:
                    continue
                embeds, attention_mask, position_ids, n = stack.extend(embeds, attention_mask, position_ids, local)
                n_virtual += n
            if n_virtual and r.per_token:
                self.state.routing, self.state.local = r.pad_tokens(n_virtual), {}
            kwargs = dict(kwargs, inputs_embeds=embeds, position_ids=position_ids)
            input_ids = None
        body = self.model.get_decoder() if self.family == "causal" else self.model
        try:
            out = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            if n_virtual and r.per_token:
                self.state.routing, self.state.local = r, {}
        return BankOutput(out.last_hidden_state, attention_mask, n_virtual)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_head(self) -> nn.Module:
        """The causal LM's output projection (hidden states -> vocabulary logits)."""
        return self.model.get_output_embeddings()

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path, only: list[str] | None = None) -> None:
        """Write ``manifest.json`` plus one safetensors file per module, each atomically."""
        path = Path(path)
        (path / "modules").mkdir(parents=True, exist_ok=True)
        entries = []
        for rec in self.records:
            rel = f"modules/{rec.name}.safetensors"
            f = path / rel
            if only is None or rec.name in only or not f.exists():
                write_tensors(f, {k: v.detach() for k, v in self.module_parameters(rec.name).items()},
                              metadata={"module": rec.name, "type": rec.type})
            entries.append(dict(rec.__dict__, file=rel, sha256=_sha256(f)))
        keep = {Path(e["file"]).name for e in entries}
        manifest = {"format": "mtpeft-bank", "schema_version": SCHEMA_VERSION,
                    "backbone": self.backbone.fingerprint(), "modules": entries}
        write_json(path / MANIFEST, manifest)
        for stale in (path / "modules").glob("*.safetensors"):
            if stale.name not in keep:
                stale.unlink()

    @classmethod
    def load(cls, path: str | Path, backbone, trainable: bool = False) -> "ModuleBank":
        path = Path(path)
        manifest = read_manifest(path)
        fp = manifest["backbone"]
        if not backbone.fingerprint_matches(fp):
            raise MtpeftError(f"bank {path} was built on another backbone: "
                              f"{backbone.describe_mismatch(fp, backbone.fingerprint())}; load it with the "
                              f"backbone it was trained on ({fp.get('name')!r})")
        bank = cls(backbone)
        for e in manifest["modules"]:
            f = path / e["file"]
            if not f.is_file():
                raise MtpeftError(f"bank {path}: weights of module {e['name']!r} are missing ({f}); "
                                  "restore the file or remove the module from manifest.json")
            if e.get("sha256") and _sha256(f) != e["sha256"]:
                raise MtpeftError(f"bank {path}: weights of module {e['name']!r} are corrupted "
                                  f"(checksum mismatch in {f}); restore the file or retrain the module")
            tensors = read_tensors(f, what=f"weights of module {e['name']!r}")
            bank.add(e["name"], e["type"], e["config"], task=e.get("task"), metadata=e.get("metadata"),
                     trainable=trainable)
            bank.records[-1].metrics = dict(e.get("metrics") or {})
            params = bank.module_parameters(e["name"])
            if set(params) != set(tensors):
                raise MtpeftError(f"bank {path}: weights of module {e['name']!r} do not fit its config "
                                  f"(missing {sorted(set(params) - set(tensors))[:3]}, "
                                  f"unexpected {sorted(set(tensors) - set(params))[:3]})")
            with torch.no_grad():
                for k, p in params.items():
                    if p.shape != tensors[k].shape:
                        raise MtpeftError(f"bank {path}: {e['name']}/{k} has shape {tuple(tensors[k].shape)}, "
                                          f"expected {tuple(p.shape)}")
                    p.copy_(tensors[k])
            group, _ = bank._group_of(e["name"])
            for _, stack in bank.stacks_of(group):
                stack.invalidate()
            if e.get("merged"):
                bank.merge(e["name"])
        return bank


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise MtpeftError(f"bank directory not found: {path}")
    m = read_json(path / MANIFEST, what="bank manifest")
    if not isinstance(m, dict) or m.get("format") != "mtpeft-bank":
        raise MtpeftError(f"{path / MANIFEST} is not an mtpeft bank manifest")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise MtpeftError(f"bank {path} has schema version {m.get('schema_version')!r}; this mtpeft reads "
                          f"version {SCHEMA_VERSION}: upgrade mtpeft or re-create the bank")
    if not isinstance(m.get("modules"), list) or not isinstance(m.get("backbone"), dict):
        raise MtpeftError(f"{path / MANIFEST} lacks 'modules' or 'backbone'; re-create the bank")
    for e in m["modules"]:
        missing = {"name", "type", "config", "file"} - set(e)
        if missing:
            raise MtpeftError(f"{path / MANIFEST}: a module entry lacks {sorted(missing)}")
        if e["type"] not in MODULE_TYPES:
            raise MtpeftError(f"bank {path}: module {e['name']!r} has unknown type {e['type']!r}; "
                              f"known types: {', '.join(MODULE_TYPES.names())}")
    return m


def _is_head(name: str, family: str) -> bool:
    return name in ("lm_head", "pooler.dense") or name.endswith(".lm_head")


__all__ = ["ModuleBank", "ModuleRecord", "BankOutput", "BankedLinear", "read_manifest", "LinearStack"]
