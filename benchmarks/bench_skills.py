"""Accuracy benchmark: skills shared across tasks (Poly, MHR) against one shared LoRA and one expert per task.

    nice -n 10 python benchmarks/bench_skills.py --config configs/skills-multitask.yaml [--seeds 0 1 2] [--splits 4]

Per seed, on the config's tasks and backbone, four contenders at equal total steps:
- ``poly``: ``skills`` LoRA skills and a per-layer task-skill routing matrix, trained on the task mixture
  (``max_steps`` steps; routing logits at ``router_lr``);
- ``mhr``: the same with ``--splits`` heads per layer;
- ``shared``: one LoRA trained on the mixture (``max_steps`` steps), routed to every task;
- ``experts``: one LoRA per task, ``max_steps / number of tasks`` steps each.
Each contender's test accuracy per task, its mean over tasks and its trainable parameters; beside them, per seed
(the tasks' caps draw with it), the majority class (the most frequent train label) and the bare backbone's
zero-shot accuracy. Every finished run is kept in ``--work`` (``<backbone>/seed<S>/<contender>.json``,
``baselines.json``; git-ignored) and reused, so an interrupted benchmark resumes. Writes
``benchmarks/results/skills.json``: the runs, per contender and baseline the mean and std over seeds, and the
command (``reproduce``).

``--quick``: a smoke run on the tiny random BERT, one seed, a few examples and steps (tests).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's mtpeft, not an installed one

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "skills"
CONTENDERS = ("poly", "mhr", "shared", "experts")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "skills-multitask.yaml"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--splits", type=int, default=4, help="MHR heads per layer (default 4)")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--tasks", nargs="+", default=None, help="override the config's tasks (NAME or NAME=PATH)")
    p.add_argument("--backbone", default=None, help="override the config's backbone")
    p.add_argument("--max-examples", type=int, default=None, help="override the config's cap per split and task")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's steps per multitask run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared machine)")
    p.add_argument("--work", default=str(WORK), help="where finished runs are kept (resumable)")
    p.add_argument("--out", default=None, help="the results file (default benchmarks/results/skills.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-bert, one seed, few examples and steps")
    return p.parse_args(argv)


def settings(a) -> dict:
    """The run file's settings, with the command line's overrides (and --quick's caps)."""
    from mtpeft.cli.train import TRAIN_DEFAULTS, load_run_config

    s = {**TRAIN_DEFAULTS, **load_run_config(a.config)}
    for key in ("tasks", "backbone", "max_examples", "max_steps"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    if a.quick:
        s.update(backbone="tiny-bert", max_examples=min(s["max_examples"] or 24, 24),
                 max_steps=min(s["max_steps"] if s["max_steps"] > 0 else 4, 4), skills=min(s["skills"], 3),
                 options={**s["options"], "r": 2})
    if s["max_steps"] < 1:
        raise SystemExit("bench_skills: the runs compare at equal total steps; give max_steps (config or --max-steps)")
    return s


def _params(bank, names) -> int:
    return sum(p.numel() for n in names for p in bank.module_parameters(n).values())


def run_one(s: dict, contender: str, seed: int, a) -> dict:
    from mtpeft.api import load_bank_or_new
    from mtpeft.skills import evaluate_skills, fit_skills
    from mtpeft.suite import load_task
    from mtpeft.train import TrainConfig, evaluate, fit_expert, fit_multitask

    tasks = [load_task(t, max_examples=s["max_examples"], seed=seed) for t in s["tasks"]]
    bank, scorer = load_bank_or_new(s["backbone"])
    steps = s["max_steps"] if contender != "experts" else max(1, s["max_steps"] // len(tasks))
    cfg = TrainConfig(lr=s["lr"], batch_size=s["batch_size"], max_epochs=s["max_epochs"], max_steps=steps,
                      patience=s["patience"], seed=seed, progress=False)
    opts = dict(s["options"])
    if contender in ("poly", "mhr"):
        router, m = fit_skills(bank, scorer, tasks, contender, s["skills"], a.splits if contender == "mhr" else None,
                               s["module"], opts, cfg, router_lr=s["router_lr"],
                               shared_routing=bool(s["shared_routing"]), name=contender, sampling=s["sampling"])
        rows = [evaluate_skills(bank, scorer, t, router) for t in tasks]
        params = _params(bank, router.module_names) + router.logits.numel()
        fits = [m]
    elif contender == "shared":
        m = fit_multitask(bank, scorer, tasks, "shared", s["module"], opts, cfg, sampling=s["sampling"])
        rows = [evaluate(bank, scorer, t, "shared") for t in tasks]
        params, fits = _params(bank, ["shared"]), [m]
    else:
        fits = [fit_expert(bank, scorer, t, f"{t.name}-lora", s["module"], opts, cfg) for t in tasks]
        rows = [evaluate(bank, scorer, t, f"{t.name}-lora") for t in tasks]
        params = _params(bank, [f"{t.name}-lora" for t in tasks])
    acc = {r["task"]: round(r["accuracy"], 4) for r in rows}
    return {"contender": contender, "seed": seed, "backbone": s["backbone"], "accuracy": acc,
            "mean_accuracy": round(statistics.fmean(acc.values()), 4), "trainable_parameters": int(params),
            "steps": sum(f["steps"] for f in fits), "train_seconds": round(sum(f["train_seconds"] for f in fits), 1)}


def run_baselines(s: dict, seed: int) -> dict:
    """The majority class and the bare backbone's zero-shot accuracy on each task's test split (seed's caps)."""
    from mtpeft.api import load_bank_or_new
    from mtpeft.suite import load_task
    from mtpeft.train import evaluate

    tasks = [load_task(t, max_examples=s["max_examples"], seed=seed) for t in s["tasks"]]
    bank, scorer = load_bank_or_new(s["backbone"])
    return {"seed": seed, "majority": {t.name: round(t.majority_baseline("test"), 4) for t in tasks},
            "zero_shot": {t.name: round(evaluate(bank, scorer, t)["accuracy"], 4) for t in tasks}}


def aggregate_baselines(rows: list[dict]) -> dict:
    """Per baseline: mean and std over seeds of the mean over tasks and of each task's accuracy."""
    return {k: {"mean_accuracy": _stat(statistics.fmean(r[k].values()) for r in rows),
                "per_task": {t: _stat(r[k][t] for r in rows) for t in rows[0][k]}} for k in ("majority", "zero_shot")}


def _cached(path: Path, key: dict, compute, extra: dict | None = None):
    """A finished run read from ``path`` when it was made with these settings, else computed and written."""
    from mtpeft.io import read_json, write_json

    prev = read_json(path, what="benchmark run") if path.is_file() else None
    if isinstance(prev, dict) and prev.get("settings") == key and all(prev.get(k) == v
                                                                      for k, v in (extra or {}).items()):
        return prev["run"]
    run = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"settings": key, **(extra or {}), "run": run})
    return run


def _stat(xs) -> dict:
    from common import seed_stat  # common imports torch: not at module level (--help stays quick)

    return seed_stat(xs)


def aggregate(runs: list[dict]) -> dict:
    """Per contender: mean and std over seeds of the mean accuracy and of each task's accuracy; parameters."""
    out = {}
    for c in dict.fromkeys(r["contender"] for r in runs):
        rs = [r for r in runs if r["contender"] == c]
        out[c] = {"mean_accuracy": _stat(r["mean_accuracy"] for r in rs),
                  "per_task": {t: _stat(r["accuracy"][t] for r in rs) for t in rs[0]["accuracy"]},
                  "trainable_parameters": rs[0]["trainable_parameters"],
                  "steps": rs[0]["steps"], "train_seconds": _stat(r["train_seconds"] for r in rs)}
    return out


def main(argv=None) -> dict:
    a = parse(argv)
    import torch
    from common import RESULTS, environment

    from mtpeft.io import write_json

    torch.set_num_threads(a.threads)
    s = settings(a)
    seeds = [0] if a.quick else a.seeds
    runs, baselines = [], []
    key = json.loads(json.dumps(s, default=str))  # every setting: a changed config reruns
    for seed in seeds:
        where = Path(a.work) / s["backbone"] / f"seed{seed}"
        for c in a.contenders:
            # the splits are part of every run's record; only MHR's result depends on them
            runs.append(_cached(where / f"{c}.json", key, lambda c=c, seed=seed: run_one(s, c, seed, a),
                                {"splits": a.splits} if c == "mhr" else None))
            r = runs[-1]
            print(f"seed {seed} {c}: mean accuracy {r['mean_accuracy']} ({r['trainable_parameters']:,} parameters, "
                  f"{r['train_seconds']} s)", flush=True)
        baselines.append(_cached(where / "baselines.json", key, lambda seed=seed: run_baselines(s, seed)))
    cmd = "python benchmarks/bench_skills.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"benchmark": "skills", "environment": environment(), "quick": a.quick, "settings": s,
               "mhr_splits": a.splits, "reproduce": cmd.strip(), "by_contender": aggregate(runs), "runs": runs,
               "baselines": aggregate_baselines(baselines), "baseline_runs": baselines}
    path = Path(a.out) if a.out else RESULTS / "skills.json"
    write_json(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
