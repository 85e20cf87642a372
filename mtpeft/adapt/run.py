"""The few-shot transfer loop: for each seed and shot count, draw the shots, run every method, score the whole test
split, and drop the method's module again (``keep``: leave it in the bank, under a unique name).

The report (``adapt-report.json`` in ``out``, written atomically after every run, so a stopped run resumes where
it stopped) holds every run (method, shots, seed, accuracy, parameters trained, seconds, details), the table
(method x shots: mean and std over seeds), the zero-shot and majority baselines, and the Fisher similarity of the
experts and the target for each draw of the shots (also plotted, ``similarity-k<K>-seed<S>.png``).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import MtpeftError
from .fisher import (
    fisher_sizes,
    has_fisher,
    plot_similarity,
    probe_fisher,
    similarity_matrix,
    store_fisher,
    stored_fisher,
)
from .methods import AdaptContext, Budget, get_method, method_names
from .shots import check_shots, sample_shots

REPORT = "adapt-report.json"
# what the methods compute, in the resume key. 2: task embeddings on a probe with one initialisation for every
# task, compared with the reference's (Task2Vec's) normalisation; pi-tuning interpolates weight deltas.
# 1 (no revision in the key): each expert's own Fisher, plain cosines, interpolated factors.
REVISION = 2
FORMAT = "mtpeft-adapt-report/1"


def check_methods(methods) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    methods = list(methods or [])
    if not methods or not all(methods):
        raise MtpeftError(f"name the methods to compare, e.g. --methods scratch,lorahub (known: {', '.join(method_names())})")
    for m in methods:
        get_method(m)  # an unknown name fails here, listing the known ones
    if len(set(methods)) != len(methods):
        raise MtpeftError(f"a method is named twice in {methods}; name each once")
    return methods


def source_experts(bank, target: str, names: Sequence[str] | None = None, required: bool = True) -> list[str]:
    """The source experts: ``names``, or every LoRA module of the bank trained on a task other than ``target`` (not
    merged, not itself a composition or an adapted module). ``required``: none is an error (else an empty list)."""
    if names:
        names = list(names)
        for n in names:
            bank.index(n)  # an unknown name lists the bank's modules
        own = [n for n in names if bank.record(n).task == target]
        if own:
            raise MtpeftError(f"expert(s) {own} were trained on the target task {target!r}; few-shot transfer uses "
                              "experts of other tasks: leave them out of --experts")
        return names
    from ..routers.fusion import ADAPTER_TYPES

    def of(types):
        return [r.name for r in bank.records if r.task and r.task != target and r.type in types and not r.merged
                and "adapt" not in r.metadata and "merged_from" not in r.metadata]

    out = of(("lora",)) or of(ADAPTER_TYPES)  # LoRA experts; a bank of adapters alone: its adapters (fusion)
    if not out and not required:
        return out
    if not out:
        have = ", ".join(f"{r.name} ({r.type}, task {r.task})" for r in bank.records) or "no modules"
        raise MtpeftError(f"the bank has no source experts for {target!r} (LoRA modules, or else bottleneck adapters, "
                          f"trained on other tasks; it has {have}); train some first: `mtpeft train --module lora "
                          "--task T --out BANK`")
    groups = {bank.group_of(n).key for n in out}
    if len(groups) > 1:
        raise MtpeftError(f"the bank's experts {out} have {len(groups)} configurations; choose experts of one "
                          "configuration with --experts a,b,...")
    return out


def check_skills(bank, skills, target: str):
    """The skills' router for the methods that adapt skills (poly, mhr-z, mhr-mu): given, bound to ``bank``, and
    not trained on the target task."""
    from ..routers.poly import PolyRouter

    if skills is None:
        raise MtpeftError("poly, mhr-z and mhr-mu adapt the bank's skills and need their routing: in Python "
                          "run_adapt(..., skills=mtpeft.skills.load_skills(bank, BANK, NAME)); `mtpeft adapt` reads it "
                          "from BANK/routers/NAME/ (none there: train the skills again with `mtpeft train --router "
                          "poly|mhr --skills N --multitask ... --out BANK`)")
    if not isinstance(skills, PolyRouter):
        raise MtpeftError(f"skills= takes the skills' router (a PolyRouter, mtpeft.skills.load_skills), got "
                          f"{type(skills).__name__}")
    skills.check_bank(bank)
    if target in skills.tasks:
        raise MtpeftError(f"the skills {skills.module_names[0]}.. were trained on the target task {target!r}; few-shot "
                          "transfer adapts them to a task they did not see: train skills without it")
    return skills.eval()


def probe_settings(budget: Budget, parallel=None) -> dict:
    """The Fisher probe's settings from a budget: the same for every expert's task and for the target."""
    return {"steps": budget.probe_steps, "lr": budget.lr, "batch_size": budget.batch_size,
            "max_batches": budget.fisher_batches, "parallel": parallel}


def expert_fisher(bank, scorer, experts: list[str], tasks: dict, budget: Budget, seed: int = 0,
                  log: Callable[[str], None] = print, parallel=None) -> tuple[dict, list[str]]:
    """Every expert's task embedding: the stored ``task-fisher`` artifact, else its task's probe Fisher
    (``fisher.probe_fisher`` on its task's data: ``tasks`` by name, else the built-in task of that name) stored in
    the bank in memory. Returns them and the names computed now."""
    from ..suite import builtin_names, load_task

    out, computed = {}, []
    for e in experts:
        if has_fisher(bank, e):
            out[e] = stored_fisher(bank, e)
            continue
        tname = bank.record(e).task
        task = tasks.get(tname)
        if task is None and tname in builtin_names():
            task = load_task(tname, seed=seed)
        if task is None:
            raise MtpeftError(f"expert {e!r} has no Fisher embedding and its task {tname!r} is not built in: store it "
                              f"with `mtpeft embed --bank BANK --task-file {tname}=PATH`, or give --source-file "
                              f"{tname}=PATH")
        log(f"Fisher embedding of {tname} for {e} (probe: {budget.probe_steps} steps, {budget.fisher_batches} "
            "batches)")
        out[e] = store_fisher(bank, scorer, task, e, seed=seed, **probe_settings(budget, parallel))
        computed.append(e)
    return out, computed


def _target_similarity(bank, scorer, few, experts, embs, budget, seed, log, parallel=None) -> dict:
    """The target's Fisher embedding (the probe, as the experts' tasks got theirs, trained on the shots), then the
    similarity matrix of experts + target."""
    target = probe_fisher(bank, scorer, few, experts[0], seed=seed, **probe_settings(budget, parallel))
    E = torch.stack([embs[e] for e in experts] + [target])
    S = similarity_matrix(E, fisher_sizes(bank, experts[0]))
    names = [*experts, f"{few.name} (target)"]
    to_target = {e: float(S[-1, i]) for i, e in enumerate(experts)}
    log(f"similarity to the target: {', '.join(f'{e} {v:.3f}' for e, v in to_target.items())}")
    return {"names": names, "matrix": [[round(float(x), 6) for x in row] for row in S], "to_target": to_target}


def _accuracy(bank, scorer, task, module: str | None = None, router=None) -> float:
    """Test accuracy of ``module`` or through ``router`` (AdapterFusion); on several processes each rank scores
    its share of the split (a collective) and every rank gets the whole split's accuracy."""
    from ..distributed import eval_shard
    from ..train import evaluate, split_accuracy

    if router is None:
        return evaluate(bank, scorer, task, module, shard=eval_shard())["accuracy"]
    router.eval()
    return split_accuracy(bank, scorer, task, lambda n: router, shard=eval_shard())["accuracy"]


