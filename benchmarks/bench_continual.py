"""Continual-run benchmark (issue 10): accuracy of every strategy over seeds on a real stream, and where the
time of a run goes (training, evaluation, memory work, per task).

    python benchmarks/bench_continual.py --config configs/continual-tweets.yaml [--seeds 0,1,2] [--name tweets]
    python benchmarks/bench_continual.py --config configs/continual-tweets-conpet.yaml \
        --baseline-from benchmarks/results/continual_tweets.json

``--baseline-from RESULTS.json``: put the rows of an earlier result beside this run's (strategies this run does
not have), after checking that both were made with the same config except what to run (``compare``,
``strategy``, ``strategies``): the same data, caps, steps and seeds; refused otherwise, naming the keys.

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


BASELINE_FREE = ("compare", "strategy", "strategies", "seeds")  # config keys that may differ from the baseline's


def check_baseline(base: dict, config: dict, seeds: list, path) -> None:
    """``base`` (an earlier ``continual_<name>.json``) may sit beside a run of ``config`` over ``seeds``: every
    config key but what to run is equal, and so are the seeds; else SystemExit naming the keys."""
    if not isinstance(base, dict) or not isinstance(base.get("config"), dict) \
            or not isinstance(base.get("strategies"), dict):
        sys.exit(f"--baseline-from {path}: not a continual result (no 'config' / 'strategies'); give a "
                 "benchmarks/results/continual_<name>.json")
    diff = sorted(k for k in set(config) | set(base["config"])
                  if k not in BASELINE_FREE and config.get(k) != base["config"].get(k))
    if diff:
        there = base["config"]
        what = ", ".join(f"{k}: {there.get(k)!r} there, {config.get(k)!r} here" for k in diff)
        sys.exit(f"--baseline-from {path}: its config differs in {diff} ({what}); the rows would not be "
                 "comparable: use the same config but for compare/strategies")
    if list(base.get("seeds") or []) != list(seeds):
        sys.exit(f"--baseline-from {path}: its seeds {base.get('seeds')} are not this run's {seeds}; run the same seeds")


def combine(payload: dict, base: dict, path: str) -> dict:
    """This run's payload with the baseline's strategies it lacks (each marked with where it came from)."""
    mine = payload["strategies"]
    extra = {k: {**v, "from": path} for k, v in base["strategies"].items() if k not in mine}
    return {**payload, "strategies": {**extra, **mine},
            "time_split": {**{k: v for k, v in base.get("time_split", {}).items() if k in extra},
                           **payload["time_split"]},
            "baseline_from": path, "baseline_reproduce": base.get("reproduce")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--name", default=None, help="default: the config file's stem without 'continual-'")
    p.add_argument("--seeds", default=None, help="default: the config's")
    p.add_argument("--compare", default="", help="default: the config's compare list")
    p.add_argument("--out", type=Path, default=None,
                   help="the run directory (default benchmarks/work/continual/<name>); a finished one is only read")
    p.add_argument("--baseline-from", type=Path, default=None, metavar="RESULTS.json",
                   help="an earlier result of the same config (but compare/strategies) whose rows join this one's")
    a = p.parse_args(argv)
    from mtpeft.cli import main as cli
    from mtpeft.continual.report import build_report

    name = a.name or a.config.stem.replace("continual-", "")
    base = None
    if a.baseline_from is not None:  # checked before anything runs
        from mtpeft.cli.continual import resolve
        from mtpeft.io import read_json

        base = read_json(a.baseline_from, what="baseline result")
        conf, _, seeds = resolve(argparse.Namespace(
            config=a.config, backbone=None, max_examples=None, max_steps=None, stream=None, scenario=None,
            module=None, seeds=a.seeds, strategy=None, compare=a.compare, local_adapt=False))
        check_baseline(base, conf, seeds, a.baseline_from)
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
               "strategies": {k: {m: v[m] for m in ("mean", "std", "n_finished", "time", "cost_per_task",
                                                    "local_adapt_ms_per_example") if m in v}
                              for k, v in report["strategies"].items()},
               "time_split": time_split(report), "wall_s_this_call": round(time.perf_counter() - t0, 1)}
    if base is not None:
        payload = combine(payload, base, a.baseline_from.as_posix())
        payload["reproduce"] += f" --baseline-from {a.baseline_from.as_posix()}"
    docs = ROOT / "docs"
    for png in sorted((out / "plots").glob("*.png")):
        shutil.copyfile(png, docs / f"continual-{name}-{png.name}")
    save(f"continual_{name}", payload, quiet=True)


if __name__ == "__main__":
    main()
