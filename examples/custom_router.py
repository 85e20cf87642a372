"""A router in a few lines: send each input to the expert whose task centroid is nearest.

The router reads the frozen backbone's pooled embedding from the routing context, compares it with a
centroid stored beside each expert as a bank artifact, and returns the bank's ``Routing``. It names its
experts, so it follows the bank through changes; its state is the artifacts, saved with the bank.

    .venv/bin/python examples/custom_router.py [--steps 40] [--max-examples 300]

Trains a LoRA expert on two built-in tasks (MiniLM, capped), then scores their mixed test sets with no
task ids: the router picks the expert per input (about 2 min on 2 cores).
"""
from __future__ import annotations

import argparse

import torch

from mtpeft.routers import Router, register_router
from mtpeft.routing import Routing


@register_router("nearest_centroid")
class NearestCentroid(Router):
    """Per example: the expert whose ``centroid`` artifact is most similar to the input's pooled embedding."""

    def route(self, bank, ctx):
        centroids = torch.stack([bank.artifact(n, "centroid") for n in self.module_names]).to(bank.device)
        best = (ctx.pooled() @ centroids.t()).argmax(-1)  # [B]: one matmul, no loop over examples
        return Routing.one_hot(self.module_ids(bank.device)[best])


def store_centroid(bank, scorer, name, texts, n=64):
    """The mean pooled embedding of ``n`` of the expert's training inputs, kept as its artifact."""
    enc = scorer.tokenize(texts[:n], bank.device)
    bank.set_artifact(name, "centroid", bank.pooled(enc["input_ids"], enc["attention_mask"]).mean(0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-examples", type=int, default=300)
    args = ap.parse_args(argv)

    from mtpeft import (
        LabelSpace,
        ModuleBank,
        TrainConfig,
        fit_expert,
        load_backbone,
        load_builtin,
        make_scorer,
    )

    bb = load_backbone("minilm")
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    tasks = [load_builtin(t, max_examples=args.max_examples) for t in ("bbc_topic", "wordnet_pos")]
    for t in tasks:
        fit_expert(bank, scorer, t, f"{t.name}-lora", "lora", {"r": 8},
                   TrainConfig(max_steps=args.steps, progress=False))
        store_centroid(bank, scorer, f"{t.name}-lora", t.splits["train"]["text"])
    router = NearestCentroid([f"{t.name}-lora" for t in tasks])

    # the mixed test sets, no task id at test: every example against the union of the labels
    texts = [x for t in tasks for x in t.splits["test"]["text"]]
    owner = [t for t in tasks for _ in t.splits["test"]["text"]]
    space = LabelSpace.union(tasks)
    gold = torch.cat([space.to_global(t, torch.tensor(t.splits["test"]["label"])) for t in tasks])
    with torch.no_grad():
        logits = torch.cat([scorer.logits(bank, texts[i:i + 64], None, router, labels=space)
                            for i in range(0, len(texts), 64)])
        picked = torch.cat([router.route(bank, _ctx(bank, scorer, texts[i:i + 64]))
                            .indices[:, 0] for i in range(0, len(texts), 64)])
    want = torch.tensor([bank.index(f"{t.name}-lora") for t in owner])
    print(f"expert picked right: {(picked == want).float().mean():.3f}   "
          f"accuracy over the {len(space)}-label union: {(logits.argmax(-1) == gold).float().mean():.3f}")


def _ctx(bank, scorer, texts):
    from mtpeft.routing import RouteContext

    enc = scorer.tokenize(texts, bank.device)
    return RouteContext(embed_fn=lambda: bank.pooled(enc["input_ids"], enc["attention_mask"]))


if __name__ == "__main__":
    main()
