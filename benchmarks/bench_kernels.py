"""Where per-token routing should switch from the dense pass to the grouped one, per stack shape.

For each shape (LoRA r8 on 384x384 and 384x1536, LoRA r64, (IA)3 on a key/value output and on the
FFN input, KronA on 384x384) and each bank size E, top-2 per-token routing (random logits) over N
tokens runs through both paths, forced, interleaved; the row records which was faster, which one
``mtpeft.kernels.token_path`` picks, and what the pick costs next to the faster path (``regret``:
time of the pick / time of the best - 1; 0 where the chooser is right).

Run: `.venv/bin/python benchmarks/bench_kernels.py` (writes benchmarks/results/kernel_threshold.json);
`--quick` for a smoke run. Timings are wall clock on this machine: compare within a run only.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import add_common_args, interleaved, print_table, save, setup_threads
from torch import nn

from mtpeft import kernels
from mtpeft.modules.ia3 import IA3Config, IA3Stack
from mtpeft.modules.krona import KronAConfig, KronAStack
from mtpeft.modules.lora import LoRAConfig, LoRAStack
from mtpeft.routing import Routing, localize

# name -> (d_in, d_out, factory(base) -> stack)
SHAPES = {
    "lora_r8_384x384": (384, 384, lambda b: LoRAStack(LoRAConfig(r=8), b)),
    "lora_r8_384x1536": (384, 1536, lambda b: LoRAStack(LoRAConfig(r=8), b)),
    "lora_r64_384x384": (384, 384, lambda b: LoRAStack(LoRAConfig(r=64), b)),
    "ia3_kv_384": (384, 384, lambda b: IA3Stack(IA3Config(), b, feedforward=False)),
    "ia3_ffn_1536x384": (1536, 384, lambda b: IA3Stack(IA3Config(), b, feedforward=True)),
    "krona_384x384": (384, 384, lambda b: KronAStack(KronAConfig(), b)),
}


def make_stack(shape: str, E: int):
    d_in, d_out, factory = SHAPES[shape]
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    st = factory(base)
    g = torch.Generator().manual_seed(0)
    for _ in range(E):
        st.add_expert(g)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return st.requires_grad_(False)


def source_width(st) -> int:
    return st.d_out if getattr(st, "feedforward", None) is False else st.d_in  # (IA)3 key/value scale y


def fit(rows: list[dict], k: int) -> dict:
    """The MOVE_COST and CALL_COST (other constants as they are) whose picks lose the least time on
    these rows: a suggestion for mtpeft/kernels.py after a run on the machine that matters."""
    probes = {shape: make_stack(shape, 1) for shape in {r["shape"] for r in rows}}
    old = kernels.MOVE_COST, kernels.CALL_COST
    best = None
    try:
        for move in [10 * 1.25 ** i for i in range(26)]:
            for call in [0.0, 1e6, 4e6, 1.6e7, 3.2e7, 6.4e7, 1.28e8, 2.56e8]:
                kernels.MOVE_COST, kernels.CALL_COST = move, call
                lost = 0.0
                for r in rows:
                    st = probes[r["shape"]]
                    pick = kernels.token_path(st, r["tokens"], r["experts"], k, source_width(st))
                    lost += r[f"{pick}_ms"] - min(r["dense_ms"], r["grouped_ms"])
                if best is None or lost < best["lost_ms"] - 1e-9:
                    best = {"MOVE_COST": round(move, 1), "CALL_COST": call, "lost_ms": round(lost, 3)}
    finally:
        kernels.MOVE_COST, kernels.CALL_COST = old
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=9)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 256])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[6, 8, 12, 16, 24, 32, 64, 128, 256])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--row-budget", type=float, default=1.5,
                   help="seconds of timed rounds per row at most (at least 3 rounds)")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup = 2, 1
        a.experts = [8, 16, 32, 128]
        a.tokens = a.tokens[:1]
    setup_threads(a)
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        for shape in a.shapes:
            for N in a.tokens:
                for E in a.experts:
                    torch.manual_seed(E)
                    st = make_stack(shape, E)
                    x = torch.randn(1, N, source_width(st))
                    loc = localize(Routing.topk(torch.randn(1, N, E), a.k), torch.arange(E), E)
                    fs = {path: (lambda path=path, st=st, x=x, loc=loc: kernels.routed_delta(st, x, loc, path=path))
                          for path in ("dense", "grouped")}
                    t1 = time.perf_counter()
                    interleaved(fs, repeats=0, warmup=max(a.warmup, 1))
                    per_round = (time.perf_counter() - t1) / max(a.warmup, 1)
                    # slow rows (KronA's dense pass over 256 experts takes seconds) get fewer repeats
                    reps = max(min(a.repeats, 3), min(a.repeats, int(a.row_budget / max(per_round, 1e-6))))
                    t = interleaved(fs, repeats=reps, warmup=0)
                    d = (kernels.routed_delta(st, x, loc, path="dense")
                         - kernels.routed_delta(st, x, loc, path="grouped")).abs().max().item()
                    pick = kernels.token_path(st, N, E, a.k, x.shape[-1])
                    best = min(("dense", "grouped"), key=t.get)
                    rows.append({"shape": shape, "tokens": N, "experts": E, "repeats": reps, "dense_ms": t["dense"],
                                 "grouped_ms": t["grouped"], "faster": best, "picked": pick,
                                 "regret": round(t[pick] / t[best] - 1, 3), "max_abs_diff": float(f"{d:.2e}")})
                    print(f"  {shape:18s} N={N:5d} E={E:4d} dense {t['dense']:8.3f} ms  grouped "
                          f"{t['grouped']:8.3f} ms  picked {pick}", flush=True)
    crossovers = {}
    for shape in a.shapes:
        for N in a.tokens:
            sub = [r for r in rows if r["shape"] == shape and r["tokens"] == N]
            first = next((r["experts"] for r in sub if r["faster"] == "grouped"), None)
            pick = next((r["experts"] for r in sub if r["picked"] == "grouped"), None)
            crossovers[f"{shape}@{N}"] = {"measured_first_grouped_E": first, "chooser_first_grouped_E": pick}
    wrong = [r for r in rows if r["picked"] != r["faster"]]
    summary = {
        "picks_right": f"{len(rows) - len(wrong)}/{len(rows)}",
        "worst_regret": max((r["regret"] for r in rows), default=0.0),
        "mean_regret": round(sum(r["regret"] for r in rows) / max(len(rows), 1), 3),
        "lost_ms_with_current_constants": round(sum(r[f"{r['picked']}_ms"] - min(r["dense_ms"], r["grouped_ms"])
                                                    for r in rows), 3),
        "best_fit_constants": fit(rows, a.k),
        "cost_model": {"MOVE_COST": kernels.MOVE_COST, "CALL_COST": kernels.CALL_COST,
                       "GROUPED_LOWRANK": kernels.GROUPED_LOWRANK, "IA3_DENSE": kernels.IA3_DENSE, "KRONA_DENSE": kernels.KRONA_DENSE, "KRONA_GROUPED": kernels.KRONA_GROUPED},
        "crossovers": crossovers,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print_table(rows, ["shape", "tokens", "experts", "dense_ms", "grouped_ms", "faster", "picked", "regret"])
    save("kernel_threshold", {"config": vars(a), "summary": summary, "rows": rows}, quiet=True)
    print(f"picks right {summary['picks_right']}, worst regret {summary['worst_regret']}, "
          f"mean regret {summary['mean_regret']}; best-fit constants {summary['best_fit_constants']}")


if __name__ == "__main__":
    main()
