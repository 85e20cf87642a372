"""Same seed, same results? `mtpeft train` on a real backbone, each run in a fresh process, at 1 and 2 threads.

`python benchmarks/bench_determinism.py [--backbone minilm] [--task tweet_apple] [--max-steps 20]`: trains one
LoRA expert (dropout 0.1) twice at each thread count (OMP_NUM_THREADS), compares the sha256 of the weights
file each run saved and the test accuracy; writes benchmarks/results/determinism.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import save

ROOT = Path(__file__).resolve().parent.parent


def one_run(args, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-c", "import sys; from mtpeft.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", "--backbone", args.backbone, "--task", args.task, "--max-examples", str(args.max_examples),
           "--max-steps", str(args.max_steps), "--option", "dropout=0.1", "--seed", str(args.seed),
           "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    row = json.loads(res.stdout)["results"][0]
    manifest = json.loads((out / "manifest.json").read_text())
    return {"threads": threads, "sha256": manifest["modules"][0]["sha256"], "accuracy": row["accuracy"],
            "steps": row["steps"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--task", default="tweet_apple")
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for k, threads in enumerate([t for t in args.threads for _ in range(2)]):
            runs.append(one_run(args, threads, Path(d) / f"bank{k}"))
            print(runs[-1], flush=True)
    by = {t: [r for r in runs if r["threads"] == t] for t in args.threads}
    same_threads = {str(t): len({r["sha256"] for r in rs}) == 1 for t, rs in by.items()}
    across = len({rs[0]["sha256"] for rs in by.values()}) == 1
    save("determinism", {"backbone": args.backbone, "task": args.task, "max_examples": args.max_examples,
                         "max_steps": args.max_steps, "runs": runs,
                         "bit_identical_at_same_threads": same_threads, "bit_identical_across_threads": across})


if __name__ == "__main__":
    main()
