"""Quickstart (`make demo`): the bare MiniLM zero-shot on real tasks, then one LoRA expert per task.

Everything runs offline on the shipped backbone and data, on CPU, in a few minutes.
Prints a table and writes the bank to runs/quickstart-bank (inspect it with `mtpeft bank ls`).
"""
from __future__ import annotations

import argparse
import json
import time

from mtpeft import TrainConfig, expert_vs_zero_shot, load_builtin
from mtpeft.api import new_bank
from mtpeft.cli import table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", nargs="+", default=["bbc_topic", "tweet_airline", "wordnet_verb"])
    p.add_argument("--max-examples", type=int, default=400)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--out", default="runs/quickstart-bank")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    bank, scorer = new_bank("minilm")
    rows = []
    cfg = TrainConfig(lr=2e-3, batch_size=16, max_epochs=20, max_steps=args.max_steps, patience=3,
                      progress=not args.json)
    for name in args.tasks:
        task = load_builtin(name, max_examples=args.max_examples)
        rows.append(expert_vs_zero_shot(bank, scorer, task, "lora", None, cfg))
    bank.save(args.out)
    result = {"backbone": "minilm", "bank": args.out, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\nMiniLM, task-id routing to one LoRA expert per task (test accuracy)")
        print(table(rows, ["task", "n", "labels", "majority", "zero_shot", "expert", "steps", "train_s"]))
        print(f"\nbank written to {args.out}; total {result['seconds']} s")


if __name__ == "__main__":
    main()
