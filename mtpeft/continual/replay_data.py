"""Training batches for experience replay: each batch of the new task's examples joined by replayed ones.

Every epoch visits the new task's training examples once, shuffled, ``batch_size`` at a time; each batch is
joined by ``n_old`` examples from the replay memory, drawn uniformly at random (``retrieval="random"``) or
the stored examples nearest to the batch in the frozen backbone's embedding space (``"nearest"``: each
stored example ranked by its best inner product with any example of the batch). Replayed examples keep
their own task (its template, its labels, its task id for routing). Validation is the new task's alone:
the old tasks' validation data is not the learner's any more, only what the memory kept.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..lightning.data import TaskDataModule, _Examples, collate

RETRIEVALS = ("random", "nearest")


class _Rows(Dataset):
    def __init__(self, texts: list[str], labels: list[int], task_ids: list[int]):
        self.texts, self.labels, self.task_ids = texts, labels, task_ids

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i], self.labels[i], self.task_ids[i]


class ReplayBatches(Sampler):
    """Index batches over ``n_new`` new rows then the memory's rows: each batch, up to ``batch_size`` new
    rows (shuffled once per epoch) plus the positions ``pick_old(new_positions, generator)`` returns."""

    def __init__(self, n_new: int, batch_size: int, pick_old: Callable[[Tensor, torch.Generator], Tensor],
                 seed: int):
        self.n_new, self.batch_size, self.pick_old = n_new, batch_size, pick_old
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return (self.n_new + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n_new, generator=self.generator)
        for s in range(0, self.n_new, self.batch_size):
            new = order[s: s + self.batch_size]
            old = self.pick_old(new, self.generator) + self.n_new
            yield torch.cat([new, old]).tolist()


class BudgetBatches(Sampler):
    """ConPET's fixed budget: exactly ``n_batches`` batches per epoch whatever the sizes, each of ``n_new`` new
    rows (cycling through them, reshuffled at every pass) plus the positions ``pick_old`` returns; so the
    cost of a task does not grow with the number of tasks seen."""

    def __init__(self, n_rows: int, n_new: int, n_batches: int, pick_old: Callable[[Tensor, torch.Generator], Tensor],
                 seed: int):
        self.n_rows, self.n_new, self.n_batches, self.pick_old = n_rows, n_new, n_batches, pick_old
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.n_batches

    def __iter__(self):
        passes = -(-self.n_batches * self.n_new // self.n_rows)
        order = torch.cat([torch.randperm(self.n_rows, generator=self.generator) for _ in range(passes)])
        for b in range(self.n_batches):
            new = order[b * self.n_new: (b + 1) * self.n_new]
            old = self.pick_old(new, self.generator) + self.n_rows
            yield torch.cat([new, old]).tolist()


class ReplayDataModule(TaskDataModule):
    """``tasks[0]`` is the new task; ``replay`` holds the memory's examples as (texts, task-local labels,
    indices into ``tasks``), aligned with ``ids`` (their memory ids); ``n_old`` replayed per batch.
    ``budget``: exactly that many batches of ``batch_size`` new rows each (:class:`BudgetBatches`) instead of
    one pass over the new rows."""

    def __init__(self, tasks, replay: tuple[list, list, list], ids: Tensor, *, memory, n_old: int,
                 retrieval: str = "random", new_embeddings: Tensor | None = None, batch_size: int = 16,
                 seed: int = 0, budget: int | None = None):
        super().__init__(tasks, batch_size=batch_size, seed=seed)
        self.budget = budget
        self.replay, self.ids, self.memory = replay, ids, memory
        self.n_old, self.retrieval, self.new_embeddings = n_old, retrieval, new_embeddings
        self._pos = {int(i): p for p, i in enumerate(ids.tolist())}

    def _pick(self, new: Tensor, g: torch.Generator) -> Tensor:
        n_mem = len(self.ids)
        k = min(self.n_old, n_mem)
        if k == 0:
            return torch.empty(0, dtype=torch.long)
        if self.retrieval == "random":
            return torch.randperm(n_mem, generator=g)[:k]
        near = self.memory.nearest_to_batch(self.new_embeddings[new], k)
        return torch.tensor([self._pos[int(i)] for i in near.tolist()], dtype=torch.long)

    def train_dataloader(self):
        ds = self.tasks[0].splits["train"]
        texts, labels = list(ds["text"]), [int(x) for x in ds["label"]]
        r_texts, r_labels, r_tasks = self.replay
        rows = _Rows(texts + list(r_texts), labels + list(r_labels), [0] * len(texts) + list(r_tasks))
        if self.budget is not None:
            sampler = BudgetBatches(len(texts), self.batch_size, self.budget, self._pick, self.seed)
        else:
            sampler = ReplayBatches(len(texts), self.batch_size, self._pick, self.seed)
        return DataLoader(rows, batch_sampler=sampler, collate_fn=collate)

    def _eval(self, split):
        return DataLoader(_Examples(self.tasks[:1], split), batch_size=self.eval_batch_size, collate_fn=collate)
