"""Accuracy benchmark: few-shot transfer to held-out tasks from a bank of experts (issue 11).

    python benchmarks/bench_adapt.py --config configs/adapt-fewshot.yaml [--targets T ...] [--seeds 0 1 2]

Into ``benchmarks/work/adapt/`` (git-ignored, resumable: experts, Fisher embeddings and finished runs are kept):
one LoRA expert per task of ``experts`` (seed ``expert_seed``) with its Fisher embedding, and, where the config has
a ``skills:`` block (needed by the methods poly, mhr-z and mhr-mu), one Poly/MHR skill inventory trained on the
mixture of the same tasks into the same bank (``BANK/routers/skills/``; skills name no task, so they are never
source experts), then for each target task `mtpeft adapt`'s loop (``mtpeft.adapt.run_adapt``): every method at
every shot count and seed, scored on the whole test split. Writes ``benchmarks/results/adapt.json``: per target and
overall, method x shots mean and std over seeds, parameters trained per method, the zero-shot and majority
baselines, the Fisher similarity of the experts to each target, the issue's checks (pi-tuning, lorahub and mhr-z
beat scratch at 16 and 64 shots) and the command.

``--quick``: a smoke run on the tiny random BERT with synthetic tasks, one seed, a few examples and steps.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's mtpeft, not an installed one

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "adapt"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "adapt-fewshot.yaml"))
    p.add_argument("--targets", nargs="+", default=None, help="override the config's held-out target tasks")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="override the config's seeds")
    p.add_argument("--shots", nargs="+", type=int, default=None, help="override the config's shots")
    p.add_argument("--work", default=str(WORK), help="where the bank and the per-target reports go (resumable)")
    p.add_argument("--out", default=None, help="the results file (default benchmarks/results/adapt.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-bert, synthetic tasks, few steps")
    return p.parse_args(argv)


def synthetic(name: str, seed: int, labels=("red", "blue"), n: int = 48):
    """A learnable two-class task (a synonym of the label word in the text), for --quick."""
    import random

    from datasets import DatasetDict

    from mtpeft.tasks import Task, make_dataset

    rng = random.Random(seed)
    cue = {0: ["apple", "cherry", "ruby"], 1: ["sky", "ocean", "sapphire"]}
    filler = ["the", "a", "one", "some", "big", "small", "old", "new"]

    def split(k):
        rows = [(" ".join(rng.sample(filler, 3) + [rng.choice(cue[i % 2])]), i % 2) for i in range(k)]
        return make_dataset([r[0] for r in rows], [r[1] for r in rows])

    return Task(name, DatasetDict(train=split(n), validation=split(16), test=split(24)), list(labels))


QUICK = {"backbone": "tiny-bert", "module": "lora", "options": {"r": 4, "alpha": 8, "dropout": 0.0},
         "experts": ["quick_src", "quick_flip"], "heldout": ["quick_target"], "expert_seed": 0, "lr": 0.03,
         "batch_size": 16, "max_steps": 20, "val_every": 10, "patience": 3, "threads": 1, "seeds": [0],
         "shots": [2, 4], "methods": ["scratch", "best-source", "lorahub", "pi-tuning", "poly", "mhr-z", "mhr-mu"],
         "skills": {"router": "mhr", "skills": 2, "splits": 2, "max_steps": 10, "router_lr": 0.1},
         "adapt": {"steps": 3, "lr": 0.02, "batch_size": 8, "lorahub_evals": 5, "top_k": 2, "interp_steps": 2,
                   "probe_steps": 2, "fisher_batches": 2}}
SKILLS = "skills"  # the inventory's name in the bank
SKILL_KEYS = {"router", "skills", "splits", "max_steps", "router_lr"}


def skills_conf(conf: dict) -> dict | None:
    """The config's ``skills:`` block, checked; None where no method adapts skills. A method that needs skills
    without the block is refused before anything trains."""
    from mtpeft.adapt import get_method
    from mtpeft.errors import MtpeftError

    needs = [m for m in conf["methods"] if get_method(m).needs_skills]
    if not needs:
        return None
    sk = conf.get("skills")
    if not isinstance(sk, dict) or set(sk) - SKILL_KEYS or not {"router", "skills", "max_steps"} <= set(sk):
        raise MtpeftError(f"methods {needs} adapt a skill inventory: give the config a `skills:` block with router "
                          f"(poly|mhr), skills, max_steps and optionally splits and router_lr (got {sk!r})")
    return sk


def load_task(name: str, conf: dict, quick: bool, expert: bool):
    if quick:
        return {"quick_src": lambda: synthetic(name, 1), "quick_flip": lambda: synthetic(name, 2, ("blue", "red")),
                "quick_target": lambda: synthetic(name, 5)}[name]()
    from mtpeft import load_builtin

    seed = conf["expert_seed"]
    task = load_builtin(name, seed=seed)
    if expert:  # the experts' capped data; a target keeps its whole train split (to draw shots) and test split
        task = task.cap(conf["max_train"], seed=seed, splits=["train"]).cap(conf["max_val"], seed=seed,
                                                                            splits=["validation"])
    return task


def build_bank(conf: dict, work: Path, quick: bool):
    """The experts (each saved as soon as it is trained) and their Fisher embeddings."""
    import torch

    from mtpeft import TrainConfig
    from mtpeft.adapt import Budget
    from mtpeft.adapt.fisher import has_fisher, store_fisher
    from mtpeft.adapt.run import probe_settings
    from mtpeft.api import load_bank_or_new, parse_options
    from mtpeft.train import fit_expert

    path = work / "bank"
    path.parent.mkdir(parents=True, exist_ok=True)
    bank, scorer = load_bank_or_new(conf["backbone"], path)
    torch.set_num_threads(int(conf.get("threads", 1)))
    if "max_length" in conf:
        scorer.max_length = int(conf["max_length"])
    options = parse_options(conf["module"], [f"{k}={json.dumps(v)}" for k, v in conf["options"].items()])
    cfg = TrainConfig(lr=conf["lr"], batch_size=conf["batch_size"], max_epochs=100, max_steps=conf["max_steps"],
                      patience=conf["patience"], val_check_interval=conf["val_every"], seed=conf["expert_seed"],
                      progress=False)
    budget = Budget.from_dict(conf["adapt"])
    tasks = {}
    for t in conf["experts"]:
        name = f"{t}-{conf['module']}"
        task = None
        if name not in bank.names:
            task = load_task(t, conf, quick, expert=True)
            t0 = time.perf_counter()
            m = fit_expert(bank, scorer, task, name, conf["module"], options, cfg)
            bank.save(path, only=[name])
            print(f"{name} trained in {time.perf_counter() - t0:.0f} s (best val {m['best_val_acc']})", flush=True)
        if not has_fisher(bank, name):
            task = task or load_task(t, conf, quick, expert=True)
            store_fisher(bank, scorer, task, name, seed=conf["expert_seed"], **probe_settings(budget))
            bank.save(path, only=[name])
        if task is not None:
            tasks[t] = task
    skills = build_skills(conf, bank, scorer, path, options, cfg, tasks, quick)
    return bank, scorer, path, skills


def build_skills(conf: dict, bank, scorer, path: Path, options, cfg, tasks: dict, quick: bool):
    """The skill inventory on the mixture of the expert tasks (``skills:``; trained once, saved with the bank and
    its router), or None where no method adapts skills."""
    import dataclasses

    from mtpeft.skills import fit_skills, load_skills, save_skills, saved_skills

    sk = skills_conf(conf)
    if sk is None:
        return None
    if SKILLS in saved_skills(path):
        return load_skills(bank, path, SKILLS)
    mix = [tasks.get(t) or load_task(t, conf, quick, expert=True) for t in conf["experts"]]
    t0 = time.perf_counter()
    router, m = fit_skills(bank, scorer, mix, sk["router"], sk["skills"], sk.get("splits"), conf["module"], options,
                           dataclasses.replace(cfg, max_steps=sk["max_steps"]), router_lr=sk.get("router_lr", 0.1),
                           name=SKILLS)
    bank.save(path, only=list(router.module_names))
    save_skills(router, path, SKILLS)
    print(f"{sk['router']} skills ({sk['skills']}) trained in {time.perf_counter() - t0:.0f} s (best val "
          f"{m['best_val_acc']})", flush=True)
    return router


def _stat(xs) -> dict:
    from common import seed_stat  # common imports torch: not at module level (--help stays quick)

    return seed_stat(xs)


def summarise(reports: dict, conf: dict) -> dict:
    """Per target (the report's own table) and over targets (each seed's mean over the targets, then mean and std
    over seeds); the issue's checks on the overall means."""
    methods, shots, seeds = conf["methods"], conf["shots"], conf["seeds"]
    overall = {}
    for m in methods:
        for k in shots:
            per_seed = []
            for s in seeds:
                accs = [r["accuracy"] for rep in reports.values() for r in rep["runs"]
                        if r["method"] == m and r["shots"] == k and r["seed"] == s]
                if len(accs) == len(reports):
                    per_seed.append(statistics.fmean(accs))
            if per_seed:
                params = {t: next(r["trainable"] for r in rep["runs"] if r["method"] == m) for t, rep in reports.items()}
                overall[f"{m}@{k}"] = {"method": m, "shots": k, **_stat(per_seed), "trainable": params}
    base = {b: round(statistics.fmean(rep["baselines"][b] for rep in reports.values()), 4)
            for b in ("zero_shot", "majority")}
    checks = {}
    for m in ("pi-tuning", "lorahub", "mhr-z"):
        for k in (16, 64):
            a, b = overall.get(f"{m}@{k}"), overall.get(f"scratch@{k}")
            if a and b:
                checks[f"{m} > scratch at {k} shots (mean over targets)"] = a["mean"] > b["mean"]
    per_target = {t: {"summary": rep["summary"], "baselines": rep["baselines"], "test_n": rep["test_n"],
                      "experts": rep["experts"], "samples": rep["samples"],
                      "similarity": rep["similarity"]} for t, rep in reports.items()}
    return {"overall": overall, "baselines": base, "checks": checks, "per_target": per_target}


