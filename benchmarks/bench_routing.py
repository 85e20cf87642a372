"""One 384x384 linear layer, 2,048 tokens, LoRA r=8: routed banks of E experts vs a single LoRA.

Per-token top-2 routing (random logits, to time the layer) through the dispatch mtpeft picks, and
through each path forced (dense over all experts, grouped by selected expert), interleaved.
Run: `.venv/bin/python benchmarks/bench_routing.py` (writes benchmarks/results/routing.json).
"""
from __future__ import annotations

import argparse

import torch
from common import interleaved, save
from torch import nn

from mtpeft import kernels
from mtpeft.modules.lora import LoRAConfig, LoRAStack
from mtpeft.routing import Routing, localize


def stack(E: int, base: nn.Linear, r: int) -> LoRAStack:
    st = LoRAStack(LoRAConfig(r=r), base)
    g = torch.Generator().manual_seed(0)
    for _ in range(E):
        st.add_expert(g)
    with torch.no_grad():
        for p in st.parameters():
            p.normal_(0, 0.02)
    return st.requires_grad_(False)


def forced(threshold: int, st, x, loc, base):
    def f():
        old = kernels.DENSE_TOKEN_MAX_EXPERTS
        kernels.DENSE_TOKEN_MAX_EXPERTS = threshold
        try:
            return base(x) + kernels.routed_delta(st, x, loc)
        finally:
            kernels.DENSE_TOKEN_MAX_EXPERTS = old
    return f


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    base = nn.Linear(a.d, a.d).requires_grad_(False)
    x = torch.randn(1, a.tokens, a.d)
    single = stack(1, base, a.r)
    loc1 = localize(Routing.one_hot([0]), torch.arange(1), 1)
    rows = []
    with torch.no_grad():
        for E in a.experts:
            st = stack(E, base, a.r)
            loc = localize(Routing.topk(torch.randn(1, a.tokens, E), a.k), torch.arange(E), E)
            t = interleaved({
                "base_linear": lambda: base(x),
                "single_lora": lambda: base(x) + kernels.routed_delta(single, x, loc1),
                "routed_auto": lambda: base(x) + kernels.routed_delta(st, x, loc),
                "routed_dense": forced(10**9, st, x, loc, base),
                "routed_grouped": forced(0, st, x, loc, base),
            }, repeats=a.repeats)
            t["experts"] = E
            t["auto_vs_single"] = round(t["routed_auto"] / t["single_lora"], 3)
            rows.append(t)
    e8 = next((r for r in rows if r["experts"] == min(a.experts)), rows[0])
    for r in rows:
        r["auto_vs_smallest_bank"] = round(r["routed_auto"] / e8["routed_auto"], 3)
    save("routing", {"config": vars(a), "rows": rows,
                     "dense_token_max_experts": kernels.DENSE_TOKEN_MAX_EXPERTS})


if __name__ == "__main__":
    main()
