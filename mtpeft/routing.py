"""Routing weights over a bank's modules: the one currency between routers and the bank.

A ``Routing`` says, for each example (``[B, K]``) or each token (``[B, T, K]``), which modules
serve it and with what weight. ``indices`` names the modules (global ids in the bank); when it is
``None`` the weights are dense over the whole bank (``K == E``). ``mix`` chooses between mixing
the modules' outputs (a mixture of experts) and mixing their parameters (Poly/MHR, LoraHub).

Factored routing (``rows``, with ``mix='params'``): ``weights`` holds one row per distinct task (``[G, K]``, or
``[G, n_splits, K]`` for multi-head routing, each block of the layer's width with its own mixture) and ``rows``
``[B]`` names each example's row, so the modules' parameters are mixed once per row, not once per example.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .io import MtpeftError

MIX_MODES = ("output", "params")


@dataclass
class Routing:
    weights: Tensor
    indices: Tensor | None = None
    mix: str = "output"
    rows: Tensor | None = None  # [B]: each example's row of weights (factored routing, mix='params' only)

    def __post_init__(self):
        if self.rows is not None:
            self._check_rows()
        if self.weights.dim() not in (2, 3):
            raise MtpeftError(
                f"routing weights must be [batch, K] (per example) or [batch, tokens, K] (per token), "
                f"got shape {tuple(self.weights.shape)}"
            )
        if self.indices is not None:
            if self.indices.shape != self.weights.shape:
                raise MtpeftError(
                    f"routing indices {tuple(self.indices.shape)} and weights {tuple(self.weights.shape)} "
                    "must have the same shape"
                )
            if self.indices.dtype not in (torch.int64, torch.int32):
                raise MtpeftError("routing indices must be an integer tensor of module ids")
        if self.mix not in MIX_MODES:
            raise MtpeftError(f"routing mix must be one of {MIX_MODES}, got {self.mix!r}")
        if self.mix == "params" and self.weights.dim() == 3 and self.rows is None:
            raise MtpeftError("mix='params' works per example or per task; use mix='output' for per-token routing")

    def _check_rows(self) -> None:
        if self.mix != "params":
            raise MtpeftError("routing rows (one row of weights per distinct task) need mix='params'")
        if self.rows.dim() != 1 or self.rows.dtype not in (torch.int64, torch.int32):
            raise MtpeftError(f"routing rows must be a 1-D integer tensor [batch], got {tuple(self.rows.shape)} "
                              f"{self.rows.dtype}")
        if self.rows.numel() and (int(self.rows.min()) < 0 or int(self.rows.max()) >= self.weights.shape[0]):
            raise MtpeftError(f"routing rows must index the {self.weights.shape[0]} rows of the weights")

    @property
    def per_token(self) -> bool:
        return self.weights.dim() == 3 and self.rows is None

    @property
    def splits(self) -> int:
        """Blocks of the layer's width, each with its own mixture (multi-head routing); 1 otherwise."""
        return self.weights.shape[1] if self.rows is not None and self.weights.dim() == 3 else 1

    @property
    def batch_size(self) -> int:
        return self.weights.shape[0] if self.rows is None else self.rows.shape[0]

    def per_example(self) -> Routing:
        """The same routing with one row per example (factored rows gathered; multi-head splits averaged,
        which is what a consumer that cannot split sees: for reports only)."""
        if self.rows is None:
            return self
        w, idx = self.weights[self.rows], None if self.indices is None else self.indices[self.rows]
        if w.dim() == 3:
            if idx is not None and not bool((idx == idx[:, :1]).all()):
                raise MtpeftError("per-split routing over different modules per split has no per-example form")
            w, idx = w.mean(1), None if idx is None else idx[:, 0]
        return Routing(w, idx, self.mix)

    @classmethod
    def one_hot(cls, ids: Tensor | list[int], dtype=torch.float32) -> Routing:
        """Each example served by exactly one module (task-id routing)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1, 1)
        return cls(weights=torch.ones(ids.shape, dtype=dtype), indices=ids)

    @classmethod
    def topk(cls, logits: Tensor, k: int, softmax: bool = True) -> Routing:
        """Keep the k largest logits over the last dimension; softmax over the kept ones."""
        k = min(k, logits.shape[-1])
        vals, idx = logits.topk(k, dim=-1)
        w = vals.softmax(-1) if softmax else vals
        return cls(weights=w, indices=idx)

    def repeat_interleave(self, n: int) -> Routing:
        """Repeat every example's routing n times (one row per candidate label in rank scoring)."""
        return self.index_select(torch.arange(self.batch_size).repeat_interleave(n))

    def index_select(self, examples: Tensor) -> Routing:
        """The routing of a batch whose row ``i`` is example ``examples[i]`` of this one (repeats allowed)."""
        if self.rows is not None:  # only the examples are picked, not the rows of weights
            return Routing(self.weights, self.indices, self.mix, self.rows[examples.to(self.rows.device)])
        ex = examples.to(self.weights.device)
        idx = None if self.indices is None else self.indices.index_select(0, ex.to(self.indices.device))
        return Routing(self.weights.index_select(0, ex), idx, self.mix)

    def to(self, device) -> Routing:
        idx = None if self.indices is None else self.indices.to(device)
        rows = None if self.rows is None else self.rows.to(device)
        return Routing(self.weights.to(device), idx, self.mix, rows)

    def pad_tokens(self, n_before: int) -> Routing:
        """Per-token routing: give n_before prepended (virtual) positions the first real token's routing."""
        if not self.per_token or n_before == 0:
            return self
        w = torch.cat([self.weights[:, :1].expand(-1, n_before, -1), self.weights], dim=1)
        idx = None
        if self.indices is not None:
            idx = torch.cat([self.indices[:, :1].expand(-1, n_before, -1), self.indices], dim=1)
        return Routing(w, idx, self.mix)


