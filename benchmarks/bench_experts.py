"""Accuracy benchmark: one LoRA expert per built-in task on MiniLM, routed by task id, vs the bare backbone zero-shot.

`python benchmarks/bench_experts.py [--tasks ...] [--max-train N] [--max-steps N]`; writes
benchmarks/results/experts_minilm_<module>.json and prints the table the README shows. Test splits are used whole.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save

from mtpeft import TrainConfig, builtin_names, expert_vs_zero_shot, load_builtin
from mtpeft.api import new_bank
from mtpeft.cli import table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", nargs="+", default=builtin_names())
    p.add_argument("--module", default="lora")
    p.add_argument("--max-train", type=int, default=2000, help="cap on the training split (test splits are whole)")
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    bank, scorer = new_bank("minilm")
    cfg = TrainConfig(lr=2e-3, batch_size=16, max_epochs=50, max_steps=args.max_steps, patience=3,
                      val_check_interval=50, seed=args.seed, progress=False)
    rows, t0 = [], time.perf_counter()
    for name in args.tasks:
        task = load_builtin(name, seed=args.seed)
        task = task.cap(args.max_train, seed=args.seed, splits=["train"])
        rows.append(expert_vs_zero_shot(bank, scorer, task, args.module, None, cfg))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    cols = ["task", "n", "labels", "majority", "zero_shot", "expert", "steps", "train_s"]
    print("\n" + table(rows, cols))
    wins = sum(r["expert"] > r["zero_shot"] for r in rows)
    save(f"experts_minilm_{args.module}", {
        "backbone": "minilm", "module": args.module, "config": {"max_train": args.max_train,
        "max_steps": args.max_steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "val_every": 50,
        "seed": args.seed}, "rows": rows, "expert_beats_zero_shot": f"{wins}/{len(rows)}",
        "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
