"""Multitask prompt tuning (MPT, Wang et al., ICLR 2023): a shared prompt times low-rank task factors.

Task ``k``'s prompt is ``P_k = P* * (u_k v_k)`` elementwise, with the shared prompt ``P*: [n, H]`` and the
task's factors ``u_k: [n, r]``, ``v_k: [r, H]`` (rank 1 by default). The virtual tokens are then prepended
like a prompt's (``VirtualTokenStack``: routed per example, mixed-task batches in one pass, unserved examples
masked out).

Where ``P*`` lives: it is a *group-level parameter* of the stack (``MPTStack.shared``), one per group, i.e. per
config (``n_tokens``, ``rank``, ``shared``: the name that tells several MPT families apart). A module holds
only its factors (``module_parameters``: ``<input>.u``, ``<input>.v``), so adding a task grows the bank by
``r (n + H)`` parameters. Being a parameter, ``P*`` moves with the bank, trains when asked
(``shared_prompt(bank, group).requires_grad_(True)``; frozen by default, so fitting one module never changes
the others) and is read by the forward. The bank saves it in its group's file (``artifacts/<group>...``, as
``param:shared``, see ``bank/persist.py``) and puts it back on load; it goes when the group's last module goes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from .base import ModuleConfig, ModuleType, check_positive, register
from .prompt import VirtualTokenStack, check_no_targets, embedding_std

_SHARED_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


@dataclass
class MPTConfig(ModuleConfig):
    n_tokens: int = field(default=20, metadata={"help": "number of virtual tokens prepended to the input"})
    rank: int = field(default=1, metadata={"help": "rank r of each task's factors u [n, r] and v [r, hidden]"})
    shared: str = field(default="mpt", metadata={
        "help": "name of the shared prompt P*: modules with the same n_tokens, rank and shared name use one P*"})
    init_std: float | None = field(
        default=None, metadata={"help": "standard deviation of P*'s random init; None: that of the word embeddings"})

    def validate(self):
        super().validate()
        check_no_targets(self, "MPT modules act on the input embeddings")
        check_positive(n_tokens=self.n_tokens, rank=self.rank)
        if not isinstance(self.shared, str) or not _SHARED_NAME.match(self.shared):
            raise MtpeftError(f"shared must be a short name (letters, digits, _ . -), got {self.shared!r}; "
                              "e.g. shared: mpt")
        if self.init_std is not None:
            check_positive(init_std=self.init_std)


class _Factors(nn.Module):
    """One task's factors: ``u [n, r]``, ``v [r, H]``."""

    def __init__(self, u: Tensor, v: Tensor):
        super().__init__()
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(v)


def ones_factors(n: int, rank: int, hidden: int, generator: torch.Generator | None = None,
                 noise: float = 0.0) -> tuple[Tensor, Tensor]:
    """Factors whose product is all ones (``P_k = P*``); ``noise`` > 0 perturbs ``u`` and ``v`` (rank > 1 needs
    it, or every rank-one component would get the same gradient and stay equal)."""
    u = torch.ones(n, rank)
    v = torch.full((rank, hidden), 1.0 / rank)
    if noise:
        u = u + noise * torch.randn(n, rank, generator=generator)
        v = v + noise / rank * torch.randn(rank, hidden, generator=generator)
    return u, v


class MPTStack(VirtualTokenStack):
    param_names = ("u", "v")
    group_param_names = ("shared",)

    def __init__(self, config: MPTConfig, backbone):
        hidden = backbone.model.get_input_embeddings().weight.shape[1]
        super().__init__(config, config.n_tokens, hidden)
        self.rank = config.rank
        self.init_std = config.init_std or embedding_std(backbone)
        # drawn when the group's first module is added (from that module's seed); frozen by default
        self.shared = nn.Parameter(torch.zeros(self.n_tokens, hidden), requires_grad=False)

    def new_expert(self, generator):
        u, v = ones_factors(self.n_tokens, self.rank, self.hidden, generator, 0.02 if self.rank > 1 else 0.0)
        return _Factors(u, v)

    def add_expert(self, generator: torch.Generator | None = None) -> None:
        if not len(self.experts) and self.shared.device.type != "meta":
            with torch.no_grad():
                self.shared.copy_(torch.randn(self.shared.shape, generator=generator) * self.init_std)
        super().add_expert(generator)

    def group_parameters(self) -> dict[str, nn.Parameter]:
        """The group's own parameters (saved once for the group): ``{"shared": P*}``."""
        return {"shared": self.shared}

    def _any_trainable(self) -> bool:
        return self.shared.requires_grad or super()._any_trainable()

    def prompts(self, u: Tensor, v: Tensor) -> Tensor:
        """``[..., n, H]``: ``P* * (u v)`` for factors ``u [..., n, r]``, ``v [..., r, H]``."""
        return self.shared * torch.matmul(u, v)

    def _all_tokens(self) -> Tensor:
        t = self._cache.get("tokens")
        if t is None:
            with torch.no_grad():
                t = self.prompts(self.stacked("u"), self.stacked("v"))
            self._cache["tokens"] = t
        return t

    def tokens_of(self, idx: Tensor) -> Tensor:
        """``[*idx.shape, n, H]``; while training only the experts selected are computed (a loop over the
        distinct experts of the batch, never over examples)."""
        if not self._any_trainable():
            return self._all_tokens()[idx]
        uniq, inv = torch.unique(idx, return_inverse=True)
        sel = [self.experts[i] for i in uniq.tolist()]
        u = torch.stack([e.u for e in sel])
        v = torch.stack([e.v for e in sel])
        return self.prompts(u, v)[inv]

    def prompt_of(self, j: int) -> Tensor:
        """``[n, H]``: expert ``j``'s prompt ``P_j``."""
        e = self.experts[j]
        return self.prompts(e.u, e.v)


@register("mpt")
class MultitaskPromptTuning(ModuleType):
    config_cls = MPTConfig
    level = "input"

    @classmethod
    def make_stack(cls, config, site, backbone):
        return MPTStack(config, backbone)


def mpt_stack(bank, which: str) -> MPTStack:
    """The MPT stack of module ``which`` (a name) or of group ``which`` (a key)."""
    group = bank.groups.get(which) or bank.group_of(which)
    if group.mtype is not MultitaskPromptTuning:
        raise MtpeftError(f"{which!r} is of type {group.mtype.name!r}, not an MPT module (type 'mpt')")
    return bank.input_stacks[group.key]


def shared_prompt(bank, which: str) -> nn.Parameter:
    """``P*`` of the MPT group of module ``which`` (or of group key ``which``)."""
    return mpt_stack(bank, which).shared
