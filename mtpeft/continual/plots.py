"""The PNG plots of a continual report, drawn from the report dict alone (``report.build_report``):

- ``acc_curve.png``: the mean accuracy over the tasks seen so far after each task, one line per
  sequential strategy with a ±std band over the finished seeds; joint dashed, zero-shot dotted;
- ``metrics.png``: ACC, BWT and forgetting per strategy, bars with std error bars;
- ``matrix_<strategy>.png``: the mean accuracy matrix, cells annotated, the diagonal (each task right
  after it was learnt) outlined;
- ``task_curves_<strategy>.png``: each task's accuracy before training and after each step;
- ``cost_per_task.png``: each task's training steps and seconds along the stream, one line per strategy.

matplotlib (Agg) is imported inside ``plot_report``; every file is written atomically.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

from .rundir import JOINT, safe_name

NAN = float("nan")


def _pct(v) -> float:
    return NAN if v is None else 100.0 * v


def _sequential(report: dict) -> dict[str, dict]:
    """Strategies with a mean matrix (a sequential strategy with at least one finished seed)."""
    return {s: a for s, a in report["strategies"].items() if s != JOINT and a.get("matrix_mean")}


def _save(fig, target: Path, plt) -> Path:
    from ..io import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(target, buf.getvalue())  # temporary file beside target, then os.replace
    return target


def _acc_curve(report: dict, plt):
    tasks = report["tasks"]
    x = list(range(1, len(tasks) + 1))
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3.5, 4.0), layout="constrained")
    for name, a in _sequential(report).items():
        mean = [_pct(v) for v in a["acc_curve"]["mean"]]
        std = [0.0 if v is None else 100.0 * v for v in a["acc_curve"]["std"]]
        (line,) = ax.plot(x[:len(mean)], mean, marker="o", label=name)
        ax.fill_between(x[:len(mean)], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    joint = report["strategies"].get(JOINT, {}).get("mean", {}).get("acc")
    if joint is not None:
        ax.axhline(100 * joint, color="black", linestyle="--", linewidth=1, label="joint")
    zero = report["baselines"].get("zero_shot_acc")
    if zero is not None:
        ax.axhline(100 * zero, color="grey", linestyle=":", linewidth=1.2, label="zero-shot")
    ax.set_xticks(x, [f"{i}\n{t}" for i, t in zip(x, tasks)], fontsize=7)
    ax.set_xlabel("after task")
    ax.set_ylabel("mean accuracy on the tasks seen so far (%)")
    ax.set_title(f"{report['stream']} ({report['scenario']})", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return fig


def _metrics(report: dict, plt):
    names = list(report["strategies"])
    metrics = [("acc", "ACC"), ("bwt", "BWT"), ("forgetting", "forgetting")]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 3.0, 4.0), layout="constrained")
    for i, (key, label) in enumerate(metrics):
        pos = [k + (i - (len(metrics) - 1) / 2) * width for k in range(len(names))]
        means = [_pct(report["strategies"][s]["mean"][key]) for s in names]
        stds = [_pct(report["strategies"][s]["std"][key]) for s in names]
        yerr = None if all(math.isnan(s) for s in stds) else [0.0 if math.isnan(s) else s for s in stds]
        ax.bar(pos, means, width, yerr=yerr, capsize=3, label=label)  # no std (one seed): no error bar
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("percentage points")
    ax.set_title("ACC, BWT and forgetting (mean ± std over finished seeds; no bar: undefined)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _matrix(name: str, a: dict, tasks: list[str], plt):
    from matplotlib.patches import Rectangle

    rows = [[_pct(v) for v in r] for r in a["matrix_mean"]["R"]]
    fig, ax = plt.subplots(figsize=(0.8 * len(tasks) + 2.5, 0.6 * len(rows) + 1.8), layout="constrained")
    im = ax.imshow(rows, vmin=0.0, vmax=100.0, cmap="viridis", aspect="auto")
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 60 else "white")
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"after {t}" for t in tasks[:len(rows)]], fontsize=7)
    ax.set_xlabel("evaluated task")
    fig.colorbar(im, ax=ax, shrink=0.8, label="accuracy (%)")
    ax.set_title(f"{name}: accuracy matrix (mean over {a['n_finished']} seeds)", fontsize=9)
    return fig


def _task_curves(name: str, a: dict, tasks: list[str], plt):
    m = a["matrix_mean"]
    x = list(range(len(m["R"]) + 1))
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3.5, 4.0), layout="constrained")
    for j, t in enumerate(tasks):
        b = m["untrained"][j] if m["untrained"] else None
        ys = [_pct(b)] + [_pct(r[j]) for r in m["R"]]
        (line,) = ax.plot(x, ys, marker="o", markersize=3, label=t)
        if j < len(m["R"]):  # the step that learnt it
            ax.plot([j + 1], [ys[j + 1]], marker="*", markersize=11, color=line.get_color())
    ax.set_xticks(x, ["untrained"] + [f"after {t}" for t in tasks[:len(m["R"])]], rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{name}: each task's accuracy along the stream (star: right after it was learnt)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def _cost_per_task(report: dict, plt):
    tasks = report["tasks"]
    x = list(range(1, len(tasks) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(2.0 * len(tasks) + 4.0, 3.8), layout="constrained")
    for name, a in _sequential(report).items():
        cost = a.get("cost_per_task") or {}
        for ax, key in zip(axes, ("steps", "train_s")):
            ys = [NAN if v is None else v for v in cost.get(key, [])]
            ax.plot(x[:len(ys)], ys, marker="o", label=name)
    for ax, label in zip(axes, ("training steps", "training seconds")):
        ax.set_xticks(x, [str(i) for i in x])
        ax.set_xlabel("task index in the stream")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_title("cost per task (mean over seeds)", fontsize=10)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="best")
    return fig


def plot_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Draw the report's plots into ``out_dir`` (created); returns their paths. Strategy names become file
    names, so anything but ``[a-z0-9-]+`` is refused."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in report["strategies"]:
        safe_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = report["tasks"]
    paths = [_save(_acc_curve(report, plt), out_dir / "acc_curve.png", plt),
             _save(_metrics(report, plt), out_dir / "metrics.png", plt),
             _save(_cost_per_task(report, plt), out_dir / "cost_per_task.png", plt)]
    for name, a in _sequential(report).items():
        paths.append(_save(_matrix(name, a, tasks, plt), out_dir / f"matrix_{name}.png", plt))
        paths.append(_save(_task_curves(name, a, tasks, plt), out_dir / f"task_curves_{name}.png", plt))
    return paths
