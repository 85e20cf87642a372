"""Accuracy benchmark: multitask prompt tuning (MPT) by distillation (issue 12).

    nice -n 10 python benchmarks/bench_mpt.py --config configs/mpt-distil.yaml \
        [--backbones minilm smollm2] [--seeds 0 1 2] [--causal-max-examples 200] [--causal-max-steps 100]

Per backbone and seed, `mtpeft distil`'s run (``mtpeft.mpt.run_distil``) into
``benchmarks/work/mpt/<backbone>/seed<S>/bank`` (git-ignored, resumable: teachers, students, baselines and
target modules already there are kept). Writes ``benchmarks/results/mpt.json``: every run's report (per source
task teacher / student / single-task prompt at the student's steps, per target task MPT against prompt tuning
from scratch at equal steps, parameters), per backbone the mean and std over seeds, and the issue's goals:
the student reaches 97% of the teachers' mean accuracy with at most a tenth of their per-task parameters, and
the target stage beats prompt tuning from scratch. The causal backbone (SmolLM2) is capped
(``--causal-max-examples``, ``--causal-max-steps``): on 2 CPU cores it is about 10 times slower than MiniLM.

``--quick``: a smoke run on the tiny random BERT, one seed, a few examples and steps.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's mtpeft, not an installed one

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "mpt"
CAUSAL = ("smollm2", "tiny-llama")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "mpt-distil.yaml"))
    p.add_argument("--backbones", nargs="+", default=["minilm", "smollm2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--causal-max-examples", type=int, default=200, help="per split and task on a causal backbone")
    p.add_argument("--causal-max-steps", type=int, default=100, help="per fit on a causal backbone")
    p.add_argument("--sources", nargs="+", default=None, help="override the config's sources (NAME or NAME=PATH)")
    p.add_argument("--targets", nargs="+", default=None, help="override the config's targets")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared machine)")
    p.add_argument("--work", default=str(WORK), help="where the banks go (resumable)")
    p.add_argument("--out", default=None, help="the results file (default benchmarks/results/mpt.json)")
    p.add_argument("--append", action="store_true",
                   help="keep the runs of other (backbone, seed) pairs already in --out (same config), so seeds can "
                        "run as separate processes into one file")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-bert, one seed, few examples and steps")
    return p.parse_args(argv)


def earlier_runs(path: Path, config: dict, mine: set) -> list[dict]:
    """The runs in ``path`` of (backbone, seed) pairs not in ``mine``; refused when its config differs."""
    if not path.exists():
        return []
    from mtpeft.io import read_json

    old = read_json(path, "MPT results")
    if old.get("config") != config:
        diff = sorted(k for k in set(old.get("config", {})) | set(config) if old.get("config", {}).get(k) != config.get(k))
        raise SystemExit(f"--append: {path} was measured with another config (keys {', '.join(diff)} differ); "
                         "give another --out or drop --append")
    return [r for r in old.get("runs", []) if (r["backbone"], r["seed"]) not in mine]


def run_one(cfg, backbone: str, seed: int, a) -> dict:
    from mtpeft.mpt import run_distil

    causal = backbone in CAUSAL
    cfg = replace(cfg, backbone=backbone, seed=seed)
    cap = 24 if a.quick else (a.causal_max_examples if causal else None)
    steps = 2 if a.quick else (a.causal_max_steps if causal else None)
    out = Path(a.work) / backbone / f"seed{seed}" / "bank"
    out.parent.mkdir(parents=True, exist_ok=True)
    rep = run_distil(cfg, out, max_steps=steps, max_examples=cap, progress=False)
    return {"backbone": backbone, "seed": seed, "max_examples": cap or cfg.max_examples, "max_steps_cap": steps,
            **{k: rep[k] for k in ("sources", "targets", "parameters", "summary", "student", "teachers")}}


def _stat(xs) -> dict:
    from common import seed_stat  # common imports torch: not at module level (--help stays quick)

    return seed_stat(xs)


def aggregate(runs: list[dict]) -> dict:
    """Per backbone: mean and std over seeds of the summary figures, and the goals."""
    out = {}
    for bb in dict.fromkeys(r["backbone"] for r in runs):
        rs = [r for r in runs if r["backbone"] == bb]
        keys = ("teacher_mean", "student_mean", "prompt_eq_mean", "student_over_teacher", "zero_shot_mean",
                "majority_mean", "target_mpt_mean", "target_prompt_mean", "target_zero_shot_mean", "target_majority_mean")
        agg = {k: _stat(r["summary"].get(k) for r in rs) for k in keys}
        p = rs[0]["parameters"]
        agg["parameters"] = p
        sot, tm, tp = (agg[k]["mean"] for k in ("student_over_teacher", "target_mpt_mean", "target_prompt_mean"))
        agg["goals"] = {
            "student/teacher accuracy >= 0.97": None if sot is None else sot >= 0.97,
            "student/teacher parameters per task <= 0.1": p["student_over_teacher"] <= 0.1,
            "target MPT > prompt tuning from scratch": None if tm is None or tp is None else tm > tp,
        }
        out[bb] = agg
    return out


def _command_for(argv: list[str], seeds: list[int]) -> str:
    """``argv`` with its ``--seeds`` replaced by ``seeds``: the one command that reproduces every run in the file."""
    out, skip = [], False
    for x in argv:
        if x == "--seeds":
            skip = True
            continue
        if skip and x.lstrip("-").isdigit():
            continue
        skip = False
        out.append(x)
    return "python benchmarks/bench_mpt.py " + " ".join(out + ["--seeds", *map(str, seeds)])


def main(argv=None) -> dict:
    a = parse(argv)
    import torch
    from common import RESULTS, environment

    from mtpeft.io import write_json
    from mtpeft.mpt import load_distil_config

    torch.set_num_threads(a.threads)
    cfg = load_distil_config(a.config)
    if a.sources is not None:
        cfg = replace(cfg, sources=a.sources)
    if a.targets is not None:
        cfg = replace(cfg, targets=a.targets)
    backbones, seeds = (["tiny-bert"], [0]) if a.quick else (a.backbones, a.seeds)
    from mtpeft.mpt.config import config_dict

    path = Path(a.out) if a.out else RESULTS / "mpt.json"
    runs = []
    for bb in backbones:
        for seed in seeds:
            runs.append(run_one(cfg, bb, seed, a))
            print(f"{bb} seed {seed}: {runs[-1]['summary']}", flush=True)
            mine = {(r["backbone"], r["seed"]) for r in runs}
            every = runs + (earlier_runs(path, config_dict(cfg), mine) if a.append else [])
            every.sort(key=lambda r: (backbones.index(r["backbone"]) if r["backbone"] in backbones else 99, r["seed"]))
            if a.append:  # complete once every backbone in the file has three seeds; the command reproduces all
                done = all(len({r["seed"] for r in every if r["backbone"] == b}) >= 3 for b in {r["backbone"] for r in every})
                argv_all = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--append"]
                cmd = _command_for(argv_all, sorted({r["seed"] for r in every}))
            else:
                done = len(runs) == len(backbones) * len(seeds)
                cmd = "python benchmarks/bench_mpt.py " + " ".join(argv if argv is not None else sys.argv[1:])
            payload = {"benchmark": "mpt", "environment": environment(), "quick": a.quick, "config": config_dict(cfg),
                       "command": cmd,
                       "complete": done, "by_backbone": aggregate(every), "runs": every}
            write_json(path, payload)  # after every run: a stopped benchmark keeps what it measured
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
