"""Render the README's benchmark tables from ``benchmarks/results/*.json``.

    python benchmarks/report.py            # print the markdown
    python benchmarks/report.py --readme   # rewrite the block between the results markers in README.md

Every number in the README's Results section comes from here, so re-running the benchmarks and
then this script keeps the two in step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NOISE = 0.05  # how far repeated runs of the training-step benchmark move its ratios on this machine class
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"report: {p} is not valid JSON ({e}); re-run its benchmark") from e


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def experts_table(d: dict) -> list[str]:
    cfg = d["config"]
    out = [
        (f"**Accuracy: one LoRA expert per built-in task on MiniLM, task-id routing, whole test splits** "
        f"(`experts_minilm_lora.json`; r=8 on q,v, ≤{cfg['max_train']} training examples, "
        f"≤{cfg['max_steps']} steps of {cfg['batch_size']}, lr {cfg['lr']}, best validation kept). "
        f"Expert beats the bare backbone on {d['expert_beats_zero_shot']} tasks."),
        "",
        "| task | test n | labels | majority % | zero-shot % | LoRA expert % | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        out.append(f"| `{r['task']}` | {r['n']} | {r['labels']} | {_pct(r['majority'])} | "
                   f"{_pct(r['zero_shot'])} | **{_pct(r['expert'])}** | {r['train_s']:.0f} |")
    return out


def train_table(runs: list[dict]) -> list[str]:
    out = [
        ("**Training step vs peft** (`train_step*.json`; forward + backward + Adam, median of "
        "interleaved rounds; the floor is the frozen backbone's forward plus an input-gradient "
        "backward, with the virtual tokens for prompt tuning):"),
        "",
        ("| backbone, batch | module | mtpeft ms | peft ms | floor ms | mtpeft / peft | mtpeft / floor "
        "| peak MiB mtpeft / peft |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in runs:
        c = d["config"]
        for r in d["rows"]:
            out.append(
                f"| {c['backbone']}, {c['batch']}×{c['seq']} | {r['type']} | {r['mtpeft_ms']:.0f} | "
                f"{r['peft_ms']:.0f} | {r['floor_ms']:.0f} | **{r['mtpeft/peft']:.3f}** | "
                f"{r['mtpeft/floor']:.3f} | {r['mtpeft_peak_mib']:.0f} / {r['peft_peak_mib']:.0f} |")
    return out


def inference_table(d: dict) -> list[str]:
    c, ms = d["config"], d["ms"]
    out = [
        (f"**Inference with E experts in the bank** (`inference.json`; {c['backbone']}, "
        f"{c['batch']}×{c['seq']} tokens, LoRA r8 on q,v, no grad). Single LoRA (task-id routing) "
        f"{ms['single_lora']:.0f} ms; one merged model (a bare forward) {ms['merged']:.0f} ms."),
        "",
        ("| E | per-token top-2 ms | / single LoRA | / top-2 at E=8 | mixed-task batch ms "
        "| peft `adapter_names` ms | mtpeft / peft | max abs diff vs peft |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        if "topk_ms" not in r:
            continue
        out.append(
            f"| {r['experts']} | {r['topk_ms']:.0f} | {r['topk/single']:.3f} | {r['topk/topk_E8']:.3f} | "
            f"{r['mixed_mtpeft_ms']:.0f} | {r['mixed_peft_ms']:.0f} | **{r['mixed_mtpeft/peft']:.3f}** | "
            f"{r['max_abs_diff_vs_peft']:.1g} |")
    peaks = d.get("peak_mib", {})
    if peaks:
        out += ["", (f"Peak extra memory of a forward: {min(peaks.values()):.0f}–{max(peaks.values()):.0f} MiB "
                    "across contenders.")]
    return out


def routing_table(d: dict) -> list[str]:
    c = d["config"]
    out = [(f"**One routed layer alone** (`routing.json`; {c['d']}×{c['d']} Linear, {c['tokens']} tokens, "
           f"LoRA r{c['r']}, per-token top-{c['k']}, ms; `auto` is the per-call choice of the cost model):"),
           "", "| E | base Linear | single LoRA | dense | grouped | auto (picked) | auto / single |",
           "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['experts']} | {r['base_linear']:.1f} | {r['single_lora']:.1f} | {r['routed_dense']:.1f} | "
                   f"{r['routed_grouped']:.1f} | {r['routed_auto']:.1f} ({r['picked']}) | {r['auto_vs_single']:.2f} |")
    return out


def zeroshot_table(d: dict) -> list[str]:
    c, ms = d["config"], d["ms"]
    out = [(f"**Zero-shot routers over E experts** (`zeroshot_routing.json`; {c['backbone']}, {c['batch']}×{c['seq']} "
            f"tokens, LoRA r8 on q,v, per-token top-{c['k']}, whole model, the router's own cost included; "
            f"{'CPU' if c.get('clock') == 'cpu' else 'wall-clock'} time, {c.get('threads') or 'all'} thread(s)). Single LoRA "
            f"{ms['single_lora']:.0f} ms. peft's Arrow runs every expert on every token; given the same prototypes it "
            "gives the same outputs (max abs diff).").strip(),
           "", "| E | Arrow ms | / single LoRA | PHATGOOSE ms | / single LoRA | peft Arrow ms | Arrow / peft | max abs diff |",
           "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        peft_ms = f"{r['peft_arrow_ms']:.0f}" if "peft_arrow_ms" in r else "-"
        vs = f"**{r['arrow/peft_arrow']:.3f}**" if "arrow/peft_arrow" in r else "-"
        diff = f"{r['max_abs_diff_vs_peft']:.1g}" if "max_abs_diff_vs_peft" in r else "-"
        out.append(f"| {r['experts']} | {r['arrow_ms']:.0f} | {r['arrow/single']:.3f} | {r['phatgoose_ms']:.0f} | "
                   f"{r['phatgoose/single']:.3f} | {peft_ms} | {vs} | {diff} |")
    return out


def chooser_line(d: dict) -> list[str]:
    s = d["summary"]
    return [(f"The dense/grouped chooser (`kernel_threshold.json`, {len(d['config']['shapes'])} stack shapes × "
            f"{len(d['config']['experts'])} bank sizes × {len(d['config']['tokens'])} token counts) picks the faster "
            f"path in {s['picks_right']} cases; mean regret {s['mean_regret']:.1%}, worst {s['worst_regret']:.0%} "
            "(it misses where both paths cost about the same, and on small batches over large banks).")]


def scorer_table(d: dict) -> list[str]:
    out = [("**Causal rank classification** (`scorer_smollm2.json`; SmolLM2 with a LoRA routed per example, "
            f"batch {d['config']['batch']}, ms): mtpeft runs the prompts once and packs an example's labels "
            "into rows under a block-causal mask, against one full sequence per (example, label):"),
           "", ("| task | labels | inference packed / flat | speed-up | training step packed / flat | speed-up "
           "| peak MiB train packed / flat | max abs diff |"),
           "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| `{r['task']}` | {r['labels']} | {r['infer_packed_ms']:.0f} / {r['infer_flat_ms']:.0f} | "
                   f"**{r['infer_speedup']:.1f}x** | {r['train_packed_ms']:.0f} / {r['train_flat_ms']:.0f} | "
                   f"**{r['train_speedup']:.1f}x** | {r['train_packed_peak_mib']:.0f} / {r['train_flat_peak_mib']:.0f} "
                   f"| {r['max_abs_diff']:.1g} |")
    m = d.get("mixed")
    if m:
        out += ["", (f"A batch of {m['batch']} mixing {', '.join(f'`{t}`' for t in m['tasks'].split('+'))} "
                     f"({m['labels']} labels): each example's own candidates ({m['candidates']}) in rows of their own "
                     f"width, {m['infer_own_ms']:.0f} ms (training step {m['train_own_ms']:.0f}), against every "
                     f"example padded to the largest set ({m['padded_candidates']}), {m['infer_padded_ms']:.0f} ms "
                     f"({m['train_padded_ms']:.0f}): **{m['infer_speedup']:.2f}x** (**{m['train_speedup']:.2f}x**), "
                     f"max abs diff {m['max_abs_diff']:.1g}.")]
    return out


def route_table(d: dict, name: str = "route_heldout") -> list[str]:
    """Zero-shot routing on held-out tasks (`<name>.json`): mean ± std over the seeds."""
    c, names = d["config"], [t["task"] for t in d["tasks"]]
    order = ["zero-shot", "phatgoose", "arrow", "retrieval", "average", "merge-uniform", "merge-ties", "multitask",
             "oracle expert", "majority"]
    fmt = lambda v: f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
    out = [(f"**Zero-shot routing on held-out tasks** (`{name}.json`; `{d['command']}`; seeds "
            f"{', '.join(map(str, d['seeds']))}; {c['backbone']}, LoRA r{c['options']['r']} experts on "
            f"{', '.join(f'`{t}`' for t in c['experts'])} (≤{c['max_train']} examples, {c['max_steps']} steps), "
            f"one multitask LoRA on their union; ≤{c['max_test']} test examples per task; accuracy %, mean ± std):"),
           "", "| method | " + " | ".join(f"`{n}`" for n in names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
    for m in sorted(d["accuracy"], key=lambda m: order.index(m) if m in order else len(order)):
        a = d["accuracy"][m]
        label = f"{m} (oracle: picked with the labels)" if m == "oracle expert" else m
        out.append(f"| {label} | " + " | ".join(fmt(a[n]) for n in names) + f" | {fmt(a['average'])} |")
    pct = lambda per: ", ".join(f"{t} {100 * v['mean']:.0f}%" for t, v in per.items())
    shares = [f"{r} {pct(per)}" for r, per in d["tweet_share"].items() if r in ("phatgoose", "arrow", "retrieval")]
    if shares:
        out += ["", "Share of each held-out tweet task's routing mass on the tweet experts: " + "; ".join(shares) + "."]
    return out


CONTINUAL_ORDER = ["seqft", "replay", "olora", "expert-router", "expert-oracle", "conpet-static", "conpet-static-mbpa",
                   "conpet-dynamic", "joint"]


def continual_table(d: dict, name: str) -> list[str]:
    """A continual comparison (`continual_<name>.json`): mean ± std over seeds, with the baselines."""
    c = d["config"]
    pm = lambda m, k: "—" if m["mean"].get(k) is None else (
        f"{100 * m['mean'][k]:.1f}" + ("" if m["std"].get(k) is None else f" ± {100 * m['std'][k]:.1f}"))
    strategies = sorted(d["strategies"], key=lambda s: CONTINUAL_ORDER.index(s) if s in CONTINUAL_ORDER else 99)
    what = "The demo" if name == "demo" else "Continual"
    out = [(f"**{what}: `{c['stream'] or 'custom'}` stream, {d['scenario']}** (`continual_{name}.json`; "
            f"`{d.get('reproduce') or d['command']}`; seeds {', '.join(map(str, d['seeds']))}; {c['backbone']}, {c['module']} "
            f"r{c['options'].get('r', '')}, ≤{c['max_train']} training and ≤{c['max_eval']} test examples per task, "
            f"{c['max_steps']} steps of {c['batch_size']} per task; tasks in order: "
            f"{' → '.join(f'`{t}`' for t in d['tasks'])}; percentage points, mean ± std):"),
           "", "| strategy | ACC | BWT | FWT | forgetting | intransigence | s per seed: train / eval / memory |",
           "|---|---|---|---|---|---|---|"]
    for s in strategies:
        m = d["strategies"][s]
        t = d["time_split"].get(s, {})
        tm = f"{t['train_s']:.0f} / {t['eval_s']:.0f} / {t['memory_s']:.0f}" if t else "—"
        if t.get("tasks_reused"):
            tm += " (experts reused from expert-oracle)"
        out.append(f"| {s} | " + " | ".join(pm(m, k) for k in ("acc", "bwt", "fwt", "forgetting", "intransigence"))
                   + f" | {tm} |")
    b = d["baselines"]
    zs = "—" if b.get("zero_shot_acc") is None else f"{100 * b['zero_shot_acc']:.1f}" + (
        "" if b.get("zero_shot_std") is None else f" ± {100 * b['zero_shot_std']:.1f}")
    out.append(f"| zero-shot (bare backbone) | {zs} | — | — | — | — | |")
    out.append(f"| majority class | {100 * b['majority_acc']:.1f} | — | — | — | — | |")
    return out + continual_costs(d, strategies)


def continual_costs(d: dict, strategies: list[str]) -> list[str]:
    """Where a result has them (ConPET runs): each task's training steps and seconds along the stream, the
    rows taken from an earlier result, MbPA++'s latency, and conpet-dynamic's inference cost."""
    out = []
    costs = [(s, d["strategies"][s]["cost_per_task"]) for s in strategies if d["strategies"][s].get("cost_per_task")]
    if costs:
        fmt = lambda xs, f: ", ".join("—" if x is None else f.format(x) for x in xs)
        out += ["", "Cost per task along the stream (mean over seeds; training steps | training seconds):", ""]
        out += [f"- {s}: {fmt(c['steps'], '{:.0f}')} | {fmt(c['train_s'], '{:.0f}')}" for s, c in costs]
    la = [(s, d["strategies"][s]["local_adapt_ms_per_example"]) for s in strategies
          if d["strategies"][s].get("local_adapt_ms_per_example") is not None]
    if la:
        out += ["", "MbPA++ local adaptation at test: " + "; ".join(f"{s} {v:.0f} ms per example" for s, v in la)
                + " (against the same strategy's evaluation without it: the row without -mbpa)."]
    base = [s for s in strategies if d["strategies"][s].get("from")]
    if base:
        load = (d.get("environment") or {}).get("load_avg")
        out += ["", (f"Rows {', '.join(base)} come from `{d.get('baseline_from')}` (the same config, data, steps "
                     "and seeds; checked by bench_continual.py). Their accuracies compare; their seconds do not: the "
                     "two were timed on differently loaded machines"
                     + (f" (this run's 1-minute load average {load[0]} on {d['environment'].get('cpus')} cores)"
                        if load else "") + ".")]
    return out


def _ms(xs) -> str:
    """mean ± sample std of accuracies over seeds, in percentage points."""
    import statistics

    xs = [x for x in xs if x is not None]
    if not xs:
        return "—"
    return f"{100 * statistics.fmean(xs):.1f}" + (f" ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else "")


def _cell(rs: list[dict], part: str, task: str, key: str) -> str:
    return _ms(next(x[key] for x in r[part] if x["task"] == task) for r in rs)


def _mean_row(rs: list[dict], keys: tuple[str, ...]) -> str:
    return "| **mean** | " + " | ".join(_ms(r["summary"].get(k) for r in rs) for k in keys) + " |"


def _eq_steps(rs: list[dict]) -> str:
    """The steps single-task prompt tuning took "at equal steps" (the task's share of the student's)."""
    steps = sorted({x.get("prompt_eq_steps") for r in rs for x in r["sources"]} - {None})
    same = all(x.get("prompt_eq_is_teacher") for r in rs for x in r["sources"])
    return ("/".join(map(str, steps)) + " steps" if steps else "steps") + (": the teacher's recipe" if same else "")


def _mpt_backbone(bb: str, agg: dict, rs: list[dict]) -> list[str]:
    p = agg["parameters"]
    seeds = ", ".join(str(r["seed"]) for r in rs)
    out = [(f"*{bb}* (seeds {seeds}; ≤{rs[0]['max_examples']} examples per split; trainable parameters per task: "
            f"teacher prompt {p['teacher_per_task']:,}, student factors {p['student_per_task']:,} "
            f"({p['student_over_teacher']:.3f} of a teacher's; the shared prompt, {p['shared_prompt']:,}, once)"
            + (f"; capped: every per-task fit ≤{rs[0]['max_steps_cap']} steps, the student "
               f"≤{rs[0]['max_steps_cap']} per source" if rs[0].get("max_steps_cap") else "") + ")"),
           "", f"| source task | teacher | MPT student | prompt tuning at equal steps ({_eq_steps(rs)}) | zero-shot | majority |",
           "|---|---|---|---|---|---|"]
    for t in [x["task"] for x in rs[0]["sources"]]:
        out.append(f"| `{t}` | " + " | ".join(_cell(rs, "sources", t, k) for k in
                                             ("teacher", "student", "prompt_eq", "zero_shot", "majority")) + " |")
    out.append(_mean_row(rs, ("teacher_mean", "student_mean", "prompt_eq_mean", "zero_shot_mean", "majority_mean")))
    if rs[0]["targets"]:
        out += ["", "| held-out task | MPT target stage | prompt tuning from scratch, equal steps | zero-shot | majority |",
                "|---|---|---|---|---|"]
        for t in [x["task"] for x in rs[0]["targets"]]:
            out.append(f"| `{t}` | " + " | ".join(_cell(rs, "targets", t, k) for k in
                                                 ("mpt", "prompt_scratch", "zero_shot", "majority")) + " |")
        out.append(_mean_row(rs, ("target_mpt_mean", "target_prompt_mean", "target_zero_shot_mean",
                                  "target_majority_mean")))
    sot = agg["student_over_teacher"]["mean"]
    out += ["", "Goals: " + "; ".join(f"{k}: {'—' if v is None else 'met' if v else 'missed'}"
                                    for k, v in agg["goals"].items())
            + ("" if sot is None else f" (student/teacher accuracy {100 * sot:.1f} %)"), ""]
    return out


def mpt_table(d: dict, name: str = "mpt") -> list[str]:
    """Multitask prompt tuning (`mpt.json`, `mpt_smollm2.json`): per backbone and task, mean ± std over seeds."""
    c = d["config"]
    out = [(f"**Multitask prompt tuning** (`{name}.json`; `{d['command']}`: "
            f"{c['n_tokens']} virtual tokens, rank {c['rank']}, teachers ≤{c['teacher']['max_steps']}, student "
            f"≤{c['student']['max_steps']}, target ≤{c['target']['max_steps']} steps of {c['student']['batch_size']}, "
            f"target init `{c['target']['init']}`; test accuracy in percentage points, mean ± std over seeds"
            + ("" if d.get("complete", True) else "; PARTIAL: not every run finished") + "):"), ""]
    for bb, agg in d["by_backbone"].items():
        out += _mpt_backbone(bb, agg, [r for r in d["runs"] if r["backbone"] == bb])
    return out


def ddp_line(d: dict) -> list[str]:
    """Training on several processes (`ddp.json`): steps per second of each configuration against one process."""
    c, rows = d["config"], {r["config"]: r for r in d["rows"]}
    base = rows["1proc_1thread"]["steps_per_s"]
    label = lambda r: (f"{r['processes']} process{'es' if r['processes'] > 1 else ''} x {r['threads_per_process']} "
                       f"thread{'s' if r['threads_per_process'] > 1 else ''}")
    parts = [f"{label(r)} {r['steps_per_s']:.2f} steps/s ({r['steps_per_s'] / base:.2f}x)" for r in rows.values()]
    return [(f"**Several processes** (`ddp.json`; `python benchmarks/bench_ddp.py`; {c['backbone']} LoRA expert, global "
             f"batch {c['global_batch']}, {c['strategy']}, {c['cores']} cores, median of {c['repeats']}): "
             + "; ".join(parts) + ".")]


def conpet_inference_line(d: dict) -> list[str]:
    """conpet-dynamic's inference cost against one expert (`conpet_inference.json`)."""
    c = d["config"]
    return [(f"**Inference cost of conpet-dynamic** (`conpet_inference.json`; `{d['reproduce']}`; {c['backbone']} "
             f"{c['module']}, {c['experts']} experts, {c['labels']} labels, a batch of {c['batch']}, {c['threads']} "
             f"thread, CPU ms, median of {c['repeats']}): one expert {d['one_expert_ms']:.0f} ms; the selector "
             f"{d['selector_ms']:.0f} ms; selector + top-1 expert {d['conpet_dynamic_top1_ms']:.0f} ms "
             f"({d['ratio_top1']:.2f}x); selector + top-2 experts {d['conpet_dynamic_top2_ms']:.0f} ms "
             f"({d['ratio_top2']:.2f}x).")]