# A bare function evaluated at each site: (site name, the layer's input hidden states) -> Routing | None.
# Routers (mtpeft.routers) are the general form; the bank wraps a function in ``SiteFn``.
RoutingFn = Callable[[str, Tensor], "Routing | None"]
RoutingLike = Routing | RoutingFn


class SiteFn:
    """A per-site router from a plain function ``fn(site, x) -> Routing | None`` (no context, no state)."""

    per_site = True

    def __init__(self, fn: RoutingFn):
        self.fn = fn

    def at_site(self, site: str, x: Tensor, ctx) -> Routing | None:
        return self.fn(site, x)


@dataclass
class RouteContext:
    """What a router may read about the batch, passed with the forward (never global state).

    ``attention_mask`` ``[B, T]``: the real tokens of the first forward in scope (virtual prompt tokens
    not included; see ``token_mask``). ``task_ids`` ``[B]``: each example's task as an index into
    ``task_names`` (None where the task is unknown, as in zero-shot routing). ``texts``: the raw inputs.
    ``pooled()``: the frozen backbone's mean-pooled embedding ``[B, H]``, computed once per batch on demand.
    ``continuation``: the forwards in scope continue a key/value cache (label tokens after the prompts; see
    ``index_select``), so ``attention_mask`` describes the prompts, not a site's input.
    """

    attention_mask: Tensor | None = None
    task_ids: Tensor | None = None
    task_names: Sequence[str] | None = None
    texts: Sequence[str] | None = None
    input_ids: Tensor | None = None
    embed_fn: Callable[[], Tensor] | None = field(default=None, repr=False)
    continuation: bool = False
    _pooled: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.task_ids is not None:
            self.task_ids = torch.as_tensor(self.task_ids, dtype=torch.long).reshape(-1)
            if self.task_names is None:
                raise MtpeftError("RouteContext: task_ids index task_names; give task_names too")
            if self.task_ids.numel() and (int(self.task_ids.min()) < 0 or int(self.task_ids.max()) >= len(self.task_names)):
                raise MtpeftError(f"RouteContext: task_ids must index the {len(self.task_names)} task_names")

    @classmethod
    def for_tasks(cls, tasks: Sequence[str], **kw) -> RouteContext:
        """A context whose task ids come from per-example task names (the distinct names form ``task_names``)."""
        names = list(dict.fromkeys(tasks))
        pos = {n: i for i, n in enumerate(names)}
        return cls(task_ids=torch.tensor([pos[t] for t in tasks], dtype=torch.long), task_names=names, **kw)

    @property
    def batch_size(self) -> int | None:
        for t in (self.attention_mask, self.task_ids, self.input_ids):
            if t is not None:
                return t.shape[0]
        return len(self.texts) if self.texts is not None else None

    def bind(self, input_ids: Tensor, attention_mask: Tensor, embed_fn: Callable[[], Tensor]) -> None:
        """Fill in what the bank knows at the first forward in scope (what the caller gave is kept)."""
        if self.input_ids is None:
            self.input_ids = input_ids
        if self.attention_mask is None and attention_mask.dim() == 2:
            self.attention_mask = attention_mask
        if self.embed_fn is None:
            self.embed_fn = embed_fn

    def index_select(self, examples: Tensor) -> RouteContext:
        """The context of a cache continuation whose row ``i`` continues example ``examples[i]`` (repeats allowed):
        every per-example field picked, the pooled embedding taken from this context's."""
        def pick(t):
            return None if t is None else t.index_select(0, examples.to(t.device))

        ex = examples.tolist()
        texts = None if self.texts is None else [self.texts[i] for i in ex]
        return RouteContext(pick(self.attention_mask), pick(self.task_ids), self.task_names, texts,
                            pick(self.input_ids), lambda: pick(self.pooled()), continuation=True)

    def pooled(self) -> Tensor:
        if self._pooled is None:
            if self.embed_fn is None:
                raise MtpeftError("RouteContext.pooled(): no inputs to embed yet; route through bank(...) or "
                                  "bank.route(router, ctx), which bind the batch")
            self._pooled = self.embed_fn()
        return self._pooled

    def token_mask(self, x: Tensor) -> Tensor | None:
        """The mask ``[B, T]`` of a site's input ``x`` ``[B, T, d]``: virtual (prompt) positions before the
        real tokens count as real. None when unknown (a continuation of a key/value cache)."""
        m = self.attention_mask
        if m is None or self.continuation or x.dim() != 3 or x.shape[1] < m.shape[1]:
            return None
        n = x.shape[1] - m.shape[1]
        return m if n == 0 else torch.cat([m.new_ones(m.shape[0], n), m], dim=1)


