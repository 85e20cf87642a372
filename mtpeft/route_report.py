"""What `mtpeft route --out DIR` writes: report.json (everything ``route_eval`` returns), report.md (the
accuracy table and where each task was routed) and PNG heatmaps of the mean routing weight per (evaluated
task, expert): ``heatmap.png`` (every router, over all layers) and ``heatmap-<router>.png`` (one panel per
layer plus one over all layers). The figures are drawn from report.json alone: ``render(path)`` redraws them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import MtpeftError

ALL_LAYERS = "all layers"


def write_report(report: dict, out: str | Path) -> dict:
    """report.json, report.md and the heatmaps under ``out``; returns their paths."""
    from .io import write_bytes, write_json

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MtpeftError(f"--out {out} is a file; give a directory for report.json, report.md and the heatmaps")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_bytes(out / "report.md", markdown(report).encode())
    return {"json": str(out / "report.json"), "markdown": str(out / "report.md"),
            "heatmaps": [str(p) for p in render(out / "report.json")]}


def markdown(report: dict) -> str:
    names = [t["task"] for t in report["tasks"]]
    lines = [(f"# Zero-shot routing over {len(report['experts'])} experts ({report.get('backbone')}, "
             f"{report['split']} split)"), "",
             "Experts: " + ", ".join(f"`{e}` ({t})" for e, t in zip(report["experts"], report["expert_tasks"])) + ".",
             "", "| method | " + " | ".join(f"`{n}` %" for n in names) + " | mean % |",
             "|---|" + "---|" * (len(names) + 1)]
    for r in report["rows"]:
        label = r["method"] + (" (oracle: picked with the labels)" if r["kind"] == "oracle" else "")
        lines.append(f"| {label} | " + " | ".join(f"{100 * r['accuracy'][n]:.1f}" for n in names)
                     + f" | {100 * r['mean']:.1f} |")
    oracle = next((r for r in report["rows"] if r["kind"] == "oracle"), None)
    if oracle:
        lines += ["", "Oracle expert per task: " + ", ".join(f"{n} → `{m}`" for n, m in oracle["modules"].items())]
    for router, rt in report["routing"].items():
        lines += ["", f"## Where `{router}` routed (mean weight per expert, all layers, per {rt['granularity']})", "",
                  "| task | " + " | ".join(f"`{e}`" for e in report["experts"]) + " |",
                  "|---|" + "---|" * len(report["experts"])]
        for n, ws in zip(names, rt["overall"]):
            lines.append(f"| `{n}` | " + " | ".join(f"{w:.2f}" for w in ws) + " |")
    lines += ["", f"{report['seconds']} s."]
    return "\n".join(lines) + "\n"


def _panels(rt: dict) -> list[tuple[str, list]]:
    """(title, matrix) per layer in layer order, then all layers; one panel for a per-example router."""
    if rt["granularity"] == "example" or len(rt["per_layer"]) <= 1:
        return [(ALL_LAYERS, rt["overall"])]
    key = lambda k: (0, int(k)) if k.isdigit() else (1, k)
    return [(f"layer {k}", rt["per_layer"][k]) for k in sorted(rt["per_layer"], key=key)] + \
        [(ALL_LAYERS, rt["overall"])]


def _draw(ax, matrix, tasks, experts, title, annotate=True, xlabels=True, ylabels=True):
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(len(experts)), [e.removesuffix("-lora") for e in experts] if xlabels else [],
                  rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks if ylabels else [], fontsize=7)
    if annotate:
        for i, row in enumerate(matrix):
            for j, w in enumerate(row):
                ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if w > 0.6 else "white")
    return im


def render(report_json: str | Path) -> list[Path]:
    """Draw the heatmaps of a report.json beside it; returns the PNG paths (none when nothing was routed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import read_json

    path = Path(report_json)
    report = read_json(path, what="route report")
    if not isinstance(report, dict) or not {"tasks", "experts", "routing"} <= set(report):
        raise MtpeftError(f"{path} is not a `mtpeft route` report (no tasks/experts/routing); re-run mtpeft route --out")
    tasks, experts, routing = [t["task"] for t in report["tasks"]], report["experts"], report["routing"]
    out = []
    if not routing:
        return out
    w_cell, h_cell = 0.55 * len(experts) + 1.6, 0.32 * len(tasks) + 1.4
    fig, axes = plt.subplots(1, len(routing), figsize=(w_cell * len(routing) + 1.0, h_cell + 0.6), squeeze=False,
                             layout="constrained")
    for ax, (name, rt) in zip(axes[0], routing.items()):
        im = _draw(ax, rt["overall"], tasks, experts, f"{name} (per {rt['granularity']})")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean routing weight")
    fig.suptitle("Where each evaluated task was routed (all layers)", fontsize=10)
    out.append(_save(fig, path.parent / "heatmap.png", plt))
    for name, rt in routing.items():
        panels = _panels(rt)
        cols = min(4 if len(panels) <= 12 else 6, len(panels))
        rows = math.ceil(len(panels) / cols)
        many = len(panels) > 12  # tick labels on the outer panels only, no numbers in the cells
        fig, axes = plt.subplots(rows, cols, figsize=(w_cell * cols + 1.0, h_cell * rows + 0.6), squeeze=False,
                                 layout="constrained")
        for i, (ax, (title, m)) in enumerate(zip(axes.flat, panels)):
            im = _draw(ax, m, tasks, experts, title, annotate=not many,
                       xlabels=not many or i >= len(panels) - cols, ylabels=not many or i % cols == 0)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="mean routing weight")
        fig.suptitle(f"{name}: mean routing weight per (task, expert), per layer", fontsize=10)
        out.append(_save(fig, path.parent / f"heatmap-{name}.png", plt))
    return out


def _save(fig, target: Path, plt) -> Path:
    import io

    from .io import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(target, buf.getvalue())
    return target


def report_summary(report: dict) -> str:
    """One JSON line per row (method: mean accuracy), for logs."""
    return json.dumps({r["method"]: round(r["mean"], 4) for r in report["rows"]})
