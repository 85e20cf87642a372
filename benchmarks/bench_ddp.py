"""One expert's training on 1 process vs 2 (Lightning DDP, gloo on CPU; NCCL on GPUs): steps per second.

Each configuration is one run of this script as a worker (``--worker``): a Lightning fit of one LoRA
expert (``mtpeft.train.fit_expert``) for ``--steps`` steps of the same global batch; with ``--devices 2``
Lightning's launcher starts the second rank by running the worker again, and each rank takes half of
every global batch. A callback times the steps after ``--warmup`` (validation, which runs once after the
last step, is outside the clock); rank zero writes the figures. Configurations, run round-robin
``--repeats`` times (medians reported):

- ``1proc_1thread``: one process, one intra-op thread (the floor);
- ``1proc_Nthreads``: one process with every core as intra-op threads (what one process can do here);
- ``2proc_1thread``: two DDP processes, one thread each (the same cores, split by process).

The figures name the machine's core count; on a GPU machine (``--accelerator gpu``) the peak CUDA
memory of a rank is reported too. Run: `.venv/bin/python benchmarks/bench_ddp.py` (minilm, writes
benchmarks/results/ddp.json); `--quick` for a smoke run on the tiny random backbone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _task(backbone: str, n: int, seed: int = 0):
    """A built-in task for a real backbone; a learnable synthetic one for the tiny test backbone."""
    if not backbone.startswith("tiny"):
        from mtpeft.suite import load_task

        return load_task("bbc_topic", max_examples=n, seed=seed)
    import random

    from datasets import DatasetDict

    from mtpeft.tasks import Task, make_dataset

    rng = random.Random(seed)
    cue = {0: ["apple", "cherry", "ruby"], 1: ["sky", "ocean", "sapphire"]}

    def split(k):
        ys = [i % 2 for i in range(k)]
        return make_dataset([" ".join(rng.sample(["the", "a", "big", "old"], 2) + [rng.choice(cue[y])]) for y in ys], ys)

    return Task("toy", DatasetDict(train=split(n), validation=split(16), test=split(16)), ["red", "blue"])


def worker(a) -> None:
    """One configuration (every rank runs this): fit one expert, rank zero writes its timing to ``a.out``."""
    import lightning as L
    import torch

    from mtpeft.api import new_bank
    from mtpeft.modules.lora import LoRAConfig
    from mtpeft.routers import TaskIdRouter
    from mtpeft.train import TrainConfig, fit_phase

    torch.set_num_threads(a.threads)
    task = _task(a.backbone, a.examples)
    bank, scorer = new_bank(a.backbone)
    cuda = a.accelerator in ("gpu", "cuda")

    class StepTimer(L.Callback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.timed = 0

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == a.warmup:
                if cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            if self.t0 is not None:
                if cuda:
                    torch.cuda.synchronize()
                self.t1, self.timed = time.perf_counter(), trainer.global_step - a.warmup

    timer = StepTimer()
    cfg = TrainConfig(lr=1e-3, batch_size=a.batch, max_epochs=-1, max_steps=a.steps, patience=1000,
                      val_check_interval=a.steps, progress=False, devices=a.devices, strategy="auto",
                      accelerator=a.accelerator)
    bank.freeze()
    bank.add("expert", "lora", LoRAConfig(r=8, alpha=16, dropout=0.0), task=task.name, seed=0)
    fit_phase(bank, scorer, [task], TaskIdRouter({task.name: "expert"}), cfg, name="expert", callbacks=[timer])
    from mtpeft.distributed import global_rank

    if global_rank(a.devices) != 0:
        return
    out = {"steps_timed": timer.timed, "seconds": round(timer.t1 - timer.t0, 4),
           "steps_per_s": round(timer.timed / (timer.t1 - timer.t0), 4)}
    if cuda:
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    Path(a.out).write_text(json.dumps(out))


CONFIGS = {  # name: (processes, threads per process)
    "1proc_1thread": (1, 1),
    "1proc_Nthreads": (1, 0),
    "2proc_1thread": (2, 1),
}


def run_config(a, name: str, tmp: Path) -> dict:
    procs, threads = CONFIGS[name]
    threads = threads or (os.cpu_count() or 1)
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--backbone", a.backbone,
           "--devices", str(procs), "--threads", str(threads), "--batch", str(a.batch), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--examples", str(a.examples), "--accelerator", a.accelerator,
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=tmp)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--batch", type=int, default=16, help="the global batch (each of N ranks takes batch/N)")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps before the clock starts")
    p.add_argument("--examples", type=int, default=400, help="training examples")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the configurations (medians reported)")
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu", "cuda"))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-bert, few steps, one round")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/ddp.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.quick:
        a.backbone, a.steps, a.warmup, a.examples, a.repeats = "tiny-bert", 6, 2, 64, 1
    runs: dict[str, list[dict]] = {c: [] for c in a.configs}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for name in a.configs:
                runs[name].append(run_config(a, name, Path(tmp)))
    rows = []
    for name, got in runs.items():
        procs, threads = CONFIGS[name]
        row = {"config": name, "processes": procs, "threads_per_process": threads or (os.cpu_count() or 1),
               "steps_per_s": round(statistics.median(r["steps_per_s"] for r in got), 3),
               "runs": [r["steps_per_s"] for r in got], "steps_timed": [r["steps_timed"] for r in got]}
        if "peak_cuda_mib" in got[0]:
            row["peak_cuda_mib"] = max(r["peak_cuda_mib"] for r in got)
        rows.append(row)
    by = {r["config"]: r["steps_per_s"] for r in rows}
    speedups = {f"{n}/1proc_1thread": round(by[n] / by["1proc_1thread"], 3)
                for n in by if n != "1proc_1thread" and "1proc_1thread" in by}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    payload = {"config": {"backbone": a.backbone, "global_batch": a.batch, "steps": a.steps, "warmup": a.warmup,
                          "repeats": a.repeats, "accelerator": a.accelerator, "cores": cores,
                          "strategy": "ddp (gloo)" if a.accelerator == "cpu" else "ddp (nccl)"},
               "rows": rows, "speedups": speedups, "seconds": round(time.perf_counter() - t0, 1)}
    sys.path.insert(0, str(HERE))
    from common import save

    if a.out is None:
        save("ddp", payload)
    else:
        from common import environment

        from mtpeft.io import write_json

        write_json(a.out, {"benchmark": "ddp", "environment": environment(), **payload})
        print(f"wrote {a.out}")
    return payload


if __name__ == "__main__":
    main()