def adapt_table(d: dict) -> list[str]:
    """Few-shot transfer (`adapt.json`): method x shots, over the held-out tasks and per task, mean ± std over seeds."""
    c = d["config"]
    shots, targets = c["shots"], list(d["per_target"])
    ms = lambda m, s: "" if m is None else f"{100 * m:.1f} ± {100 * s:.1f}"
    out = [(f"**Few-shot transfer** (`adapt.json`; `{d['reproduce']}`: {len(c['experts'])} LoRA experts "
            f"({', '.join(c['experts'])}), {c['adapt']['steps']} steps per fit, test accuracy in percentage points on "
            f"the whole test split, mean ± std over seeds {', '.join(map(str, c['seeds']))}"
            + ("" if d.get("complete", True) else "; PARTIAL: not every held-out task finished") + "):"), "",
           "| method | params | " + " | ".join(f"{k} shots (mean of {len(targets)} tasks)" for k in shots) + " |",
           "|---|---|" + "---|" * len(shots)]
    for m in c["methods"]:
        cells = [d["overall"].get(f"{m}@{k}") for k in shots]
        params = sorted({v for o in cells if o for v in o["trainable"].values()})
        out.append(f"| {m} | {'/'.join(f'{p:,}' for p in params)} | "
                   + " | ".join(ms(o and o["mean"], o and o["std"]) for o in cells) + " |")
    for b in ("zero_shot", "majority"):
        out.append(f"| {b.replace('_', '-')} | 0 | " + " | ".join(_pct(d["baselines"][b]) for _ in shots) + " |")
    out += ["", "| held-out task | method | " + " | ".join(f"{k} shots" for k in shots) + " |",
            "|---|---|" + "---|" * len(shots)]
    for t in targets:
        rows = {(r["method"], r["shots"]): r for r in d["per_target"][t]["summary"]}
        for m in c["methods"]:
            out.append(f"| `{t}` | {m} | " + " | ".join(ms(rows[(m, k)]["mean"], rows[(m, k)]["std"])
                                                     if (m, k) in rows else "" for k in shots) + " |")
    out += [""] + [f"- {k}: {'yes' if v else 'no'}" for k, v in d["checks"].items()]
    return out