def _stat(xs: list[float]) -> dict:
    return {"mean": round(statistics.fmean(xs), 6), "std": round(statistics.stdev(xs), 6) if len(xs) > 1 else 0.0,
            "n": len(xs)}


def summarise(runs: list[dict], methods: list[str], shots: list[int]) -> list[dict]:
    """Method x shots: mean and std over seeds of the test accuracy, and the parameters each method trained."""
    rows = []
    for m in methods:
        for k in shots:
            rs = [r for r in runs if r["method"] == m and r["shots"] == k]
            if rs:
                rows.append({"method": m, "shots": k, **_stat([r["accuracy"] for r in rs]),
                             "trainable": rs[0]["trainable"], "seconds": round(statistics.fmean(r["seconds"] for r in rs), 2)})
    return rows


def _key(task, experts, methods, shots, seeds, budget, max_examples, skills=None) -> dict:
    b = dataclasses.asdict(budget)
    key = {"task": task.name, "experts": experts, "budget": b, "max_examples": max_examples,
           "test_n": len(task.splits["test"]), "revision": REVISION}
    if skills is None:  # the skills' settings only where a method uses them: older reports still resume
        b.pop("router_lr")
    else:
        key["skills"] = list(skills.module_names)
    return key


def _resume(out: Path | None, key: dict) -> dict | None:
    from ..io import read_json

    if out is None or not (out / REPORT).exists():
        return None
    old = read_json(out / REPORT, what="adapt report")
    if not isinstance(old, dict) or old.get("format") != FORMAT or not isinstance(old.get("runs"), list):
        raise MtpeftError(f"{out / REPORT} is not an adapt report; choose another --out or remove it")
    if old.get("key") != key:
        raise MtpeftError(f"{out / REPORT} was written by a run with other settings (task, experts, budget or caps) "
                          "or by an older mtpeft whose methods differ; choose another --out, or remove it to start "
                          "again")
    return old


