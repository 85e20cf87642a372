"""What both scorers share: per-example tasks, the bare-backbone scope, small caches, local columns."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .labels import LabelSpace

# The prompt suffix when no task is given (a label space alone): Task's default.
DEFAULT_SUFFIX = "\nAnswer:"


def as_list(tasks, n: int) -> list | None:
    """One task per example: a list/tuple of ``n`` tasks, one task for all, or ``None`` (no task)."""
    if tasks is None:
        return None
    if isinstance(tasks, (list, tuple)):
        if len(tasks) != n:
            raise MtpeftError(f"got {len(tasks)} tasks for {n} texts; give one task per text, or one task for all")
        return list(tasks)
    return [tasks] * n


def distinct(tasks: list) -> tuple[list, Tensor]:
    """The distinct tasks of a batch, in first-seen order, and each example's index among them ``[B]``."""
    uniq = list({id(t): t for t in tasks}.values())
    pos = {id(t): i for i, t in enumerate(uniq)}
    return uniq, torch.tensor([pos[id(t)] for t in tasks], dtype=torch.long)


def inputs(tasks: list | None, texts: Sequence[str]) -> list[str]:
    """Each example's input through its task's template (the raw text without a task)."""
    if tasks is None:
        return list(texts)
    return [t.format_input(s) for t, s in zip(tasks, texts)]


def suffixes(tasks: list | None, n: int) -> list[str]:
    return [DEFAULT_SUFFIX] * n if tasks is None else [t.prompt_suffix for t in tasks]


def need_tasks(tasks, labels) -> None:
    if tasks is None and labels is None:
        raise MtpeftError("the scorer needs the examples' tasks (one per text, or one for all) or a label space "
                          "(labels=LabelSpace...) to score against")


def bare(bank):
    """The scope in which no module acts, merged ones included (``bank.bare()``); banks without it fall
    back to ``bank.disabled()`` (merged modules then stay in the weights)."""
    return bank.bare() if hasattr(bank, "bare") else bank.disabled()


def to_local(full: Tensor, space: LabelSpace, tasks: list) -> Tensor:
    """``[B, len(space)]`` logits -> ``[B, L_max]`` in each example's task's local label order, ``-inf`` in
    the slots a task does not have."""
    uniq, which = distinct(tasks)
    L = max(t.num_labels for t in uniq)
    local = torch.zeros(len(uniq), L, dtype=torch.long)
    valid = torch.zeros(len(uniq), L, dtype=torch.bool)
    for u, t in enumerate(uniq):  # one row per distinct task, not per example
        local[u, : t.num_labels] = space.ids_of(t)
        valid[u, : t.num_labels] = True
    dev = full.device
    which = which.to(dev)
    return full.gather(1, local.to(dev)[which]).masked_fill(~valid.to(dev)[which], float("-inf"))


def pack_candidates(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each example's candidate ids first: ``order [B, K]`` (ascending ids; slots past an example's own
    candidates hold distinct non-candidates) and ``valid [B, K]``, ``K`` the largest candidate count."""
    count = mask.sum(1)
    K = int(count.max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=mask.device)[None, :] < count[:, None]
    return order, valid


class LRU(OrderedDict):
    """A small least-recently-used cache (stale keys, e.g. of an older bank version, age out)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


def routed(bank, routing, texts: Sequence[str], tasks: list | None, ctx: RouteContext | None = None):
    """The scope a scorer runs its forwards in: ``routing`` None is the caller's scope; a router gets ``ctx``,
    by default the batch's raw texts and task names (so task-id and text-aware routers work through a scorer)."""
    if routing is None:
        return contextlib.nullcontext()
    if isinstance(routing, Routing):
        return bank.route(routing)
    if ctx is None:
        names = None if tasks is None else [t.name for t in tasks]
        ctx = RouteContext.for_tasks(names, texts=list(texts)) if names else RouteContext(texts=list(texts))
    return bank.route(routing, ctx)
