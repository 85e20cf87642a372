"""Which examples a bounded memory keeps: one small class per policy, injected into ``ReplayMemory``
(avalanche's storage-policy idea).

A policy sees the memory through a :class:`View` (size, capacity, and the rows of each group when it
groups examples) and answers, for each offered example in arrival order, where it goes: ``view.size``
(append, only while there is room), a row ``< view.size`` (evict the example there and put this one in
its place) or ``REJECT``. Its state (counters) is plain JSON, saved with the memory.
"""
from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass

from ..errors import MtpeftError
from ..registry import Registry
from .example import Example

REJECT = -1
POLICIES: Registry[type[StoragePolicy]] = Registry("memory policy")


class RowSet:
    """A set of rows with O(1) add, remove and uniform choice."""

    def __init__(self):
        self.rows: list[int] = []
        self._pos: dict[int, int] = {}

    def add(self, row: int) -> None:
        self._pos[row] = len(self.rows)
        self.rows.append(row)

    def remove(self, row: int) -> None:
        i = self._pos.pop(row)
        last = self.rows.pop()
        if last != row:
            self.rows[i] = last
            self._pos[last] = i

    def choice(self, rng: random.Random) -> int:
        return self.rows[rng.randrange(len(self.rows))]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class View:
    size: int
    capacity: int
    groups: dict[Hashable, RowSet]


class StoragePolicy:
    name = ""

    def key(self, ex: Example) -> Hashable | None:
        """The group an example balances in (None: the policy does not group)."""
        return None

    def place(self, view: View, ex: Example, rng: random.Random) -> int:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state != {}:
            raise MtpeftError(f"memory policy {self.name!r} has no state, got {str(state)[:80]}")


def _count(state, what: str) -> int:
    if not isinstance(state, int) or isinstance(state, bool) or state < 0:
        raise MtpeftError(f"memory policy state: {what} must be an integer >= 0, got {state!r}; restore the "
                          "memory's manifest or re-create the memory")
    return state


@POLICIES.register("reservoir")
class Reservoir(StoragePolicy):
    """Algorithm R: after ``t`` offers each offered example is in the memory with probability
    ``capacity / t`` (when nothing was removed by hand)."""

    name = "reservoir"

    def __init__(self):
        self.seen = 0

    def place(self, view, ex, rng):
        self.seen += 1
        if view.size < view.capacity:
            return view.size
        j = rng.randrange(self.seen)
        return j if j < view.size else REJECT

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or set(state) != {"seen"}:
            raise MtpeftError(f"reservoir policy state must be {{'seen': N}}, got {str(state)[:80]}")
        self.seen = _count(state["seen"], "'seen'")


class Balanced(StoragePolicy):
    """Equal shares per group. While there is room, everything goes in. When full, an example of a group
    smaller than the largest evicts a random member of the largest (ties broken by the seeded rng); an
    example of a largest group replaces a random member of its own group with probability
    ``group size / examples of the group seen`` (a reservoir within the group), else is rejected. Once
    every group has offered at least ``capacity / groups`` examples, group sizes differ by at most one."""

    def __init__(self):
        self.seen: dict[str, int] = {}

    def group_name(self, key) -> str:
        return str(key)

    def place(self, view, ex, rng):
        key = self.key(ex)
        name = self.group_name(key)
        self.seen[name] = self.seen.get(name, 0) + 1
        if view.size < view.capacity:
            return view.size
        own = len(view.groups[key]) if key in view.groups else 0
        top = max(len(g) for g in view.groups.values())
        if own < top:
            largest = [k for k, g in view.groups.items() if len(g) == top]
            return view.groups[largest[rng.randrange(len(largest))]].choice(rng)
        j = rng.randrange(self.seen[name])
        return view.groups[key].choice(rng) if j < own else REJECT

    def state_dict(self):
        return {"seen": dict(self.seen)}

    def load_state_dict(self, state):
        if not isinstance(state, dict) or set(state) != {"seen"} or not isinstance(state["seen"], dict):
            raise MtpeftError(f"{self.name} policy state must be {{'seen': {{group: N}}}}, got {str(state)[:80]}")
        self.seen = {str(k): _count(v, f"'seen' of group {k!r}") for k, v in state["seen"].items()}