def skills_table(d: dict) -> list[str]:
    """Skills shared across tasks (`skills.json`): per contender and baseline the mean over tasks and each task's
    accuracy, mean ± std over seeds, with the trainable parameters."""
    s, by, base = d["settings"], d["by_contender"], d.get("baselines", {})
    tasks = list(next(iter(by.values()))["per_task"])
    seeds = sorted({r["seed"] for r in d["runs"]})
    ms = lambda o: f"{100 * o['mean']:.1f} ± {100 * o['std']:.1f}"
    out = [(f"**Skills shared across tasks** (`skills.json`; `{d['reproduce']}`: {s['backbone']}, LoRA r "
            f"{s['options'].get('r')} skills, {s['skills']} skills, MHR {d['mhr_splits']} splits, {s['max_steps']} "
            f"steps per multitask run and {s['max_steps']} // {len(tasks)} per expert, ≤{s['max_examples']} examples "
            f"per split and task; test accuracy in percentage points, mean ± std over seeds "
            f"{', '.join(map(str, seeds))}):"), "",
           "| contender | params | mean | " + " | ".join(f"`{t}`" for t in tasks) + " |",
           "|---|---|---|" + "---|" * len(tasks)]
    for c, o in by.items():
        out.append(f"| {c} | {o['trainable_parameters']:,} | {ms(o['mean_accuracy'])} | "
                   + " | ".join(ms(o["per_task"][t]) for t in tasks) + " |")
    for k, o in base.items():
        out.append(f"| {k.replace('_', '-')} | 0 | {ms(o['mean_accuracy'])} | "
                   + " | ".join(ms(o["per_task"][t]) for t in tasks) + " |")
    return out


