"""One 384x384 linear layer, 2,048 tokens, LoRA r=8: routed banks of E experts vs a single LoRA.

Per-token top-2 routing (random logits, to time the layer) through the dispatch mtpeft picks
(``kernels.token_path``), and through each path forced (dense over all experts, grouped by selected
expert), interleaved. The whole-model version is benchmarks/bench_inference.py; where the dispatch
switches, per stack shape, benchmarks/bench_kernels.py.
Run: `.venv/bin/python benchmarks/bench_routing.py` (writes benchmarks/results/routing.json);
`--quick` for a smoke run.
"""
from __future__ import annotations

import argparse

import torch
from common import add_common_args, interleaved, print_table, save, setup_threads
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


def forced(path: str, st, x, loc, base):
    return lambda: base(x) + kernels.routed_delta(st, x, loc, path=path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=15, warmup=3)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup = 3, 1
    setup_threads(a)
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
                "routed_auto": lambda st=st, loc=loc: base(x) + kernels.routed_delta(st, x, loc),
                "routed_dense": forced("dense", st, x, loc, base),
                "routed_grouped": forced("grouped", st, x, loc, base),
            }, repeats=a.repeats, warmup=a.warmup)
            t["experts"] = E
            t["picked"] = kernels.token_path(st, a.tokens, E, a.k, a.d)
            t["auto_vs_single"] = round(t["routed_auto"] / t["single_lora"], 3)
            rows.append(t)
    e8 = next((r for r in rows if r["experts"] == min(a.experts)), rows[0])
    for r in rows:
        r["auto_vs_smallest_bank"] = round(r["routed_auto"] / e8["routed_auto"], 3)
    print_table(rows, ["experts", "base_linear", "single_lora", "routed_auto", "routed_dense", "routed_grouped",
                       "picked", "auto_vs_single", "auto_vs_smallest_bank"])
    save("routing", {"config": vars(a), "rows": rows,
                     "cost_model": {"MOVE_COST": kernels.MOVE_COST, "CALL_COST": kernels.CALL_COST}}, quiet=True)


if __name__ == "__main__":
    main()
