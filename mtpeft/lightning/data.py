"""LightningDataModules: one task, or a multitask mixture (proportional or temperature sampling).

On several processes (DDP) every rank draws the same global order from the same seeded generator and
takes its slice of each global batch (``RankBatches``), so N processes see exactly the batches of one
process, split N ways; evaluation splits are sharded by example (rank r takes examples r, r+N, ...)."""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset, WeightedRandomSampler


class _Examples(Dataset):
    """(text, label, task index) rows of one split of several tasks, concatenated."""

    def __init__(self, tasks, split: str):
        self.texts: list[str] = []
        self.labels: list[int] = []
        self.task_ids: list[int] = []
        self.sizes: list[int] = []
        for i, t in enumerate(tasks):
            ds = t.splits[split]
            self.texts.extend(ds["text"])
            self.labels.extend(int(x) for x in ds["label"])
            self.task_ids.extend([i] * len(ds))
            self.sizes.append(len(ds))

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i], self.labels[i], self.task_ids[i]


def collate(rows):
    texts, labels, tasks = zip(*rows)
    return {"text": list(texts), "label": torch.tensor(labels), "task": torch.tensor(tasks)}


class RankBatches(Sampler):
    """Rank ``rank``'s share of each global batch of ``batch_size`` drawn from ``sampler``.

    Every rank iterates the same ``sampler`` (same seed: the same global order, epoch after epoch), cuts it
    into global batches and keeps its contiguous slice of ``batch_size // world`` examples. With DDP's
    gradient average of the ranks' mean losses this is the gradient of the global batch's mean loss: the
    same steps as one process. A last, short global batch is cut into equal slices too: padded with its own
    first examples up to a multiple of ``world`` (every rank must take as many steps), so it matches one
    process exactly only when its size is a multiple of ``world``.
    """

    def __init__(self, sampler, batch_size: int, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world}")
        if batch_size % world:
            raise ValueError(f"the global batch {batch_size} is not a multiple of the {world} ranks")
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __len__(self):
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def _share(self, batch: list[int]) -> list[int]:
        if len(batch) % self.world:
            batch = batch + batch[: self.world - len(batch) % self.world]
        k = len(batch) // self.world
        return batch[self.rank * k: (self.rank + 1) * k]

    def __iter__(self):
        batch: list[int] = []
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                yield self._share(batch)
                batch = []
        if batch:
            yield self._share(batch)


class RankSlices(Sampler):
    """Rank ``rank``'s slice of each batch of ``batch_sampler`` (every rank iterates the same one: same
    seed, same batches), cut as ``RankBatches`` cuts (padded with the batch's own first examples up to a
    multiple of ``world``). For data modules that build their own batches (replay: new examples joined by
    replayed ones)."""

    def __init__(self, batch_sampler, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of world {world}")
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            batch = [int(i) for i in batch]
            if len(batch) % self.world:
                batch = batch + (batch * self.world)[: self.world - len(batch) % self.world]
            k = len(batch) // self.world
            yield batch[self.rank * k: (self.rank + 1) * k]


class RankShards(L.LightningDataModule):
    """Any data module's batches split over the ranks of a distributed fit: each training batch by
    ``RankSlices``, each evaluation split by example (rank r takes r, r+N, ...). One process: unchanged."""

    def __init__(self, inner: L.LightningDataModule):
        super().__init__()
        self.inner = inner

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (0, 1) if trainer is None else (int(trainer.global_rank), int(trainer.world_size))

    def _loader(self, dl: DataLoader, train: bool) -> DataLoader:
        rank, world = self._rank()
        if world == 1:
            return dl
        if train:
            return DataLoader(dl.dataset, batch_sampler=RankSlices(dl.batch_sampler, rank, world),
                              collate_fn=dl.collate_fn)
        ds = Subset(dl.dataset, range(rank, len(dl.dataset), world))
        return DataLoader(ds, batch_size=dl.batch_size, collate_fn=dl.collate_fn)

    def train_dataloader(self):
        return self._loader(self.inner.train_dataloader(), True)

    def val_dataloader(self):
        return self._loader(self.inner.val_dataloader(), False)

    def test_dataloader(self):
        return self._loader(self.inner.test_dataloader(), False)


def mixture_weights(sizes: Sequence[int], sampling: str = "proportional", temperature: float = 2.0) -> np.ndarray:
    """Per-example sampling weights so task t is drawn with probability ~ n_t^(1/T) (T=1: proportional)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sampling == "proportional":
        task_p = sizes / sizes.sum()
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        task_p = sizes ** (1.0 / temperature)
        task_p = task_p / task_p.sum()
    elif sampling == "uniform":
        task_p = np.full(len(sizes), 1.0 / len(sizes))
    else:
        raise ValueError(f"sampling must be proportional, temperature or uniform, got {sampling!r}")
    return np.concatenate([np.full(int(n), p / n) for n, p in zip(sizes, task_p) if n > 0])


class TaskDataModule(L.LightningDataModule):
    def __init__(self, tasks, batch_size: int = 16, eval_batch_size: int = 64, sampling: str = "proportional",
                 temperature: float = 2.0, seed: int = 0, samples_per_epoch: int | None = None):
        super().__init__()
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.sampling = sampling
        self.temperature = temperature
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch

    def _rank(self) -> tuple[int, int]:
        """(rank, world size) of the fit this module serves (0, 1 outside a fit or on one process)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_dataloader(self):
        ds = _Examples(self.tasks, "train")
        g = torch.Generator().manual_seed(self.seed)
        loader_gen = None
        if len(self.tasks) == 1 and self.samples_per_epoch is None:
            sampler = RandomSampler(ds, generator=g)
            # as DataLoader(shuffle=True, generator=g) always did: each epoch's iterator first draws its
            # base seed from g, then the permutation (the same data order as before, on every rank)
            loader_gen = g
        else:
            w = mixture_weights(ds.sizes, self.sampling, self.temperature)
            n = self.samples_per_epoch or len(ds)
            sampler = WeightedRandomSampler(torch.as_tensor(w), num_samples=n, replacement=True, generator=g)
        rank, world = self._rank()
        if world > 1:  # the same global batches as one process, each rank its slice
            return DataLoader(ds, batch_sampler=RankBatches(sampler, self.batch_size, rank, world),
                              generator=loader_gen, collate_fn=collate)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, generator=loader_gen, collate_fn=collate)

    def _eval(self, split):
        # One loader over every task: each example keeps its own task id (which routes and scores it), and
        # val/acc is logged from a single dataloader (Lightning refuses one metric logged from several).
        # On several ranks each evaluates its shard and the metrics (torchmetrics) are summed over ranks.
        ds = _Examples(self.tasks, split)
        rank, world = self._rank()
        if world > 1:
            ds = Subset(ds, range(rank, len(ds), world))
        return DataLoader(ds, batch_size=self.eval_batch_size, collate_fn=collate)

    def val_dataloader(self):
        return self._eval("validation")

    def test_dataloader(self):
        return self._eval("test")
