"""Shared benchmark helpers: interleaved contenders, medians, peak memory, tables, JSON results.

Every benchmark runs its contenders in one process, round-robin (so a drift in the machine's load
hits all of them alike), reports the median of the repeats and ratios between contenders, and
writes ``benchmarks/results/<name>.json`` with the machine it ran on.

Peak memory (``peak_mib``) is the most memory one call needs on top of what is already allocated
when it starts (activations, gradients, temporaries; not the weights already resident):
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation at the start of the call;
- CPU: the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
  the resident set at the start. So that freed tensors go back to the OS rather than to malloc's
  free lists (which would hide a later call's allocations), ``use_mmap_for_tensors()`` makes glibc
  serve every allocation above 64 KiB with mmap, only while ``peak_mib`` measures a call: timings run
  with tensors from the heap (an mmap per tensor adds page faults that inflate and scatter them).
  Where ``/proc`` is missing (not Linux), ``ru_maxrss`` deltas are the fallback (coarser: a call
  that stays under an earlier call's peak reads 0).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
HEAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_LIBC = None


def add_common_args(p: argparse.ArgumentParser, repeats: int = 7, warmup: int = 2) -> None:
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: every core)")
    p.add_argument("--quick", action="store_true", help="smoke run: few repeats, fewer configurations")


def setup_threads(a: argparse.Namespace) -> None:
    n = a.threads or os.cpu_count() or 1
    torch.set_num_threads(n)


def interleaved(contenders: dict, repeats: int = 15, warmup: int = 3, clock=time.perf_counter) -> dict[str, float]:
    """Median time in ms of each contender, run round-robin so drifts hit all alike; each round starts one
    contender later, so no contender always follows the same one (allocator and cache state). ``clock``: the
    wall clock by default; ``time.process_time`` for this process's CPU time (on a machine shared with other
    jobs the wall clock also counts the waits for a core)."""
    for _ in range(warmup):
        for f in contenders.values():
            f()
    items = list(contenders.items())
    times = {k: [] for k in contenders}
    for r in range(repeats):
        for k, f in items[r % len(items):] + items[: r % len(items)]:
            t = clock()
            f()
            times[k].append((clock() - t) * 1000)
    return {k: round(statistics.median(v), 3) for k, v in times.items() if v}


def seed_stat(xs) -> dict:
    """Mean and sample std over seeds (None values dropped), rounded to 4 places, with the count."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(statistics.fmean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


# ---- memory ------------------------------------------------------------------------------------------

def use_mmap_for_tensors(threshold: int = 64 * 1024) -> bool:
    """glibc: serve allocations above ``threshold`` bytes with mmap (returned to the OS on free)."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        return bool(_LIBC.mallopt(-3, threshold))  # M_MMAP_THRESHOLD (fixing it also stops its adaptation)
    except (OSError, AttributeError):
        return False


def _proc_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mib(f) -> float:
    """Peak memory one call of ``f`` needs beyond what is allocated when it starts, in MiB (see the module doc)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        f()
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - start) / 2**20, 1)
    mmap = use_mmap_for_tensors()  # during this call only (see the module doc)
    try:
        if mmap:
            _LIBC.malloc_trim(0)
        if _reset_hwm() and _proc_kib("VmRSS") is not None:
            before = _proc_kib("VmRSS")
            f()
            return round(max(0, _proc_kib("VmHWM") - before) / 1024, 1)
    finally:
        if mmap:  # back to what glibc's adaptive threshold settles at: tensors from the heap, as when timing
            use_mmap_for_tensors(HEAP_THRESHOLD)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    f()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(max(0, after - before) / 1024, 1)


def memory_method() -> str:
    if torch.cuda.is_available():
        return "cuda max_memory_allocated minus allocated at call start"
    if Path("/proc/self/clear_refs").exists():
        return "CPU RSS high-water (VmHWM, reset per call) minus RSS at call start; glibc mmap threshold 64 KiB"
    return "CPU ru_maxrss delta (coarse)"


def param_mib(params) -> float:
    return round(sum(p.numel() * p.element_size() for p in params) / 2**20, 3)


# ---- reporting -----------------------------------------------------------------------------------------

def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "memory_method": memory_method()}


def print_table(rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths)))


def save(name: str, payload: dict, quiet: bool = False) -> Path:
    from mtpeft.io import write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json(path, {"benchmark": name, "environment": environment(), **payload})
    if not quiet:
        print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path
