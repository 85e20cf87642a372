"""Zero-shot routing across a library of experts, in a few lines of the Python API.

Trains one LoRA expert on each of three built-in tasks (MiniLM, capped), gates each one (PHATGOOSE) and
stores its centroid (retrieval), merges the experts with TIES into one more module, then answers two tasks
no expert was trained on, with no task id: the bare backbone, each router, the merges and the oracle expert.

    .venv/bin/python examples/zero_shot_routing.py [--steps 60] [--max-examples 400] [--out DIR]

The experts' and the gates' training dominate: roughly 10 minutes on 2 cores at the defaults (estimated
from per-step times); `--steps 4 --max-examples 40` runs through every step in about 4 minutes (numbers
meaningless at that size). The same evaluation from the command line: `mtpeft gate` then `mtpeft route`.
"""
from __future__ import annotations

import argparse

EXPERTS = ["tweet_airline", "wordnet_noun", "bbc_topic"]
HELD_OUT = ["tweet_apple", "wordnet_pos"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps per expert")
    ap.add_argument("--max-examples", type=int, default=400, help="cap on every split")
    ap.add_argument("--out", default=None, help="write report.json, report.md and heatmaps here")
    args = ap.parse_args(argv)

    from mtpeft import (
        TrainConfig,
        fit_centroid,
        fit_expert,
        fit_gates,
        load_builtin,
        merge_modules,
        route_eval,
    )
    from mtpeft.api import new_bank

    bank, scorer = new_bank("minilm")
    cfg = TrainConfig(max_steps=args.steps, lr=2e-3, batch_size=16, seed=0, progress=False)
    for name in EXPERTS:
        task = load_builtin(name, max_examples=args.max_examples, seed=0)
        fit_expert(bank, scorer, task, f"{name}-lora", "lora", {"r": 8}, cfg)
        fit_gates(bank, scorer, task, f"{name}-lora", cfg)           # PHATGOOSE gates: expert + backbone frozen
        fit_centroid(bank, scorer, task, f"{name}-lora")             # retrieval centroid
    experts = [f"{n}-lora" for n in EXPERTS]
    merged = merge_modules(bank, experts, "ties-merge", method="ties", density=0.2, rank=8)
    print(f"TIES merge into one rank-8 LoRA: relative truncation error {merged['relative_error']:.3f}")

    held_out = [load_builtin(n, max_examples=args.max_examples, seed=0) for n in HELD_OUT]
    report = route_eval(bank, scorer, held_out, routers=["phatgoose", "arrow", "retrieval", "average",
                                                        "merge-uniform"], experts=experts)
    print(f"{'method':<16}" + "".join(f"{t:>14}" for t in HELD_OUT))
    for row in report["rows"]:
        print(f"{row['method']:<16}" + "".join(f"{100 * row['accuracy'][t]:>13.1f}%" for t in HELD_OUT))
    if args.out:
        from mtpeft.route_report import write_report

        write_report(report, args.out)
        print(f"report and heatmaps in {args.out}")


if __name__ == "__main__":
    main()
