"""``ReplayMemory``: examples keyed by frozen-backbone sentence embeddings, bounded, searchable, saved."""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import MtpeftError
from .example import Example, make_examples
from .index import DEFAULT_EXACT_LIMIT, IVFConfig, VectorIndex
from .policies import REJECT, RowSet, StoragePolicy, View, make_policy


def as_matrix(x, dim: int | None, what: str) -> Tensor:
    """``x`` as a float32 CPU tensor ``[n, dim]`` with finite values, or a clear error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise MtpeftError(f"{what} must be a float tensor [n, hidden size], got "
                          f"{tuple(x.shape) if hasattr(x, 'shape') else type(x).__name__} "
                          f"{getattr(x, 'dtype', '')}; embed the texts first (mtpeft.memory.embed_texts)")
    if dim is not None and x.shape[1] != dim:
        raise MtpeftError(f"{what} have {x.shape[1]} dimensions, the memory holds {dim}-dimensional keys; embed "
                          "with the backbone the memory was built with")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        x = x.to("cpu", torch.float32).contiguous()
    x = x.detach()
    if not np.isfinite(x.numpy()).all():  # numpy: fewer dispatches than torch on a search's small input
        raise MtpeftError(f"{what} contain NaN or infinite values; check the backbone's outputs")
    return x


class ReplayMemory:
    """Examples (text, label id, task, label-space id) keyed by embeddings ``[n, dim]`` (normalised ones
    make inner product the cosine), at most ``capacity`` of them, kept by ``policy`` (``"reservoir"``,
    ``"task-balanced"``, ``"class-balanced"`` or a :class:`StoragePolicy`). Every added example gets an
    int64 id that stays its own until it is evicted and is never given again. Searches run exactly below
    ``exact_limit`` stored examples and through a FAISS IVF index from there on, whose ``nprobe`` is
    calibrated to a target recall against exact search (``ivf``: :class:`IVFConfig`; see ``index.py``;
    ``stats()`` reports the measured recall).
    Everything random (policy, sampling) comes from ``seed`` and is saved, so a reloaded memory goes on
    exactly as the original would have."""

    def __init__(self, dim: int, capacity: int, policy: str | StoragePolicy = "reservoir", *, seed: int = 0,
                 exact_limit: int = DEFAULT_EXACT_LIMIT, ivf: IVFConfig | None = None):
        for name, v, lo in (("dim", dim, 1), ("capacity", capacity, 1), ("exact_limit", exact_limit, 1),
                            ("seed", seed, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise MtpeftError(f"ReplayMemory: {name} must be an integer >= {lo}, got {v!r}")
        self.dim, self.capacity, self.seed = dim, capacity, seed
        self.policy = make_policy(policy)
        self.index = VectorIndex(dim, exact_limit, ivf)
        self.next_id = 0
        self._ids: list[int] = []
        self._examples: list[Example] = []
        self._row: dict[int, int] = {}
        self._groups: dict = {}
        self._policy_rng = random.Random(seed)
        self._sample_rng = random.Random(seed + 1)

    # ---- contents ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: int) -> bool:
        return int(id_) in self._row

    @property
    def ids(self) -> Tensor:
        """The stored ids, in row order."""
        return torch.tensor(self._ids, dtype=torch.int64)

    def _rows(self, ids) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        try:
            return [self._row[int(i)] for i in ids]
        except KeyError as e:
            raise MtpeftError(f"id {e.args[0]} is not in the memory (evicted, removed or never given); use ids "
                              "returned by add/search/sample, and drop -1 (no result) before get") from None

    def get(self, ids) -> list[Example]:
        """The examples of ``ids`` (a sequence or 1-d tensor), in that order."""
        return [self._examples[r] for r in self._rows(ids)]

    def embeddings(self, ids) -> Tensor:
        return self.index.embeddings[torch.tensor(self._rows(ids), dtype=torch.int64)]

    def counts(self, by: str = "task") -> dict:
        """How many stored examples per task (``by="task"``) or per (label space, label) (``by="class"``)."""
        if by not in ("task", "class"):
            raise MtpeftError(f"counts(by={by!r}): use 'task' or 'class'")
        out: dict = {}
        for e in self._examples:
            k = e.task if by == "task" else (e.space, e.label)
            out[k] = out.get(k, 0) + 1
        return out

    # ---- adding ------------------------------------------------------------------------------------
    def add(self, embeddings, texts: Sequence[str], labels, tasks, spaces=None) -> Tensor:
        """Offer examples (in order) to the policy. Returns each one's id, ``-1`` where the policy did not
        keep it (rejected, or evicted again by a later example of the same call)."""
        examples = make_examples(texts, labels, tasks, spaces)
        emb = as_matrix(embeddings, self.dim, "memory.add: the embeddings")
        self.index.check(emb, "memory.add: the embeddings")
        if emb.shape[0] != len(examples):
            raise MtpeftError(f"memory.add got {emb.shape[0]} embeddings for {len(examples)} examples; give one "
                              "embedding row per example")
        prepare = getattr(self.policy, "prepare", None)
        if prepare is None:
            return self._offer(emb, examples)
        # a batch policy (k-means): it may shrink what is stored and picks which offered examples to place
        keep = prepare(self, emb, examples, self._policy_rng)
        out = torch.full((len(examples),), -1, dtype=torch.int64)
        if len(keep):
            out[keep] = self._offer(emb[keep], [examples[int(i)] for i in keep])
        return out

    def _offer(self, emb: Tensor, examples: list[Example]) -> Tensor:
        out = torch.full((len(examples),), -1, dtype=torch.int64)
        writes: dict[int, int] = {}  # row -> index in this call of the example that ends there
        fresh: dict[int, int] = {}  # id given in this call -> its index in the call
        gone: list[int] = []
        view = View(len(self), self.capacity, self._groups)
        for i, ex in enumerate(examples):
            view.size = len(self)
            row = self.policy.place(view, ex, self._policy_rng)
            if row == REJECT:
                continue
            if not 0 <= row <= len(self) or (row == len(self) and len(self) >= self.capacity):
                raise MtpeftError(f"memory policy {self.policy.name!r} placed an example at row {row} of a memory "
                                  f"holding {len(self)} of {self.capacity}; a policy returns a row < size, size "
                                  "while there is room, or REJECT")
            if row < len(self):
                old = self._evict_row(row)
                if old in fresh:
                    out[fresh.pop(old)] = -1
                else:
                    gone.append(old)
            self._put_row(row, self.next_id, ex)
            fresh[self.next_id], out[i], writes[row] = i, self.next_id, i
            self.next_id += 1
        if writes:
            rows = torch.tensor(list(writes), dtype=torch.int64)
            src = torch.tensor(list(writes.values()), dtype=torch.int64)
            self.index.write(rows, out[src], emb[src], gone)
        elif gone:
            raise AssertionError("evictions without writes")  # every eviction is a replacement
        return out

    def _evict_row(self, row: int) -> int:
        old = self._ids[row]
        del self._row[old]
        key = self.policy.key(self._examples[row])
        if key is not None:
            self._groups[key].remove(row)
            if not len(self._groups[key]):
                del self._groups[key]
        return old

    def _put_row(self, row: int, id_: int, ex: Example) -> None:
        if row == len(self._ids):
            self._ids.append(id_)
            self._examples.append(ex)
        else:
            self._ids[row], self._examples[row] = id_, ex
        self._row[id_] = row
        key = self.policy.key(ex)
        if key is not None:
            self._groups.setdefault(key, RowSet()).add(row)

    def remove(self, ids) -> None:
        """Drop these examples (their ids are not given again)."""
        doomed = set(self._rows(ids))
        mask = torch.ones(len(self), dtype=torch.bool)
        mask[list(doomed)] = False
        self.index.keep(mask)
        keep = [r for r in range(len(self)) if r not in doomed]
        self._restore([self._ids[r] for r in keep], [self._examples[r] for r in keep])

    def _restore(self, ids: list[int], examples: list[Example]) -> None:
        self._ids, self._examples = ids, examples
        self._row = {i: r for r, i in enumerate(ids)}
        self._groups = {}
        for r, e in enumerate(examples):
            key = self.policy.key(e)
            if key is not None:
                self._groups.setdefault(key, RowSet()).add(r)

    # ---- retrieval ---------------------------------------------------------------------------------
    def search(self, queries, k: int, exact: bool | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` stored examples with the largest inner product with each query: ``(scores [m, k],
        ids [m, k])``, best first, ``-inf`` / ``-1`` past what exists. ``exact``: None picks by size."""
        if not isinstance(k, int) or k < 1:
            raise MtpeftError(f"search: k must be an integer >= 1, got {k!r}")
        return self.index.search(as_matrix(queries, self.dim, "search: the queries"), k, exact)

    def nearest_to_batch(self, queries, n: int, exact: bool | None = None) -> Tensor:
        """Up to ``n`` distinct ids nearest to a batch of queries (each id ranked by its best score over the
        batch), for replay that rehearses what resembles the current batch."""
        q = as_matrix(queries, self.dim, "nearest_to_batch: the queries")
        if n < 1 or not len(self) or not len(q):
            return torch.empty(0, dtype=torch.int64)
        k = min(len(self), n)  # one query alone then yields n distinct ids: enough even for a uniform batch
        scores, ids = self.index.search(q, k, exact)
        scores, ids = scores.flatten(), ids.flatten()
        order = torch.argsort(scores, descending=True, stable=True)
        scores, ids = scores[order], ids[order]
        ok = ids >= 0
        scores, ids = scores[ok], ids[ok]
        uniq, inv = torch.unique(ids, return_inverse=True)
        first = torch.full((len(uniq),), len(ids), dtype=torch.int64)
        first.scatter_reduce_(0, inv, torch.arange(len(ids)), reduce="amin")
        return ids[first.sort().values][:n]

    def sample(self, n: int) -> Tensor:
        """``min(n, len)`` distinct ids drawn uniformly at random (seeded; the draw advances the memory's
        sampling state, saved with it)."""
        if not isinstance(n, int) or n < 0:
            raise MtpeftError(f"sample: n must be an integer >= 0, got {n!r}")
        rows = self._sample_rng.sample(range(len(self)), min(n, len(self)))
        return torch.tensor([self._ids[r] for r in rows], dtype=torch.int64)

    def stats(self) -> dict:
        """Size, capacity, the path a search takes now (``"exact"`` or ``"ivf"``) and the IVF index's state
        (``nlist``, ``nprobe``, ``recall``: recall@``k`` against exact search measured at that ``nprobe``
        on stored vectors when it was last calibrated, at ``calibrated_at`` vectors; None before it is built)."""
        return {"size": len(self), "capacity": self.capacity, "dim": self.dim, "exact_limit": self.index.exact_limit,
                "search": "ivf" if self.index.approximate() else "exact", "ivf": self.index.state()}

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the memory to directory ``path`` atomically (see ``persist.py``)."""
        from .persist import save_memory

        save_memory(self, path)

    @classmethod
    def load(cls, path: str | Path) -> ReplayMemory:
        """The memory saved at ``path``, every file checked before use."""
        from .persist import load_memory

        return load_memory(cls, path)
