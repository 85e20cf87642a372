"""Continual-run benchmark (issue 10): accuracy of every strategy over seeds on a real stream, and where the
time of a run goes (training, evaluation, memory work, per task).

    python benchmarks/bench_continual.py --config configs/continual-tweets.yaml [--seeds 0,1,2] [--name tweets]

Runs ``mtpeft continual --config CONFIG --compare`` (the config's ``compare`` list) into
``benchmarks/work/continual/<name>`` (git-ignored; resumable: a rerun continues what is unfinished), then
writes ``benchmarks/results/continual_<name>.json``: the report's table (mean and std over seeds of ACC, BWT,
FWT, forgetting, intransigence per strategy, with the majority and zero-shot baselines), the command that
reproduces it, and the time split; the report's plots are copied to ``docs/continual-<name>-*.png``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's mtpeft, not an installed one

from common import save

ROOT = Path(__file__).resolve().parent.parent


def time_split(report: dict) -> dict:
    """Per strategy: seconds per seed in training, evaluation and memory work (the report's means over finished
    seeds), and evaluation's share of the total."""
    out = {}
    for name, s in report["strategies"].items():
        if not s["n_finished"]:
            continue
        tot = s["time"]
        all_s = sum(tot.values())
        first = next(v for v in s["seeds"].values() if v.get("finished"))
        out[name] = {**{k: round(v, 1) for k, v in tot.items()}, "total_s": round(all_s, 1),
                     "eval_share": round(tot["eval_s"] / all_s, 3) if all_s else None,
                     "tasks_reused": sum(bool(t.get("reused")) for t in first["timings"])}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--name", default=None, help="default: the config file's stem without 'continual-'")
    p.add_argument("--seeds", default=None, help="default: the config's")
    p.add_argument("--compare", default="", help="default: the config's compare list")
    p.add_argument("--out", type=Path, default=None,
                   help="the run directory (default benchmarks/work/continual/<name>); a finished one is only read")
    a = p.parse_args(argv)
    from mtpeft.cli import main as cli
    from mtpeft.continual.report import build_report

    name = a.name or a.config.stem.replace("continual-", "")
    out = a.out or ROOT / "benchmarks" / "work" / "continual" / name
    args = ["continual", "--config", str(a.config), "--out", str(out), "--compare", *([a.compare] if a.compare else [])]
    if a.seeds:
        args += ["--seeds", a.seeds]
    if (out / "run.json").exists():
        args.append("--resume")
    t0 = time.perf_counter()
    rc = cli(args)
    if rc:
        sys.exit(rc)
    report = build_report(out)
    reproduce = "python benchmarks/bench_continual.py --config " + str(a.config) + (f" --seeds {a.seeds}" if a.seeds else "")
    payload = {"name": name, "reproduce": reproduce, "command": report.get("command"), "config": report.get("config"),
               "stream": report.get("stream"), "scenario": report.get("scenario"), "tasks": report.get("tasks"),
               "seeds": report.get("seeds"), "baselines": report.get("baselines"),
               "strategies": {k: {m: v.get(m) for m in ("mean", "std", "n_finished", "time")}
                              for k, v in report["strategies"].items()},
               "time_split": time_split(report), "wall_s_this_call": round(time.perf_counter() - t0, 1)}
    docs = ROOT / "docs"
    for png in sorted((out / "plots").glob("*.png")):
        shutil.copyfile(png, docs / f"continual-{name}-{png.name}")
    save(f"continual_{name}", payload, quiet=True)


if __name__ == "__main__":
    main()