def memory_table(d: dict) -> list[str]:
    """Replay-memory search (`memory.json`): 32 queries, k = 32, CPU ms per search, against torch."""
    out = [(f"**Replay memory search** (`memory.json`; 32 queries, k = 32, d = 384, clustered keys, "
            f"{d['config']['threads']} thread, CPU ms per search (this process's CPU time: the machine was shared, "
            f"1-minute load average {d['load_avg_start'][0]} → {d['load_avg_end'][0]} on 2 cores); goal: approximate "
            "search at 1e5 under 2 ms with recall ≥ 0.95):"), "",
           "| items | torch matmul + top-k | memory (default path) | its recall@32 | FAISS flat | adds/s |",
           "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        ivf = r.get("memory_ivf")
        path = "exact" if not ivf else f"IVF {ivf['nlist']} lists, nprobe {ivf['nprobe']} (calibrated), fp16"
        flat = f"{r['faiss_flat_cpu_ms']:.1f}" if "faiss_flat_cpu_ms" in r else "—"
        out.append(f"| {r['items']:,} | {r['torch_matmul_topk_cpu_ms']:.1f} | {r['memory_auto_cpu_ms']:.2f} ({path}) "
                   f"| {r['recall_memory_auto']:.3f} | {flat} | {r['adds_per_s_fill']:,.0f} |")
    return out


def goals(train_runs: list[dict], inf: dict | None, zs: dict | None = None) -> list[str]:
    out = ["Goals from the issue (goals, not asserts):", ""]
    for d in train_runs:
        for r in d["rows"]:
            x = r["mtpeft/peft"]
            ok = "met" if x <= 1.0 else f"parity: within the ±{NOISE:.0%} run-to-run spread" if x <= 1 + NOISE else "missed"
            out.append(f"- training step no slower than peft, {d['config']['backbone']} {r['type']}: "
                       f"{r['mtpeft/peft']:.3f} ({ok})")
    for d in (inf, zs):
        for k, v in (d or {}).get("goals", {}).items():
            lhs, op, bound = k.rsplit(" ", 2)
            ok = v <= float(bound) if op == "<=" else v < float(bound)
            out.append(f"- `{lhs} {op} {bound}`: {v:.3f} ({'met' if ok else 'missed'})")
    return out


def render() -> str:
    parts: list[list[str]] = []
    for name in ("demo", "tweets", "tweets-olora-orth", "mixed-cil", "mixed-til", "tweets-conpet", "mixed-cil-conpet"):
        if (d := _load(f"continual_{name}")):
            parts.append(continual_table(d, name))
    if (d := _load("conpet_inference")):
        parts.append(conpet_inference_line(d))
    if (d := _load("ddp")):
        parts.append(ddp_line(d))
    if (d := _load("memory")):
        parts.append(memory_table(d))
    for name in ("mpt", "mpt_smollm2"):  # the causal backbone's capped run has its own file
        if (d := _load(name)):
            parts.append(mpt_table(d, name))
    if (d := _load("skills")):
        parts.append(skills_table(d))
    if (d := _load("adapt")):
        parts.append(adapt_table(d))
    if (d := _load("experts_minilm_lora")):
        parts.append(experts_table(d))
    train = _load("train_step")
    runs = [x for x in (train, _load("train_step_smollm2")) if x]
    if runs:
        parts.append(train_table(runs))
    inf = _load("inference")
    if inf:
        parts.append(inference_table(inf))
    if (d := _load("routing")):
        parts.append(routing_table(d))
    zs = _load("zeroshot_routing")
    if zs:
        parts.append(zeroshot_table(zs))
    if (d := _load("kernel_threshold")):
        parts.append(chooser_line(d))
    if (d := _load("scorer_smollm2")):
        parts.append(scorer_table(d))
    for name in ("route_heldout", "route_heldout_long"):
        if (d := _load(name)):
            parts.append(route_table(d, name))
    parts.append(goals(runs, inf, zs))
    return "\n\n".join("\n".join(p) for p in parts)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    src = readme.read_text()
    if START not in src or END not in src:
        raise SystemExit(f"report: README.md lacks the markers {START} / {END}; add them around the results")
    head, rest = src.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{text}\n{END}{tail}"
    fd, tmp = tempfile.mkstemp(dir=ROOT, prefix=".README.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", action="store_true", help="rewrite README.md's results block in place")
    a = p.parse_args(argv)
    text = render()
    if a.readme:
        write_readme(text)
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
