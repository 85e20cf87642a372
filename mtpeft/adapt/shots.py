"""Few-shot data: ``k`` training examples per class, drawn with a seed.

The few-shot task trains on the drawn examples only: its ``validation`` split is the same examples (no label
beyond the ``k`` shots is used, so early stopping and the kept state read the training accuracy), and its
``test`` split is the whole test split of the task, scored after training.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from datasets import DatasetDict

from ..errors import MtpeftError


def check_shots(shots) -> list[int]:
    """``shots`` (ints, or a comma-separated string) as a list of distinct positive integers, in order."""
    if isinstance(shots, str):
        items = [s.strip() for s in shots.split(",")]
        if not all(items):
            raise MtpeftError(f"--shots {shots!r} has an empty item; give examples per class, e.g. --shots 16,64,256")
        try:
            shots = [int(s) for s in items]
        except ValueError:
            raise MtpeftError(f"--shots {shots!r} must be integers (examples per class), e.g. --shots 16,64,256"
                              ) from None
    shots = list(shots)
    if not shots:
        raise MtpeftError("give at least one shot count (examples per class), e.g. --shots 16")
    for k in shots:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise MtpeftError(f"shot count {k!r} is not a positive integer; give examples per class, e.g. --shots 16,64")
    if len(set(shots)) != len(shots):
        raise MtpeftError(f"a shot count is given twice in {shots}; give each once")
    return [int(k) for k in shots]


def shot_indices(labels, num_labels: int, k: int, seed: int) -> tuple[np.ndarray, dict]:
    """Indices of ``k`` examples per class of ``labels`` (all of a class with fewer), drawn with ``seed``; sorted.

    Returns the indices and ``{"per_class": [...], "short": {class: available}}`` (classes with fewer than k)."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(k)])  # a different draw per seed, and per k for one seed
    picked, per_class, short = [], [], {}
    for c in range(num_labels):  # a loop over classes, not examples
        idx = np.flatnonzero(labels == c)
        take = min(k, idx.size)
        if take < k:
            short[c] = int(idx.size)
        picked.append(rng.permutation(idx)[:take])
        per_class.append(int(take))
    out = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    return out, {"per_class": per_class, "short": short}


def sample_shots(task, k: int, seed: int):
    """The few-shot task: ``k`` train examples per class (``seed``), validated on the same examples, tested on
    the whole test split. Returns ``(task, info)``; ``info["short"]`` names the classes that had fewer than k."""
    k = check_shots([k])[0]
    train = task.splits["train"]
    idx, info = shot_indices(train["label"], task.num_labels, k, seed)
    if idx.size == 0:
        raise MtpeftError(f"task {task.name!r} has no training examples to draw {k} shots from")
    few = train.select(idx)
    splits = DatasetDict({"train": few, "validation": few, "test": task.splits["test"]})
    short = {task.label_names[c]: n for c, n in info["short"].items()}
    meta = {**task.meta, "shots": k, "shot_seed": int(seed)}
    out = dataclasses.replace(task, splits=splits, meta=meta)
    return out, {"shots": k, "seed": int(seed), "n_train": int(idx.size), "per_class": info["per_class"],
                 "short": short}
