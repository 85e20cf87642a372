"""One LoRA expert trained on two processes (Lightning DDP, gloo on CPU), from Python.

    OMP_NUM_THREADS=1 python examples/two_processes.py [--devices 2] [--max-steps 30]

Run it once: at the first fit Lightning's launcher starts the second rank by running this same script again,
so every rank builds the same bank, trains its half of each global batch, and scores its half of the test split
(``eval_shard``); rank zero alone prints and saves. The command line does the same with
``mtpeft train --devices 2`` (and ``distil``, ``adapt``, ``gate``, ``continual``); docs/scale-out.md.
"""
from __future__ import annotations

import argparse

from mtpeft import TrainConfig
from mtpeft.api import new_bank
from mtpeft.distributed import eval_shard, global_rank
from mtpeft.suite import load_task
from mtpeft.train import evaluate, fit_expert


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=2, help="processes on this machine (default 2)")
    p.add_argument("--task", default="tweet_airline")
    p.add_argument("--max-examples", type=int, default=400)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--out", default="runs/two-processes-bank")
    args = p.parse_args(argv)
    bank, scorer = new_bank("minilm")
    task = load_task(args.task, max_examples=args.max_examples, seed=0)
    # batch_size is the global batch: each of the two ranks takes 8 examples a step
    cfg = TrainConfig(lr=2e-3, batch_size=16, max_epochs=5, max_steps=args.max_steps, devices=args.devices,
                      accelerator="cpu", progress=False)
    m = fit_expert(bank, scorer, task, f"{task.name}-lora", "lora", None, cfg)
    res = evaluate(bank, scorer, task, f"{task.name}-lora", shard=eval_shard())  # a collective on every rank
    if global_rank(args.devices) == 0:
        bank.save(args.out)
        print(f"{task.name}: test accuracy {res['accuracy']:.3f} on {res['n']} examples (majority "
              f"{res['majority']:.3f}) after {m['steps']} steps on {args.devices} processes, {m['train_seconds']} s; "
              f"bank saved to {args.out}")


if __name__ == "__main__":
    main()
