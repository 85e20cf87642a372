"""Tiny synthetic task files and continual configs for the continual tests (tiny-bert, seconds per run)."""
from __future__ import annotations

import csv
import random
from pathlib import Path

FILLER = ["the", "a", "one", "some", "big", "small", "old", "new"]
# three learnable tasks: the label is given by a cue word; distinct label names (class-IL grows 2 -> 4 -> 6)
TASKS = {
    "colors": (["red", "blue"], {0: ["apple", "cherry"], 1: ["sky", "ocean"]}),
    "sizes": (["huge", "tiny"], {0: ["mountain", "whale"], 1: ["ant", "seed"]}),
    "temps": (["hot", "cold"], {0: ["fire", "sun"], 1: ["ice", "snow"]}),
}
# three domains of one label space (domain-IL): the cue words differ, the labels are shared
DOMAINS = {
    "dom_a": (["yes", "no"], {0: ["apple", "cherry"], 1: ["sky", "ocean"]}),
    "dom_b": (["yes", "no"], {0: ["mountain", "whale"], 1: ["ant", "seed"]}),
    "dom_c": (["yes", "no"], {0: ["fire", "sun"], 1: ["ice", "snow"]}),
}


def write_task(root: Path, name: str, labels, cues, seed: int, n: int = 48) -> str:
    rng = random.Random(seed)
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    for split, k in (("train", n), ("validation", 16), ("test", 16)):
        with open(d / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(k):
                y = i % len(labels)
                words = rng.sample(FILLER, 3) + [rng.choice(cues[y])]
                rng.shuffle(words)
                w.writerow([" ".join(words), labels[y]])
    return f"{name}={d}"


def task_specs(root: Path, domains: bool = False) -> list[str]:
    table = DOMAINS if domains else TASKS
    return [write_task(root, name, labels, cues, i) for i, (name, (labels, cues)) in enumerate(table.items())]


def tiny_config(root: Path, scenario: str = "task-il", **over) -> dict:
    """A checked config over the synthetic tasks on tiny-bert, a few steps per task."""
    from mtpeft.continual.config import check_config

    conf = {"backbone": "tiny-bert", "tasks": task_specs(root, scenario == "domain-il"), "scenario": scenario,
            "max_steps": 30, "max_epochs": 10, "lr": 0.05, "batch_size": 8, "patience": 10,
            "memory": {"capacity": 24, "policy": "task-balanced"}, "max_train": None, "max_eval": None,
            "options": {"r": 4, "alpha": 8}, "seeds": [0]}
    conf.update(over)
    return check_config(conf)