def markdown_table(d: dict) -> str:
    """Method x shots over the targets: mean ± std over seeds (accuracy %), parameters trained per target."""
    shots = d["config"]["shots"]
    lines = ["| method | params | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---|---|" + "---|" * len(shots)]
    for m in d["config"]["methods"]:
        cells = []
        params = ""
        for k in shots:
            o = d["overall"].get(f"{m}@{k}")
            cells.append("" if o is None else f"{100 * o['mean']:.1f} ± {100 * o['std']:.1f}")
            if o is not None:
                params = "/".join(sorted({str(v) for v in o["trainable"].values()}))
        lines.append(f"| {m} | {params} | " + " | ".join(cells) + " |")
    for b in ("zero_shot", "majority"):
        lines.append(f"| {b.replace('_', '-')} | 0 | " + " | ".join(f"{100 * d['baselines'][b]:.1f}" for _ in shots) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse(argv)
    from common import RESULTS, environment

    from mtpeft.adapt import Budget, run_adapt
    from mtpeft.adapt.run import check_methods
    from mtpeft.io import read_config, write_json

    conf = dict(QUICK) if a.quick else read_config(a.config, what="benchmark config")
    check_methods(conf["methods"])  # an unknown method, a bad budget or a missing skills block fails before training
    Budget.from_dict(conf["adapt"])
    skills_conf(conf)
    for key, v in (("heldout", a.targets), ("seeds", a.seeds), ("shots", a.shots)):
        if v is not None:
            conf[key] = v
    work = Path(a.work) / ("quick" if a.quick else "")
    t0 = time.perf_counter()
    bank, scorer, _, skills = build_bank(conf, work, a.quick)
    budget = Budget.from_dict(conf["adapt"])
    reports = {}
    path = Path(a.out) if a.out else RESULTS / "adapt.json"
    argv_list = list(argv if argv is not None else sys.argv[1:])
    command = "python benchmarks/bench_adapt.py " + " ".join(shlex.quote(x) for x in argv_list)
    for t in conf["heldout"]:
        task = load_task(t, conf, a.quick, expert=False)
        reports[t] = run_adapt(bank, scorer, task, conf["shots"], conf["methods"], conf["seeds"], budget,
                               out=work / "reports" / t, log=lambda msg, t=t: print(f"{t}: {msg}", flush=True),
                               skills=skills)
        payload = {"benchmark": "adapt", "environment": environment(), "quick": a.quick, "config": conf,
                   "reproduce": command, "complete": len(reports) == len(conf["heldout"]),
                   "seconds": round(time.perf_counter() - t0, 1), **summarise(reports, conf)}
        write_json(path, payload)  # after every target: a stopped benchmark keeps what it measured
    print(markdown_table(payload))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
