"""Helpers of the tests that start real processes (`python -m mtpeft ... --devices 2`, Lightning DDP on gloo)."""
from __future__ import annotations

import csv
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MTPEFT_FAIL_RANK")


def task_file(path: Path, seed: int, n: int = 80) -> Path:
    """A learnable two-class task file: 80 rows -> 56 train (7 global batches of 8), 8 validation, 16 test."""
    rng = random.Random(seed)
    cue = {0: ["apple", "cherry", "ruby"], 1: ["sky", "ocean", "sapphire"]}
    filler = ["the", "a", "one", "some", "big", "small", "old", "new"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            words = rng.sample(filler, 3) + [rng.choice(cue[i % 2])]
            rng.shuffle(words)
            w.writerow([" ".join(words), ["red", "blue"][i % 2]])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mtpeft(args, cwd: Path, env: dict | None = None, torchrun: bool = False,
               timeout: int = 1200) -> subprocess.CompletedProcess:
    """``python -m mtpeft ARGS`` (under torchrun with 2 processes when ``torchrun``) in a clean environment: one
    thread, offline, no launcher variables but those ``env`` sets."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(free_port())] if torchrun else [sys.executable]
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    e.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    return subprocess.run([*launch, "-m", "mtpeft", *map(str, args)], check=False, capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=timeout)


def weights(out: Path) -> dict[str, torch.Tensor]:
    """Every module's parameters in the bank at ``out``, by ``module/parameter``."""
    from mtpeft.api import open_bank

    bank, _ = open_bank(out)
    return {f"{n}/{k}": p.detach().clone() for n in bank.names for k, p in bank.module_parameters(n).items()}