@dataclass
class LocalRouting:
    """Routing restricted to one group of stacked modules: ids are positions in the group's stack."""

    weights: Tensor  # [B, K] or [B, T, K]; factored: [G, K] or [G, n_splits, K]
    indices: Tensor  # same shape, local ids (entries with weight 0 may hold any valid id)
    mix: str
    num_experts: int
    rows: Tensor | None = None  # factored routing: [B], each example's row of weights

    @property
    def per_token(self) -> bool:
        return self.weights.dim() == 3 and self.rows is None

    @functools.cached_property
    def single_expert(self) -> int | None:
        """The one expert every example goes to wholly (weight 1), as in task-id training; else None.
        Worked out once per forward and group (the bank caches its LocalRouting), read at every site."""
        if self.per_token or self.weights.shape[-1] != 1 or self.weights.shape[0] == 0:
            return None
        idx = self.indices.reshape(-1)  # K == 1: one id per row (per split)
        if not bool((self.weights == 1).all()) or not bool((idx == idx[0]).all()):
            return None
        return int(idx[0])


def check_routing(routing: Routing, num_modules: int) -> None:
    """The module ids (or dense width) of ``routing`` fit a bank of ``num_modules`` (checked once per routing,
    not once per group)."""
    if routing.indices is None:
        if routing.weights.shape[-1] != num_modules:
            raise MtpeftError(
                f"dense routing weights have {routing.weights.shape[-1]} columns but the bank has "
                f"{num_modules} modules; pass one weight per module or give indices"
            )
    elif routing.indices.numel() and bool(((routing.indices < 0) | (routing.indices >= num_modules)).any()):
        raise MtpeftError(f"routing names a module id outside 0..{num_modules - 1}")


def localize(routing: Routing, global_ids: Tensor, num_modules: int, check: bool = True) -> LocalRouting | None:
    """Restrict ``routing`` to the modules ``global_ids`` (one group's stack). None if none is used.
    ``check=False``: the caller already ran ``check_routing``."""
    if check:
        check_routing(routing, num_modules)
    n_local = global_ids.numel()
    if routing.indices is None:
        w = routing.weights.index_select(-1, global_ids.to(routing.weights.device))
        if not bool((w != 0).any()):
            return None
        idx = torch.arange(n_local, device=w.device).expand_as(w)
        return LocalRouting(w, idx, routing.mix, n_local, routing.rows)
    lookup = torch.full((num_modules,), -1, dtype=torch.long, device=routing.indices.device)
    lookup[global_ids.to(lookup.device)] = torch.arange(n_local, device=lookup.device)
    local = lookup[routing.indices.long()]
    inside = local >= 0
    if not bool(inside.any()):
        return None
    w = torch.where(inside, routing.weights, torch.zeros((), dtype=routing.weights.dtype, device=inside.device))
    return LocalRouting(w, local.clamp_min(0), routing.mix, n_local, routing.rows)
