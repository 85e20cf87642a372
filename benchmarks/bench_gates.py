"""Where PHATGOOSE and retrieval send real inputs: one LoRA expert per task on a real backbone, each gated by the
recipe (100 steps, AdamW lr 5e-3, no weight decay, 6% warmup) and given its retrieval centroid; then, for each
task's test inputs (the experts' own tasks and held-out ones), the mean routing weight per expert (PHATGOOSE:
over every token and layer; retrieval: per example) and the accuracy under each router, beside the bare
backbone and task-id routing where the task has an expert.

Run: `nice -n 10 .venv/bin/python benchmarks/bench_gates.py` (writes benchmarks/results/gates_minilm.json);
`--quick` for a smoke run. A check of the routers' behaviour, not of speed.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import save

from mtpeft import ModuleBank, TrainConfig, evaluate, fit_expert, load_backbone, load_builtin, make_scorer
from mtpeft.gates import prepare_expert
from mtpeft.routers import PhatgooseRouter, RetrievalRouter

EXPERTS = ["bbc_topic", "tweet_airline", "tweet_deflategate", "wordnet_noun", "wordnet_verb"]
HELD_OUT = ["tweet_apple", "tweet_coachella", "tweet_selfdriving", "wordnet_pos"]


class Recording:
    """Delegates to a router; sums each module's routing weight per example (real tokens, every site)."""

    def __init__(self, inner, num_modules: int):
        self.inner, self.E, self.per_site = inner, num_modules, inner.per_site
        self.sum = torch.zeros(num_modules, dtype=torch.float64)
        self.count = 0

    def check_bank(self, bank):
        self.inner.check_bank(bank)

    def _add(self, r, mask):
        w = torch.zeros(*r.weights.shape[:-1], self.E).scatter_add_(-1, r.indices.cpu(), r.weights.float().cpu())
        if w.dim() == 3:
            m = mask.cpu().float()
            w = (w * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        self.sum += w.sum(0).double()
        self.count += w.shape[0]

    def route(self, bank, ctx):
        r = self.inner.route(bank, ctx)
        self._add(r, None)
        return r

    def at_site(self, site, x, ctx):
        r = self.inner.at_site(site, x, ctx)
        m = ctx.token_mask(x)
        if r is not None and m is not None and m.shape[0] == x.shape[0]:
            self._add(r, m)
        return r

    def mean(self) -> list[float]:
        return (self.sum / max(self.count, 1)).tolist()


@torch.no_grad()
def routed_eval(bank, scorer, router, task, n: int, batch: int = 32) -> dict:
    """Accuracy of ``task``'s first ``n`` test inputs under ``router`` and the mean weight per expert."""
    rec = Recording(router, len(bank))
    ds = task.splits["test"]
    texts, gold = list(ds["text"])[:n], torch.tensor(ds["label"][:n])
    preds = []
    for s in range(0, len(texts), batch):
        chunk = texts[s:s + batch]
        preds.append(scorer.logits(bank, chunk, [task] * len(chunk), rec).argmax(-1).cpu())
    acc = float((torch.cat(preds) == gold).float().mean())
    mean = rec.mean()  # over sites too for per-token routers: normalise to one per example
    total = sum(mean)
    return {"accuracy": round(acc, 4), "weights": {m: round(w / total, 4) for m, w in zip(bank.names, mean)}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--experts", default=",".join(EXPERTS))
    ap.add_argument("--held-out", default=",".join(HELD_OUT))
    ap.add_argument("--max-examples", type=int, default=600, help="cap on each split")
    ap.add_argument("--steps", type=int, default=150, help="expert training steps")
    ap.add_argument("--gate-steps", type=int, default=100)
    ap.add_argument("--gate-lr", type=float, default=5e-3)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 experts, 1 held-out task, few steps")
    a = ap.parse_args(argv)
    experts, held = a.experts.split(","), [t for t in a.held_out.split(",") if t]
    if a.quick:
        experts, held, a.max_examples, a.steps, a.gate_steps, a.eval_examples = experts[:2], held[:1], 64, 4, 4, 32
    torch.manual_seed(a.seed)
    bb = load_backbone(a.backbone)
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    cfg = TrainConfig(max_steps=a.steps, lr=2e-3, progress=False, seed=a.seed)
    tasks = {n: load_builtin(n, max_examples=a.max_examples, seed=a.seed) for n in experts + held}
    t0 = time.perf_counter()
    fits = {}
    for n in experts:
        fit_expert(bank, scorer, tasks[n], f"{n}-lora", "lora", {"r": 8}, cfg)
        fits[n] = prepare_expert(bank, scorer, tasks[n], f"{n}-lora", cfg, steps=a.gate_steps, lr=a.gate_lr)
        print(n, fits[n], flush=True)
    train_s = time.perf_counter() - t0
    routers = {"phatgoose": PhatgooseRouter.from_bank(bank), "retrieval": RetrievalRouter.from_bank(bank)}
    rows = []
    for n in experts + held:
        t = tasks[n].cap(a.eval_examples, seed=a.seed, splits=["test"]) if a.eval_examples else tasks[n]
        row = {"task": n, "held_out": n in held, "zero_shot": round(evaluate(bank, scorer, t, None)["accuracy"], 4)}
        if n in experts:
            row["expert"] = round(evaluate(bank, scorer, t, f"{n}-lora")["accuracy"], 4)
        for rname, r in routers.items():
            got = routed_eval(bank, scorer, r, t, a.eval_examples)
            row[rname] = got["accuracy"]
            row[f"{rname}_weights"] = got["weights"]
            row[f"{rname}_top"] = max(got["weights"], key=got["weights"].get)
        rows.append(row)
        print({k: v for k, v in row.items() if not k.endswith("_weights")}, flush=True)
    save(f"gates_{a.backbone}" + ("_quick" if a.quick else ""), {
        "config": {"backbone": a.backbone, "experts": experts, "held_out": held, "max_examples": a.max_examples,
                   "expert_steps": a.steps, "gate_steps": a.gate_steps, "gate_lr": a.gate_lr,
                   "eval_examples": a.eval_examples, "seed": a.seed, "top_k": {"phatgoose": 2, "retrieval": 1}},
        "gate_fits": fits, "train_seconds": round(train_s, 1), "rows": rows}, quiet=True)


if __name__ == "__main__":
    main()
