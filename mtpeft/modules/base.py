"""What every task-module type shares: its config, its per-site stack of expert weights, its registry.

A *module type* (LoRA, (IA)3, prompt, ...) is a class registered in ``MODULE_TYPES`` by name with
its config dataclass. At each site it acts on (a linear layer, the input embeddings, the attention),
the bank keeps one ``Stack`` per group of same-type modules: the experts' weights side by side, so
routing weights over them are applied in one batched computation.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from ..registry import Registry
from ..routing import LocalRouting

MODULE_TYPES: Registry[type[ModuleType]] = Registry("module type")


@dataclass
class ModuleConfig:
    """Fields every module type has. Subclasses add their own, each with help text."""

    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Linear layers to act on: names matched against the end of each module path "
                  "(e.g. 'query'), or regular expressions prefixed 're:'. None: the type's default for the family."},
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.target_modules is not None and not isinstance(self.target_modules, (list, tuple)):
            raise MtpeftError("target_modules must be a list of layer names, e.g. ['query', 'value']")
        for f in fields(self):  # layer-name lists (target_modules, feedforward_modules): names or valid 're:' patterns
            v = getattr(self, f.name)
            if f.name.endswith("_modules") and isinstance(v, (list, tuple)):
                check_layer_patterns(f.name, v)
        for f in fields(self):  # sizes (r, n_tokens, ...): 2.5 or True would fail later, deep inside torch
            if f.type in (int, "int", "int | None"):
                v = getattr(self, f.name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise MtpeftError(f"{f.name} must be an integer, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModuleConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MtpeftError(
                f"unknown option(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(known)}"
            )
        return cls(**d)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def check_layer_patterns(field_name: str, patterns) -> None:
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise MtpeftError(f"{field_name} must hold layer names (strings), got {p!r}; e.g. ['query', 'value']")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except (re.error, RecursionError, OverflowError) as e:
                raise MtpeftError(f"{field_name}: {p!r} is not a valid regular expression ({e})") from None


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise MtpeftError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_positive(**kw) -> None:
    for k, v in kw.items():
        _check_positive(k, v)


def match_targets(names: list[str], patterns: list[str]) -> list[str]:
    """Module paths that one of ``patterns`` names (suffix match, or regex with 're:')."""
    out = []
    for n in names:
        for p in patterns:
            if p.startswith("re:"):
                if re.search(p[3:], n):
                    out.append(n)
                    break
            elif n == p or n.endswith("." + p):
                out.append(n)
                break
    return out


class Stack(nn.Module):
    """The weights of one group of same-type experts at one site, one entry per expert.

    Experts are kept as separate parameters so each can be trained or frozen on its own; the
    stacked tensor ``[E, ...]`` the batched kernels use is built on demand and cached while no
    expert is trainable (inference).
    """

    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModuleConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList()
        self._cache: dict[str, Tensor] = {}

    # ---- per-expert parameters -------------------------------------------------------------
    def new_expert(self, generator: torch.Generator | None) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_expert(self, generator: torch.Generator | None = None) -> None:
        ref = next(iter(self.parameters()), None) if len(self.experts) else None
        e = self.new_expert(generator)
        if ref is not None:
            e.to(device=ref.device)
        self.experts.append(e)
        self.invalidate()

    def remove_expert(self, i: int) -> None:
        del self.experts[i]
        self.invalidate()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def invalidate(self) -> None:
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half() make cached stacks stale
        self.invalidate()
        return super()._apply(fn, *args, **kwargs)

    def _any_trainable(self) -> bool:
        return any(p.requires_grad for p in self.experts.parameters())

    def stacked(self, name: str) -> Tensor:
        """``[E, ...]``: parameter ``name`` of every expert, side by side."""
        if self._any_trainable():
            return torch.stack([getattr(e, name) for e in self.experts])
        t = self._cache.get(name)
        if t is None:
            t = torch.stack([getattr(e, name).detach() for e in self.experts])
            self._cache[name] = t
        return t

    def gather(self, name: str, idx: Tensor) -> Tensor:
        """``[*idx.shape, ...]``: parameter ``name`` of the experts ``idx``.

        While training, only the experts actually selected are stacked, so a step that routes to
        the one trainable expert does not copy the whole bank.
        """
        if not self._any_trainable():
            return self.stacked(name)[idx]
        uniq, inv = torch.unique(idx, return_inverse=True)
        sel = torch.stack([getattr(self.experts[int(i)], name) for i in uniq.tolist()])
        return sel[inv]

    def expert_state(self, i: int) -> dict[str, Tensor]:
        return {n: getattr(self.experts[i], n) for n in self.param_names}


class LinearStack(Stack):
    """A stack acting on one ``nn.Linear`` (its input ``x`` and its output ``y``).

    Subclasses give the three computations the router dispatch needs; ``forward`` dispatches.
    """

    def __init__(self, config: ModuleConfig, base: nn.Linear):
        super().__init__(config)
        self.d_in = base.in_features
        self.d_out = base.out_features

    # The three computations, for the experts of this stack:
    def per_example(self, x: Tensor, idx: Tensor, w: Tensor, mix: str) -> Tensor:
        """x [B,T,d_in], idx/w [B,K] -> delta [B,T,d_out]."""
        raise NotImplementedError

    def dense_tokens(self, x: Tensor, w: Tensor) -> Tensor:
        """x [N,d_in], w [N,E] (dense over all experts) -> delta [N,d_out]."""
        raise NotImplementedError

    def grouped(self, x: Tensor, used: Tensor) -> Tensor:
        """x [U,C,d_in], tokens grouped by expert ``used`` [U] -> unweighted outputs [U,C,d_out]."""
        raise NotImplementedError

    def stash_sources(self, site: str) -> list[str]:
        """Other linear sites whose input this stack reads (from ``self.state.stash[site]``)."""
        return []

    def source(self, x: Tensor, y: Tensor) -> Tensor:
        """What the experts read: the layer input by default (sequential adapters read y)."""
        return x

    def combine(self, x: Tensor, y: Tensor, delta: Tensor) -> Tensor:
        return y + delta

    def forward(self, x: Tensor, y: Tensor, local: LocalRouting) -> Tensor:
        from ..kernels import routed_delta

        return self.combine(x, y, routed_delta(self, self.source(x, y), local))

    # Merging into the base weight, for types that allow it.
    def delta_weight(self, i: int) -> Tensor:
        raise MtpeftError(f"{type(self).__name__} cannot be merged into the base weights")


class ModuleType:
    """A registered task-module type. Subclasses set the class attributes and ``make_stack``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[ModuleConfig]] = ModuleConfig
    level: ClassVar[str] = "linear"  # "linear": acts on nn.Linear sites; "input": on the input embeddings
    mergeable: ClassVar[bool] = False  # can be folded into the base weights (bank.merge)
    # A freshly added module leaves the backbone's outputs unchanged (e.g. LoRA's B = 0, (IA)3's ones);
    # False where the method changes outputs by design from the start (prompts, prefixes).
    identity_at_init: ClassVar[bool] = False
    default_targets: ClassVar[dict[str, list[str]]] = {}

    @classmethod
    def targets(cls, family: str, config: ModuleConfig) -> list[str]:
        if config.target_modules:
            return list(config.target_modules)
        if family not in cls.default_targets:
            raise MtpeftError(f"module type {cls.name!r} has no default targets for the {family} family; "
                              "give target_modules")
        return cls.default_targets[family]

    @classmethod
    def make_stack(cls, config: ModuleConfig, site: nn.Module, backbone) -> Stack:  # pragma: no cover
        raise NotImplementedError


def register(name: str):
    """Class decorator: ``@register("lora")`` on a ModuleType subclass."""

    return MODULE_TYPES.register_class(name)
