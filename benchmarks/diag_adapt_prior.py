"""Diagnostic: which classes LoraHub's composed module predicts on a held-out task, against the true counts and
against the source expert it leans on (issue 11: why LoraHub beats scratch on tweet_apple and not on
tweet_coachella).

    python benchmarks/diag_adapt_prior.py [--bank benchmarks/work/adapt/bank] \
        [--reports benchmarks/work/adapt/reports] [--shots 16] [--expert tweet_airline-lora]

Reads the bank `bench_adapt.py` built and its finished reports, rebuilds each LoraHub module from the weights the
report holds (`compose_factors`, as `lorahub` does), predicts the whole test split and counts the predictions per
class. Writes `benchmarks/results/adapt_lorahub_prior.json`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", default=str(ROOT / "benchmarks" / "work" / "adapt" / "bank"))
    p.add_argument("--reports", default=str(ROOT / "benchmarks" / "work" / "adapt" / "reports"))
    p.add_argument("--targets", nargs="+", default=["tweet_apple", "tweet_coachella"])
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--expert", default="tweet_airline-lora", help="a source expert to score alone beside")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapt_lorahub_prior.json"))
    a = p.parse_args(argv)
    import numpy as np
    import torch
    from common import environment

    from mtpeft import load_builtin
    from mtpeft.api import load_bank_or_new
    from mtpeft.io import read_json, write_json
    from mtpeft.merge import compose_factors
    from mtpeft.routing import Routing
    from mtpeft.train import predict

    torch.set_num_threads(1)
    bank, scorer = load_bank_or_new("minilm", a.bank)
    bank.freeze()
    out = {"diagnostic": "adapt_lorahub_prior", "environment": environment(),
           "reproduce": " ".join(["python benchmarks/diag_adapt_prior.py", *(argv if argv is not None else sys.argv[1:])]),
           "shots": a.shots, "targets": {}}
    for t in a.targets:
        task = load_builtin(t, seed=0)
        y = np.asarray(task.splits["test"]["label"])
        rep = read_json(Path(a.reports) / t / "adapt-report.json", what="adapt report")
        row = {"labels": list(task.label_names), "true": np.bincount(y, minlength=len(task.label_names)).tolist(),
               "train_share": np.round(np.bincount(task.splits["train"]["label"], minlength=len(task.label_names))
                                       / len(task.splits["train"]), 3).tolist(), "lorahub": []}

        def counts(name, task=task, y=y):
            mid = bank.index(name)
            pred, _ = predict(bank, scorer, task, lambda n, mid=mid: Routing.one_hot([mid] * n))
            pred = pred.numpy()
            return {"accuracy": round(float((pred == y).mean()), 4),
                    "predicted": np.bincount(pred, minlength=len(task.label_names)).tolist()}

        for r in rep["runs"]:
            if r["method"] == "lorahub" and r["shots"] == a.shots:
                w = r["info"]["weights"]
                name = f"diag.{t}.s{r['seed']}"
                compose_factors(bank, list(w), list(w.values()), name)
                try:
                    row["lorahub"].append({"seed": r["seed"], "weights": w, **counts(name)})
                finally:
                    bank.remove(name)
        row["expert"] = {"name": a.expert, **counts(a.expert)}
        for src in rep["experts"]:
            st = bank.record(src).task
            if st and st.startswith("tweet_"):
                ys = np.asarray(load_builtin(st, seed=0).splits["train"]["label"])
                row.setdefault("source_train_share", {})[st] = np.round(np.bincount(ys, minlength=3) / len(ys), 3).tolist()
        out["targets"][t] = row
    write_json(a.out, out)
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
