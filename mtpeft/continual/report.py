"""The report of a continual run, built from the saved JSON of its directory alone (no model, no data).

``build_report(OUT)`` reads ``OUT/run.json`` and every ``OUT/runs/<strategy>/seed<k>/state.json``
(checked, see ``rundir.py``) and returns the report: per strategy and seed the accuracy matrix and its
metrics (``AccuracyMatrix.summary``), then the mean and sample std (ddof=1) over the *finished* seeds.
A run not finished (or not started) is reported with how many tasks it has done, and left out of the
means. When ``joint`` finished for a seed, its accuracies are the matrix's ``joint`` for the other
strategies of that seed, so intransigence is defined. Undefined metrics stay None (never 0).
``write_report(OUT)`` writes ``report.json``, ``report.md`` and the PNGs under ``OUT/plots/``.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .matrix import METRICS, AccuracyMatrix
from .report_md import format_metrics, render_markdown, summary_table
from .rundir import JOINT, read_run, read_state, read_untrained

FORMAT, VERSION = "mtpeft-continual-report", 1
TIMES = ("train_s", "eval_s", "memory_s")

__all__ = ["build_report", "format_metrics", "recompute", "render_markdown", "summary_table", "write_report"]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def _std(xs) -> float | None:
    """Sample std (ddof=1) of the defined values; None with fewer than two."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.stdev(xs) if len(xs) > 1 else None


def acc_curve(m: AccuracyMatrix) -> list[float | None]:
    """After each step ``i``: the mean accuracy over the tasks learnt so far (steps ``0..i``)."""
    col = {t: j for j, t in enumerate(m.tasks)}
    return [_mean([row[col[t]] for t in m.steps[:i + 1]]) for i, row in enumerate(m.R)]


def _seed_entry(st: dict | None, joint: dict | None, strategy: str) -> dict:
    if st is None:  # no state.json yet: not started
        e = {"finished": False, "done": 0, "started": False, "metrics": dict.fromkeys(METRICS), "timings": []}
        return e if strategy == JOINT else {**e, "matrix": None, "acc_curve": []}
    e = {"finished": st["finished"], "done": st["done"], "started": True}
    if strategy == JOINT:
        accs = st["accuracies"]
        return {**e, "metrics": {**dict.fromkeys(METRICS), "acc": _mean(accs.values())}, "accuracies": accs,
                "timings": st["timings"]}
    m = st["matrix"]
    if joint is not None and joint["finished"]:
        m.set_joint(joint["accuracies"])
    return {**e, "metrics": m.summary(), "matrix": m.to_dict(), "acc_curve": acc_curve(m), "timings": st["timings"]}


def _matrix_mean(mats: list[dict]) -> dict | None:
    """Cell-wise mean of finished seeds' matrices (to_dict form), cells never evaluated left None."""
    if not mats:
        return None

    def mean_of(vectors):
        vectors = [v for v in vectors if v is not None]
        return [_mean(col) for col in zip(*vectors)] if vectors else None

    rows = [mean_of([m["R"][i] for m in mats]) for i in range(len(mats[0]["R"]))]
    return {"R": rows, "untrained": mean_of([m["untrained"] for m in mats]),
            "joint": mean_of([m["joint"] for m in mats])}


def _aggregate(seeds: dict[str, dict], strategy: str) -> dict:
    fin = [e for e in seeds.values() if e["finished"]]
    out = {"seeds": seeds, "n_finished": len(fin),
           "mean": {k: _mean([e["metrics"][k] for e in fin]) for k in METRICS},
           "std": {k: _std([e["metrics"][k] for e in fin]) for k in METRICS},
           "n": {k: sum(e["metrics"][k] is not None for e in fin) for k in METRICS},
           "time": {k: _mean([sum(t.get(k, 0.0) for t in e["timings"]) for e in fin]) for k in TIMES}}
    if strategy == JOINT:
        out["accuracies_mean"] = {t: _mean([e["accuracies"].get(t) for e in fin])
                                  for t in (fin[0]["accuracies"] if fin else {})}
        return out
    out["cost_per_task"] = _cost_per_task(fin)
    la = [(sum(t.get("local_adapt_s", 0.0) for t in e["timings"]), sum(t.get("local_adapt_n", 0) for t in e["timings"]))
          for e in fin]
    if any(n for _, n in la):
        out["local_adapt_ms_per_example"] = _mean([1000.0 * s / n for s, n in la if n])
    curves = [e["acc_curve"] for e in fin]
    out["acc_curve"] = {"mean": [_mean(c) for c in zip(*curves)], "std": [_std(c) for c in zip(*curves)]}
    out["matrix_mean"] = _matrix_mean([e["matrix"] for e in fin])
    return out