@POLICIES.register("task-balanced")
class TaskBalanced(Balanced):
    """Equal shares per task."""

    name = "task-balanced"

    def key(self, ex):
        return ex.task


@POLICIES.register("class-balanced")
class ClassBalanced(Balanced):
    """Equal shares per class: a class is a label id within its label space."""

    name = "class-balanced"

    def key(self, ex):
        return (ex.space, ex.label)

    def group_name(self, key) -> str:
        return f"{key[0]}\x1f{key[1]}"


def _kmeanspp(x, k: int, rng):
    """k-means++ seeding (Arthur and Vassilvitskii 2007): each next centroid drawn with probability
    proportional to its squared distance to the nearest one so far (faiss starts from random rows, which
    often puts two centroids in one cluster and none in another)."""
    import numpy as np

    chosen = [int(rng.integers(len(x)))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(i)
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.ascontiguousarray(x[chosen])


def kmeans_pick(emb, k: int, seed: int, niter: int = 20):
    """The indices (ascending, distinct) of at most ``k`` rows of ``emb`` ``[n, d]``: faiss k-means with ``k``
    centroids (k-means++ seeding, ``seed``), then the row nearest to each centroid (two centroids sharing
    their nearest row keep it once).
    ``k >= n`` keeps every row."""
    import faiss
    import numpy as np
    import torch

    n = int(emb.shape[0])
    if k >= n:
        return torch.arange(n)
    if k < 1:
        return torch.empty(0, dtype=torch.long)
    x = np.ascontiguousarray(emb.detach().float().cpu().numpy())
    rng = np.random.default_rng(int(seed))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=int(seed), verbose=False, min_points_per_centroid=1)
    km.train(x, init_centroids=_kmeanspp(x, k, rng))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, nearest = index.search(km.centroids, 1)
    return torch.unique(torch.as_tensor(nearest[:, 0].astype(np.int64)))


@POLICIES.register("kmeans")
class KMeansPolicy(TaskBalanced):
    """ConPET's memory: per task, a share of ``capacity // tasks`` examples chosen by k-means over their
    embeddings (faiss), one example per cluster (the one nearest its centroid). A batch policy
    (``ReplayMemory.add`` calls ``prepare`` first): when a task's examples are offered, every task already
    stored above its new share is shrunk to it by k-means over its stored embeddings, then the new task's
    examples are clustered into its share and only the picked ones are placed. So every task's kept examples
    are one per cluster of a k-means over what it kept before, and the memory never holds more than its
    capacity. Placement itself is task-balanced's (with the room ``prepare`` made, every picked example is
    appended). Per task, not global: each task keeps its own clusters."""

    name = "kmeans"

    def prepare(self, memory, emb, examples, rng):
        """Shrink stored tasks to their share and return the positions of ``examples`` to offer."""
        import torch

        new_tasks = list(dict.fromkeys(e.task for e in examples))
        stored = memory.counts("task")
        tasks = list(dict.fromkeys([*stored, *new_tasks]))
        share = max(1, memory.capacity // len(tasks))
        for t in stored:
            if t not in new_tasks and stored[t] > share:
                ids = torch.tensor([i for i, e in zip(memory._ids, memory._examples) if e.task == t])
                keep = kmeans_pick(memory.embeddings(ids), share, rng.randrange(2**31))
                drop = torch.ones(len(ids), dtype=torch.bool)
                drop[keep] = False
                memory.remove(ids[drop])
        picked = []
        for t in new_tasks:
            pos = torch.tensor([i for i, e in enumerate(examples) if e.task == t])
            room = share - (stored.get(t, 0))
            picked.append(pos[kmeans_pick(emb[pos], max(0, room), rng.randrange(2**31))])
        return torch.cat(picked).sort().values if picked else torch.empty(0, dtype=torch.long)


def make_policy(policy: str | StoragePolicy) -> StoragePolicy:
    if isinstance(policy, StoragePolicy):
        return policy
    return POLICIES.get(policy)()
