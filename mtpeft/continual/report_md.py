"""The continual report as text: ``render_markdown`` (report.md), ``summary_table`` (the main table alone,
for a README) and ``format_metrics`` (the same table aligned for a terminal). Values are percentage
points with one decimal, "mean ± std" over the finished seeds, "—" where undefined."""
from __future__ import annotations

import re

from ..display import printable

COLUMNS = ("strategy", "seeds", "ACC", "BWT", "FWT", "forgetting", "intransigence", "time (s)")
_METRICS = ("acc", "bwt", "fwt", "forgetting", "intransigence")
DASH = "—"
NOTE = ("Percentage points, mean ± sample standard deviation (ddof=1) over the finished seeds (no ± with a "
        f"single seed; {DASH} where a metric is undefined, e.g. FWT without zero-shot accuracies, "
        "intransigence without a finished joint run). time: train + eval + memory seconds, mean over the "
        "finished seeds. Partial runs are left out of the means.")


def pp(mean: float | None, std: float | None = None) -> str:
    """``0.713, 0.012`` -> ``"71.3 ± 1.2"``; None -> "—"."""
    if mean is None:
        return DASH
    m = f"{100 * mean:.1f}".replace("-0.0", "0.0")  # -0.0003 is no loss worth a sign
    return m if std is None else f"{m} ± {100 * std:.1f}"


def main_rows(report: dict) -> list[list[str]]:
    """The main table's rows (COLUMNS): one per strategy, then the majority and zero-shot baselines."""
    rows, n = [], len(report["seeds"])
    for name, a in report["strategies"].items():
        t = [v for v in a["time"].values() if v is not None]
        rows.append([name, f"{a['n_finished']}/{n}", *(pp(a["mean"][k], a["std"][k]) for k in _METRICS),
                     f"{sum(t):.1f}" if t else DASH])
    b = report["baselines"]
    rows.append(["majority class", DASH, pp(b.get("majority_acc")), *[DASH] * 5])
    rows.append(["zero-shot (untrained)", f"{b.get('zero_shot_seeds', 0)}/{n}",
                 pp(b.get("zero_shot_acc"), b.get("zero_shot_std")), *[DASH] * 5])
    return rows


def _md_cell(s) -> str:
    return printable(str(s)).replace("|", "\\|")


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows])


def summary_table(report: dict) -> str:
    """The main table as markdown (embeddable in a README)."""
    return _md_table(COLUMNS, main_rows(report))


def partial_line(report: dict) -> str:
    if not report["partial"]:
        return "Partial runs: none (every run finished)."
    n = len(report["tasks"])
    parts = [f"{p['strategy']} seed {p['seed']} ({p['done']}/{n} tasks done"
             + (f", ACC so far {pp(p['acc'])})" if p["acc"] is not None else ")" if p["started"] else
                ", not started)") for p in report["partial"]]
    return "Partial runs (not in the means): " + "; ".join(parts) + "."


def _fewer_seeds(report: dict) -> list[str]:
    return [f"{s}: {k} over {a['n'][k]} of {a['n_finished']} finished seeds"
            for s, a in report["strategies"].items() for k in _METRICS if 0 < a["n"][k] < a["n_finished"]]


def _matrix_section(name: str, a: dict, tasks: list[str]) -> list[str]:
    m = a.get("matrix_mean")
    if m is None and "accuracies_mean" not in a:
        return []
    out = ["", f"### {name}", ""]
    if m is None:  # joint: one model, one accuracy per task
        return out + [_md_table(["", *tasks], [["joint", *(pp(a["accuracies_mean"].get(t)) for t in tasks)]])]
    rows = [["untrained", *map(pp, m["untrained"])]] if m["untrained"] else []
    rows += [[f"after {t}", *map(pp, r)] for t, r in zip(tasks, m["R"])]
    return out + [_md_table(["", *tasks], rows)]


def _fence(text: str) -> str:
    """``text`` in a fenced code block whose fence is longer than any run of backticks inside it."""
    ticks = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    return f"{ticks}sh\n{printable(text)}\n{ticks}"


def _reproduce(command: str) -> list[str]:
    if not command.strip():
        return [("The command line was not recorded (the run was started from Python); its resolved config is "
                 "`config` in report.json.")]
    return ["Reproduce:", "", _fence(command)]


def render_markdown(report: dict) -> str:
    tasks = report["tasks"]
    lines = [f"# Continual run: {_md_cell(report['stream'])} ({report['scenario']})", "",
             (f"Tasks in stream order: {' → '.join(map(_md_cell, tasks))}. "
              f"Seeds: {', '.join(map(str, report['seeds']))}. Strategies: {', '.join(report['strategies'])}."),
             "", *_reproduce(report["command"]), "", "## Results", "", summary_table(report), "",
             NOTE, ""]
    few = _fewer_seeds(report)
    if few:
        lines += ["Means over fewer seeds: " + "; ".join(few) + ".", ""]
    lines += [partial_line(report), "", "## Accuracy matrices (mean over the finished seeds, %)", "",
              "Row *after t*: the accuracy on each task (columns) once the stream up to *t* is learnt."]
    for name, a in report["strategies"].items():
        lines += _matrix_section(name, a, tasks)
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def format_metrics(report: dict) -> str:
    """The main table aligned for a terminal, with the header and the partial runs."""
    cells = [list(COLUMNS)] + main_rows(report)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    head = (f"continual run {printable(report['stream'])} ({report['scenario']}), tasks "
            f"{', '.join(map(printable, report['tasks']))}; seeds {', '.join(map(str, report['seeds']))}")
    return "\n".join([head, line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:]),
                      partial_line(report), "(percentage points, mean ± sample std over the finished seeds)"])
