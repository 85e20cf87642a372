"""LightningDataModules: one task, or a multitask mixture (proportional or temperature sampling)."""
from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler


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

    def train_dataloader(self):
        ds = _Examples(self.tasks, "train")
        g = torch.Generator().manual_seed(self.seed)
        if len(self.tasks) == 1 and self.samples_per_epoch is None:
            return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=g, collate_fn=collate)
        w = mixture_weights(ds.sizes, self.sampling, self.temperature)
        n = self.samples_per_epoch or len(ds)
        sampler = WeightedRandomSampler(torch.as_tensor(w), num_samples=n, replacement=True, generator=g)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def _eval(self, split):
        # One loader over every task: each example keeps its own task id (which routes and scores it), and
        # val/acc is logged from a single dataloader (Lightning refuses one metric logged from several).
        return DataLoader(_Examples(self.tasks, split), batch_size=self.eval_batch_size, collate_fn=collate)

    def val_dataloader(self):
        return self._eval("validation")

    def test_dataloader(self):
        return self._eval("test")