def run_adapt(bank, scorer, task, shots, methods, seeds=(0,), budget: Budget | None = None, *,
              experts: Sequence[str] | None = None, source_tasks: dict | None = None, out: str | Path | None = None,
              keep: bool = False, max_examples: int | None = None, log: Callable[[str], None] | None = None,
              save: Callable[[list[str]], None] | None = None, skills=None,
              save_router: Callable[[str, object], None] | None = None, parallel=None, writer: bool = True) -> dict:
    """Few-shot transfer of the bank's experts to ``task`` (see the module doc). ``source_tasks``: the experts'
    task data by name where not built in (for their Fisher embeddings). ``save(names)``: called after each kept
    module and after computing expert embeddings when ``keep`` (writes the bank); ``save_router(name, router)``:
    after each kept result that is a router (AdapterFusion), e.g. into ``BANK/routers/<name>/``. ``skills``: the
    router of the bank's skills (``mtpeft.skills.load_skills``), for poly, mhr-z and mhr-mu; left as it was.

    ``parallel`` (``mtpeft.distributed.Parallel``): every fit on several processes (Lightning DDP) and every test
    split scored in shares. Every rank runs this same function, reading ``out`` to resume; only the ``writer``
    (rank zero) writes the report and the heatmaps (give the others no ``save``/``save_router``). LoraHub's search
    runs whole on every rank (the same seeded computation: the same result); the Fisher probes are fits like the
    others (on every rank, collectively), their Fisher then taken whole on every rank."""
    from ..io import write_json

    log = log or (lambda msg: None)
    budget = budget or Budget()
    shots, methods = check_shots(shots), check_methods(methods)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise MtpeftError(f"give distinct seeds, e.g. --seeds 0,1,2 (got {seeds})")
    impls = {m: get_method(m) for m in methods}
    experts = source_experts(bank, task.name, experts, required=any(i.needs_experts for i in impls.values()))
    for impl in impls.values():
        impl.check(bank, experts)
    skills = check_skills(bank, skills, task.name) if any(i.needs_skills for i in impls.values()) else None
    if parallel is not None:
        parallel.check_batch(budget.batch_size)
    out = Path(out) if out is not None else None
    write = out is not None and writer
    key = _key(task, experts, methods, shots, seeds, budget, max_examples, skills)
    old = _resume(out, key)
    embs, computed = {}, []
    if any(i.uses_similarity for i in impls.values()):
        embs, computed = expert_fisher(bank, scorer, experts, source_tasks or {}, budget, log=log, parallel=parallel)
    # the computed embeddings are saved at once; on several processes with the first kept module instead, after
    # a collective fit, when every rank has read the bank (a rank started by torchrun may still be reading it)
    pending = list(computed) if keep and save is not None else []
    if pending and not (parallel is not None and parallel.distributed):
        save(pending)
        pending = []
    zero = _accuracy(bank, scorer, task)
    report = {"format": FORMAT, "key": key, "task": task.name, "shots": shots, "seeds": seeds, "methods": methods,
              "experts": experts, "budget": dataclasses.asdict(budget), "test_n": len(task.splits["test"]),
              "baselines": {"zero_shot": zero, "majority": task.majority_baseline("test")},
              "fisher_computed": computed, "samples": {}, "similarity": {}, "runs": [], "complete": False}
    if old is not None:
        report.update(runs=old["runs"], samples=old.get("samples", {}), similarity=old.get("similarity", {}))
    done = {(r["method"], r["shots"], r["seed"]) for r in report["runs"]}
    for seed in seeds:
        for k in shots:
            few, info = sample_shots(task, k, seed)
            tag = f"k{k}-seed{seed}"
            report["samples"][tag] = info
            if info["short"]:
                log(f"{k} shots, seed {seed}: class(es) with fewer than {k} training examples get all they have: "
                    f"{info['short']}")
            prefix = f"{task.name}.adapt.k{k}.s{seed}"
            cache: dict = {}

            def similarity(few=few, seed=seed, tag=tag, cache=cache):
                if not cache:
                    cache.update(_target_similarity(bank, scorer, few, experts, embs, budget, seed, log,
                                                    parallel))
                    report["similarity"][tag] = {k2: v for k2, v in cache.items() if k2 != "to_target"}
                    if write:
                        out.mkdir(parents=True, exist_ok=True)
                        S = torch.tensor(cache["matrix"])
                        p = plot_similarity(cache["names"], S, out / f"similarity-{tag}.png",
                                            f"Fisher similarity, {task.name}, {tag}")
                        report["similarity"][tag]["plot"] = p.name
                return cache

            for m in methods:
                if (m, k, seed) in done:
                    continue
                name = f"{prefix}.{m}"
                if name in bank:
                    raise MtpeftError(f"the bank already holds a module {name!r} (kept by an earlier run); remove it "
                                      f"(`mtpeft bank rm BANK {name}`) or adapt into another bank")
                ctx = AdaptContext(bank, scorer, few, experts, seed, budget, name, similarity, log, skills, parallel)
                t0 = time.perf_counter()
                try:
                    res = impls[m].run(ctx)
                except BaseException:
                    if name in bank:
                        bank.remove(name)
                    raise
                # AdapterFusion: scored through its router, no module of its own
                acc = _accuracy(bank, scorer, few, res.module if res.router is None else None, res.router)
                secs = round(time.perf_counter() - t0, 2)
                if res.router is not None:
                    if keep and save_router is not None:
                        save_router(res.module, res.router)
                elif keep:
                    if save is not None:
                        save([*pending, res.module])
                        pending = []
                else:
                    bank.remove(res.module)
                row = {"method": m, "shots": k, "seed": seed, "accuracy": acc, "trainable": res.trainable,
                       "seconds": secs, "module": res.module if keep else None, "n_train": info["n_train"],
                       "info": res.info}
                report["runs"].append(row)
                log(f"{m} {k} shots seed {seed}: accuracy {acc:.4f} ({res.trainable} parameters, {secs} s)")
                report["summary"] = summarise(report["runs"], methods, shots)
                if write:
                    out.mkdir(parents=True, exist_ok=True)
                    write_json(out / REPORT, report)
    if pending:  # no module was kept (e.g. fusion alone): the embeddings are saved now
        save(pending)
    report["summary"] = summarise(report["runs"], methods, shots)
    report["complete"] = True
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / REPORT, report)
    return report