def _cost_per_task(fin: list[dict]) -> dict:
    """Along the stream, the mean over finished seeds of each task's training steps and training seconds
    (a flat line: the cost of a task does not grow with the tasks seen)."""
    def col(key):
        per_seed = [[t.get(key) for t in e["timings"]] for e in fin]
        return [_mean(c) for c in zip(*per_seed)] if per_seed else []

    return {"steps": col("steps"), "train_s": col("train_s")}


def _baselines(run_dir, run: dict, states: dict, tasks: list[str]) -> dict:
    """Majority class (from run.json) and zero-shot: the bare backbone's accuracy, per seed the first
    strategy's ``untrained`` row (it is measured before any training, so partial runs count too), else
    ``untrained/seed<k>.json``."""
    majority = run["baselines"]["majority"]
    per_seed = []
    for k in run["seeds"]:
        ms = [states[s][k]["matrix"] for s in run["strategies"] if s != JOINT and states[s][k] is not None]
        b = next((m.untrained for m in ms if m.untrained is not None), None) or read_untrained(run_dir, run, k)
        if b is not None:
            per_seed.append(b)
    zero = {t: _mean([b[j] for b in per_seed]) for j, t in enumerate(tasks)} if per_seed else {}
    return {**run["baselines"], "majority": majority, "majority_acc": _mean(majority.values()),
            "zero_shot": zero, "zero_shot_acc": _mean(zero.values()),
            "zero_shot_std": _std([_mean(b) for b in per_seed]), "zero_shot_seeds": len(per_seed)}


def build_report(run_dir: str | Path) -> dict:
    """The report of the run in ``run_dir`` (see the module docstring); reads JSON only, writes nothing."""
    run = read_run(run_dir)
    tasks, seeds = run["stream"]["tasks"], run["seeds"]
    states = {s: {k: read_state(run_dir, run, s, k) for k in seeds} for s in run["strategies"]}
    joint = states.get(JOINT, {})
    strategies = {s: _aggregate({str(k): _seed_entry(states[s][k], joint.get(k), s) for k in seeds}, s)
                  for s in run["strategies"]}
    partial = [{"strategy": s, "seed": int(k), "done": e["done"], "started": e["started"],
                "acc": e["metrics"]["acc"]}
               for s, a in strategies.items() for k, e in a["seeds"].items() if not e["finished"]]
    return {"format": FORMAT, "version": VERSION, "stream": run["stream"]["name"],
            "scenario": run["stream"]["scenario"], "tasks": tasks, "seeds": seeds, "command": run["command"],
            "config": run.get("config", {}), "baselines": _baselines(run_dir, run, states, tasks),
            "strategies": strategies, "partial": partial}


def recompute(run_dir: str | Path) -> dict:
    """`mtpeft eval-forgetting`: every metric recomputed from the saved matrices alone (the report,
    without writing it, its markdown or its plots)."""
    return build_report(run_dir)


def write_report(run_dir: str | Path, plots: bool = True) -> dict:
    """``report.json`` and ``report.md`` in ``run_dir`` (atomic writes) and, with ``plots``, the PNGs under
    ``run_dir/plots/``; returns the report (``plots``: the PNG paths relative to ``run_dir``)."""
    from ..io import write_bytes, write_json

    run_dir = Path(run_dir)
    report = build_report(run_dir)
    if plots:
        from .plots import plot_report

        report["plots"] = [p.relative_to(run_dir).as_posix() for p in plot_report(report, run_dir / "plots")]
    write_json(run_dir / "report.json", report)
    write_bytes(run_dir / "report.md", render_markdown(report).encode())
    return report
