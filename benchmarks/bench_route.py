"""Accuracy benchmark: zero-shot routing across a library of LoRA experts on held-out tasks (issue 9).

    python benchmarks/bench_route.py --config configs/route-heldout.yaml [--phase train|gate|eval|all]

Per seed, into ``benchmarks/work/route/seed<S>/bank`` (git-ignored, resumable: what is there is kept):
``train`` one LoRA expert per task of ``experts`` and one multitask LoRA on their union; ``gate`` PHATGOOSE
gates and retrieval centroids for every expert (``mtpeft gate``); ``eval`` `mtpeft route`'s evaluation
(``mtpeft.zeroshot.route_eval``) on the ``heldout`` tasks. Writes ``benchmarks/results/route_heldout.json``:
per seed and method the accuracy on each held-out task, mean and std over seeds, and the share of each
held-out tweet task's routing mass that went to the tweet experts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's mtpeft, not an installed one

from common import save

ROOT = Path(__file__).resolve().parent.parent
WORK_ROOT = ROOT / "benchmarks" / "work"
WORK = WORK_ROOT / "route"  # the default config's; a config with `name: X` works under benchmarks/work/X


def load_config(path) -> dict:
    from mtpeft.io import read_config

    return read_config(path, what="benchmark config")


def capped(name: str, conf: dict, seed: int, train: bool = True):
    from mtpeft import load_builtin

    task = load_builtin(name, seed=seed)
    task = task.cap(conf["max_train"], seed=seed, splits=["train"]).cap(conf["max_val"], seed=seed,
                                                                        splits=["validation"])
    return task.cap(conf["max_test"], seed=seed, splits=["test"])


def setup(bank, scorer, conf: dict):
    """The benchmark's machine settings: torch threads (1 on a shared machine: no thread waits on a descheduled
    peer) and the scorer's input length (tokens; shorter inputs make every phase cheaper, the same for all)."""
    import torch

    torch.set_num_threads(int(conf.get("threads", 1)))
    scorer.max_length = int(conf.get("max_length", scorer.max_length))
    return bank, scorer


def bank_dir(seed: int) -> Path:
    return WORK / f"seed{seed}" / "bank"


