"""Inference cost of Dynamic ConPET against one expert (issue 13): the CPU time to score a batch of test inputs
over the stream's full label space with one expert (what expert-oracle pays with the task id) and with
conpet-dynamic (the selector's forward, then one forward per kept expert, each example routed to its own
expert in the same batch, and the masking), with ``top_k`` 1 and 2.

    python benchmarks/bench_conpet.py [--config configs/continual-mixed-cil-conpet.yaml] [--batch 64]

Experts and the selector are freshly initialised, not trained: the cost of a forward does not depend on the
weights. Writes ``benchmarks/results/conpet_inference.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's mtpeft, not an installed one

from common import save

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(1000 * (time.process_time() - t0))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "continual-mixed-cil-conpet.yaml")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    from mtpeft.continual.config import load_config
    from mtpeft.continual.runner import ContinualRun, _train_config
    from mtpeft.continual.strategies import Context
    from mtpeft.continual.strategies.base import only
    from mtpeft.continual.strategies.conpet_dynamic import ConPETDynamic, SelectedExperts

    torch.set_num_threads(a.threads)
    conf = {**load_config(a.config), "max_train": 16, "max_eval": a.batch}
    run = ContinualRun(conf, ROOT / "benchmarks" / "work" / "bench-conpet-unused", progress=False)
    stream = run.stream(0)
    bank, scorer = run._fresh()
    ctx = Context(bank, scorer, stream, conf["module"], dict(conf["options"]), _train_config(conf, 0, None), 0,
                  run._memory(bank, 0, None), None, False)
    strategy = ConPETDynamic(ctx, policy="config")
    for t in stream.tasks:
        strategy.add_module(strategy.module_name(t), t, trainable=False)
    strategy._grow(len(stream))
    last = len(stream) - 1
    task = stream.tasks[0]
    space = stream.eval_space(last, task)
    texts = list(task.splits["test"]["text"])[: a.batch]
    bank.eval()
    rows = {}
    with torch.no_grad():
        rows["one_expert_ms"] = cpu_ms(lambda: scorer.logits(bank, texts, task, only(strategy.module_name(task)),
                                                             labels=space), a.repeats)
        for k in (1, 2):
            strategy.options["top_k"] = k
            sel = SelectedExperts(strategy, last)
            rows[f"conpet_dynamic_top{k}_ms"] = cpu_ms(lambda sel=sel: sel.predict_logits(bank, scorer, texts, task, space),
                                                       a.repeats)
        rows["selector_ms"] = cpu_ms(lambda: strategy.selector_logits(texts), a.repeats)
    payload = {"config": {"file": str(a.config.relative_to(ROOT)) if a.config.is_relative_to(ROOT) else str(a.config),
                          "backbone": conf["backbone"], "module": conf["module"], "experts": len(stream),
                          "labels": len(space), "batch": len(texts), "threads": a.threads, "repeats": a.repeats},
               **{k: round(v, 1) for k, v in rows.items()},
               "ratio_top1": round(rows["conpet_dynamic_top1_ms"] / rows["one_expert_ms"], 2),
               "ratio_top2": round(rows["conpet_dynamic_top2_ms"] / rows["one_expert_ms"], 2),
               "reproduce": "python benchmarks/bench_conpet.py" + ("" if a.config.name ==
                                                                    "continual-mixed-cil-conpet.yaml"
                                                                    else f" --config {a.config}")}
    save("conpet_inference", payload)


if __name__ == "__main__":
    main()
