"""Shared benchmark helpers: interleaved contenders, medians, peak memory, JSON results."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
import tracemalloc
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(contenders: dict, repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median wall time in ms of each contender, run round-robin so drifts hit all alike."""
    for _ in range(warmup):
        for f in contenders.values():
            f()
    times = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, f in contenders.items():
            t = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def peak_mib(f) -> float:
    """Peak Python-tracked allocation of one call in MiB (CPU: tensors allocate through the C allocator,
    so this uses torch's CUDA stats on GPU and the RSS high-water delta on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        f()
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    tracemalloc.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    f()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.stop()
    return round(max(0, after - before) / 1024, 1)


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def save(name: str, payload: dict) -> Path:
    from mtpeft.io import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json(path, {"benchmark": name, "environment": environment(), **payload})
    print(json.dumps(payload, indent=2))
    return path