def train_seed(conf: dict, seed: int) -> None:
    """The experts and the multitask module of one seed; each saved as soon as it is trained."""
    from mtpeft import TrainConfig
    from mtpeft.api import load_bank_or_new, parse_options
    from mtpeft.train import fit_expert, fit_multitask

    path = bank_dir(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    bank, scorer = setup(*load_bank_or_new(conf["backbone"], path), conf)
    options = parse_options(conf["module"], [f"{k}={json.dumps(v)}" for k, v in conf["options"].items()])
    cfg = TrainConfig(lr=conf["lr"], batch_size=conf["batch_size"], max_epochs=100, max_steps=conf["max_steps"],
                      patience=conf["patience"], val_check_interval=conf["val_every"], seed=seed, progress=False)
    tasks = [capped(n, conf, seed) for n in conf["experts"]]
    for t in tasks:
        name = f"{t.name}-{conf['module']}"
        if name in bank.names:
            continue
        t0 = time.perf_counter()
        m = fit_expert(bank, scorer, t, name, conf["module"], options, cfg)
        bank.save(path, only=[name])
        print(f"seed {seed}: {name} trained in {time.perf_counter() - t0:.0f} s (best val {m['best_val_acc']})",
              flush=True)
    name = f"multitask-{conf['module']}"
    if name not in bank.names:
        t0 = time.perf_counter()
        mcfg = TrainConfig(**{**cfg.__dict__, "max_steps": conf["multitask_steps"]})
        m = fit_multitask(bank, scorer, tasks, name, conf["module"], options, mcfg)
        bank.save(path, only=[name])
        print(f"seed {seed}: {name} trained in {time.perf_counter() - t0:.0f} s (best val {m['best_val_acc']})",
              flush=True)


def gate_seed(conf: dict, seed: int) -> None:
    """PHATGOOSE gates and retrieval centroids for every expert of the seed's bank (what `mtpeft gate` does), on
    the same capped training data the experts saw; skips experts gated already."""
    from mtpeft import TrainConfig
    from mtpeft.api import open_bank
    from mtpeft.gates import prepare_expert
    from mtpeft.routers.phatgoose import has_gates

    path = bank_dir(seed)
    bank, scorer = setup(*open_bank(path), conf)
    cfg = TrainConfig(batch_size=conf["batch_size"], seed=seed, progress=False)
    for t in conf["experts"]:
        name = f"{t}-{conf['module']}"
        if has_gates(bank, name):
            continue
        out = prepare_expert(bank, scorer, capped(t, conf, seed), name, cfg, steps=conf["gate_steps"],
                             lr=conf["gate_lr"])
        bank.save(path, only=[name])
        print(f"seed {seed}: {name} gated: {out}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "route-heldout.yaml"))
    p.add_argument("--phase", default="all", choices=["prepare", "train", "gate", "eval", "all"],
                   help="prepare: train then gate, seed by seed; all: prepare then eval")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the config's seeds")
    p.add_argument("--again", action="store_true", help="re-evaluate seeds that have a report already")
    p.add_argument("--no-summary", action="store_true", help="eval: write the per-seed reports only")
    args = p.parse_args(argv)
    conf = load_config(args.config)
    global WORK
    if conf.get("name", "route_heldout") != "route_heldout":  # a variant keeps its banks and JSON apart
        WORK = WORK_ROOT / str(conf["name"])
    seeds = args.seeds if args.seeds is not None else conf["seeds"]
    t0 = time.perf_counter()
    for s in seeds:
        if args.phase in ("train", "prepare", "all"):
            train_seed(conf, s)
        if args.phase in ("gate", "prepare", "all"):
            gate_seed(conf, s)
    if args.phase in ("eval", "all"):
        if args.no_summary:
            for s in seeds:
                eval_seed(conf, s, args.again)
        else:
            evaluate_all(conf, seeds, args, time.perf_counter() - t0)
    print(f"done in {time.perf_counter() - t0:.0f} s")


ORDER = ["zero-shot", "phatgoose", "arrow", "retrieval", "average", "merge-uniform", "merge-ties", "multitask",
         "oracle expert", "majority"]


def eval_seed(conf: dict, seed: int, again: bool = False) -> dict:
    """`mtpeft route`'s evaluation of the held-out tasks on one seed's bank; report.json and heatmaps under
    ``benchmarks/work/route/seed<S>/report`` (kept: a later run reads it back unless ``again``)."""
    from mtpeft.io import read_json

    out = WORK / f"seed{seed}" / "report"
    if (out / "report.json").exists() and not again:
        return read_json(out / "report.json", what="route report")
    from mtpeft.api import open_bank
    from mtpeft.route_report import write_report
    from mtpeft.zeroshot import route_eval

    bank, scorer = setup(*open_bank(bank_dir(seed)), conf)
    tasks = [capped(n, conf, seed) for n in conf["heldout"]]
    report = route_eval(bank, scorer, tasks, conf["routers"], seed=seed,
                        log=lambda m: print(f"seed {seed}: {m}", flush=True))
    report["files"] = write_report(report, out)
    return report


def _ms(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "runs": xs}


def summarise(reports: list[dict], conf: dict) -> dict:
    names = conf["heldout"]
    methods = [r["method"] for r in reports[0]["rows"]]
    acc = {m: {**{t: _ms([next(r for r in rep["rows"] if r["method"] == m)["accuracy"][t] for rep in reports])
                  for t in names},
               "average": _ms([next(r for r in rep["rows"] if r["method"] == m)["mean"] for rep in reports])}
           for m in methods}
    tweet_experts = [i for i, t in enumerate(reports[0]["expert_tasks"]) if t.startswith("tweet_")]
    share = {}
    for router in reports[0]["routing"]:
        share[router] = {t: _ms([sum(rep["routing"][router]["overall"][j][i] for i in tweet_experts) for rep in reports])
                         for j, t in enumerate(names) if t.startswith("tweet_")}
    avg = lambda m: acc[m]["average"]["mean"] if m in acc else None
    checks = {}
    for m in ("phatgoose", "arrow"):
        if m in acc:
            for other in ("zero-shot", "merge-uniform"):
                if other in acc:
                    checks[f"{m} > {other} (mean over held-out tasks)"] = avg(m) > avg(other)
    for router, per in share.items():
        if router in ("phatgoose", "arrow", "retrieval"):
            for t, v in per.items():
                checks[f"{router}: {t} routes mostly to the tweet experts"] = v["mean"] > 0.5
    return {"accuracy": acc, "tweet_share": share, "checks": checks}


def evaluate_all(conf, seeds, args, elapsed):
    t0 = time.perf_counter()
    reports = [eval_seed(conf, s, args.again) for s in seeds]
    for rep in reports:  # the per-site breakdown stays in the per-seed report.json under benchmarks/work/
        for rt in rep["routing"].values():
            rt.pop("per_site", None)
            rt.pop("recorded", None)
    command = "python benchmarks/bench_route.py " + " ".join(shlex.quote(a) for a in (argv_of(args)))
    ran_as = ("the same work split over three processes, one per seed, on the shared 2-core machine: "
              "`--phase prepare --seeds S` (nice 10, then 5), then `--phase gate --seeds S` and "
              "`--phase eval --seeds S --no-summary` (nice 0, to finish in time) for S in 0 1 2; then this "
              "command, which reads the per-seed reports under benchmarks/work/route/")
    payload = {"command": command, "ran_as": ran_as, "config": conf, "seeds": seeds, "experts": reports[0]["experts"],
               "expert_tasks": reports[0]["expert_tasks"], "multitask": reports[0]["multitask"],
               "tasks": reports[0]["tasks"], **summarise(reports, conf), "per_seed": reports,
               "eval_seconds": round(time.perf_counter() - t0, 1), "seconds_before_eval": round(elapsed, 1)}
    save(str(conf.get("name", "route_heldout")), payload, quiet=True)
    print(markdown_table(payload))


def argv_of(args) -> list[str]:
    out = ["--config", os.path.relpath(args.config, ROOT)]
    if args.seeds is not None:
        out += ["--seeds", *map(str, args.seeds)]
    return out


def markdown_table(d: dict) -> str:
    """The README's table: mean ± std over the seeds, per held-out task and averaged."""
    names = [t["task"] for t in d["tasks"]]
    lines = ["| method | " + " | ".join(f"`{n}`" for n in names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
    fmt = lambda v: f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
    for m in sorted(d["accuracy"], key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        a = d["accuracy"][m]
        label = m + " (picked with labels)" if m == "oracle expert" else m
        lines.append(f"| {label} | " + " | ".join(fmt(a[n]) for n in names) + f" | {fmt(a['average'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
