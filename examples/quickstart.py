"""Quickstart (`make demo`): the bare MiniLM zero-shot on real tasks, then one LoRA expert per task.

Everything runs offline on the shipped backbone and data, on CPU, in a few minutes. The run's settings
are configs/quickstart-lora.yaml, the same file `mtpeft train --config` takes. Prints a table and
writes the bank to runs/quickstart-bank (inspect it with `mtpeft bank ls runs/quickstart-bank`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mtpeft import TrainConfig, expert_vs_zero_shot, load_builtin
from mtpeft.api import new_bank, parse_options
from mtpeft.cli import load_run_config, table

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart-lora.yaml"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--tasks", nargs="+", default=None, help="override the config's tasks")
    p.add_argument("--max-examples", type=int, default=None, help="override the config's cap per split")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's step cap")
    p.add_argument("--out", default="runs/quickstart-bank")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    conf = load_run_config(args.config)
    tasks = args.tasks or conf["tasks"]
    max_examples = args.max_examples or conf.get("max_examples")
    module = conf.get("module", "lora")
    options = parse_options(module, [f"{k}={json.dumps(v)}" for k, v in conf.get("options", {}).items()])
    cfg = TrainConfig(lr=conf.get("lr", 1e-3), batch_size=conf.get("batch_size", 16),
                      max_epochs=conf.get("max_epochs", 3), max_steps=args.max_steps or conf.get("max_steps", -1),
                      patience=conf.get("patience", 2), seed=conf.get("seed", 0), progress=not args.json)

    t0 = time.perf_counter()
    bank, scorer = new_bank(conf.get("backbone", "minilm"))
    rows = []
    for name in tasks:
        task = load_builtin(name, max_examples=max_examples, seed=cfg.seed)
        rows.append(expert_vs_zero_shot(bank, scorer, task, module, options, cfg))
        if not args.json:
            print(table(rows[-1:], list(rows[-1])), flush=True)
    bank.save(args.out)
    result = {"backbone": bank.backbone.name, "module": module, "bank": args.out, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\n{bank.backbone.name}: zero-shot vs one {module} expert per task, task-id routing (test accuracy)")
        print(table(rows, ["task", "n", "labels", "majority", "zero_shot", "expert", "steps", "train_s"]))
        print(f"\nbank written to {args.out}; total {result['seconds']} s")


if __name__ == "__main__":
    main()
