"""Zero-shot routers over a library of E LoRA experts: Arrow and PHATGOOSE top-2 against one LoRA and peft's Arrow.

The whole backbone (minilm, 16 x 128 tokens, LoRA r=8 on query and value, no grad), the router's own cost
included (Arrow's ``|<x, p>|`` over E prototypes and PHATGOOSE's normalised scores over E gates: one matmul per
site, top-2, softmax; then the bank's per-token kernels), at E = 8, 32, 128, interleaved round-robin in one
process against:
- a single LoRA (E = 1, task-id routing): the floor;
- peft's Arrow (``peft.tuners.lora.arrow``, the same library loaded as E adapters plus peft's ``arrow_router``,
  top_k=2): peft runs every expert on every token and mixes them with the top-k weights. peft's prototypes come
  from 15 power-iteration steps from a random start, ours are exact; to check that both compute the same routed
  model, peft's layers are given our prototypes (``max_abs_diff_vs_peft``), and how close peft's own prototypes
  are to ours is reported beside it (``peft_proto_min_abs_cos``).
PHATGOOSE's gates are random (speed only: no training), set as the bank's ``phatgoose_gate`` artifacts.

Goals (issue 9): Arrow and PHATGOOSE top-2 at E=32 within 1.25x a single LoRA; E=8 to E=128 within 1.4x
(E=128 / E=8); faster than peft's Arrow. ``--profile`` prints where a contender's time goes.
Run: `nice -n 10 .venv/bin/python benchmarks/bench_zeroshot_routing.py` (writes
benchmarks/results/zeroshot_routing.json); `--quick` for a smoke run.
"""
from __future__ import annotations

import argparse
import copy
import functools
import time

import torch
from bench_inference import ALPHA, R, make_bank
from bench_train import batch, hf_body
from common import add_common_args, interleaved, peak_mib, print_table, ratio, save, setup_threads

from mtpeft.backbone import load_backbone
from mtpeft.routers import ArrowRouter, PhatgooseRouter
from mtpeft.routers.arrow import KEY
from mtpeft.routers.phatgoose import gate_key
from mtpeft.routing import Routing


def random_gates(bank, seed: int = 0) -> None:
    """PHATGOOSE gates for every expert at every site, random (a speed test needs no trained gates)."""
    g = torch.Generator().manual_seed(seed)
    for name in bank.names:
        for site in bank.module_sites(name):
            bank.set_artifact(name, gate_key(site), torch.randn(bank.banked_layer(site).base.in_features, generator=g))


def peft_arrow(body, bank, E: int, k: int, family: str):
    """peft's Arrow over the bank's E experts (adapters ``task_0..``), as ``create_arrow_model`` builds it."""
    import peft
    from peft.tuners.lora.config import ArrowConfig

    prefix = "model." if family == "causal" else ""
    sites = bank.module_sites(bank.names[0])
    targets = sorted({s.rsplit(".", 1)[-1] for s in sites})
    cfg = peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=targets)
    names = [f"task_{i}" for i in range(E)]
    pm = peft.get_peft_model(copy.deepcopy(body), cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for i, n in enumerate(names):
            for key, p in bank.module_parameters(bank.names[i]).items():
                site, pname = key.rsplit(".", 1)
                getattr(inner.get_submodule(site.removeprefix(prefix)), pname)[n].weight.copy_(p)
    acfg = ArrowConfig(top_k=k, router_temperature=1.0, rng_seed=0)
    acfg.task_adapter_names, acfg.gks_adapter_names = names, []
    pm.add_adapter("arrow_router", peft.LoraConfig(arrow_config=acfg, target_modules=targets, r=R))
    pm.set_adapter("arrow_router")
    return pm.eval()


def arrow_layers(pm, family: str) -> dict[str, object]:
    """``{bank site: peft's ArrowLoraLinearLayer}`` of a peft Arrow model."""
    prefix = "model." if family == "causal" else ""
    return {prefix + n: m.lora_arrow["arrow_router"] for n, m in pm.base_model.model.named_modules()
            if hasattr(m, "lora_arrow") and "arrow_router" in m.lora_arrow}


def use_our_prototypes(pm, bank, family: str) -> float:
    """Give peft's Arrow layers the bank's exact prototypes; returns the smallest |cos| between peft's own
    (power iteration) prototypes and ours."""
    worst = 1.0
    for site, layer in arrow_layers(pm, family).items():
        ours = torch.stack([bank.artifact(n, f"{KEY}:{site}") for n in bank.names])
        theirs = layer.prototypes.float()
        worst = min(worst, float((torch.nn.functional.normalize(theirs, dim=-1) * ours).sum(-1).abs().min()))
        layer.prototypes = ours.to(layer.prototypes.dtype).clone()
    return worst


def profile(f, label: str, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        f()
    print(f"--- profile: {label}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=5, warmup=1)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--no-peft", action="store_true", help="leave out peft's Arrow")
    p.add_argument("--profile", nargs="*", default=None, metavar="CONTENDER",
                   help="print a torch profile of one forward of these contenders (none named: the routers at the largest E)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: wall-clock time (an idle machine); cpu: this process's CPU time, with --threads 1 the "
                        "work done whatever else runs on the machine (a shared machine)")
    p.add_argument("--out", default=None, help="write the JSON here instead of benchmarks/results/zeroshot_routing.json")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup = min(a.repeats, 2), min(a.warmup, 1)
    setup_threads(a)
    t0 = time.perf_counter()
    ref = load_backbone(a.backbone)
    body, family = hf_body(ref), ref.family
    ids, mask = batch(ref, a.batch, a.seq)
    B = ids.shape[0]
    sizes = sorted(set(a.experts))
    banks = {E: make_bank(a.backbone, E) for E in sorted(set(sizes) | {1})}
    arrow = {E: ArrowRouter.from_bank(banks[E], top_k=a.k) for E in sizes}
    for E in sizes:
        random_gates(banks[E], seed=E)
    goose = {E: PhatgooseRouter.from_bank(banks[E], top_k=a.k) for E in sizes}
    peft_models, proto_cos = {}, {}
    with_peft = not a.no_peft and _has_peft_arrow()
    if with_peft:
        for E in sizes:
            peft_models[E] = pm = peft_arrow(body, banks[E], E, a.k, family)
            with torch.no_grad():
                pm(input_ids=ids[:1], attention_mask=mask[:1])  # peft builds its prototypes on the first forward
            proto_cos[E] = round(use_our_prototypes(pm, banks[E], family), 6)

    def fwd(bank, routing):
        return lambda: bank(ids, mask, routing=routing).output

    contenders = {"single_lora": fwd(banks[1], Routing.one_hot([0] * B))}
    for E in sizes:
        contenders[f"arrow_E{E}"] = fwd(banks[E], arrow[E])
        contenders[f"phatgoose_E{E}"] = fwd(banks[E], goose[E])
        if E in peft_models:
            contenders[f"peft_arrow_E{E}"] = (lambda pm=peft_models[E]:
                                              _peft_out(pm, family, ids, mask))
    with torch.no_grad():
        diffs = {E: float((contenders[f"arrow_E{E}"]() - contenders[f"peft_arrow_E{E}"]()).abs().max())
                 for E in peft_models}
        print(f"{len(contenders)} contenders, {a.repeats} rounds after {a.warmup} warm-up; batch {B} x "
              f"{ids.shape[1]} tokens on {a.backbone}, {torch.get_num_threads()} threads", flush=True)
        timer = interleaved if a.clock == "wall" else functools.partial(interleaved, clock=time.process_time)
        ms = timer(contenders, repeats=a.repeats, warmup=a.warmup)
        mem = {k: peak_mib(f) for k, f in contenders.items()}
        if a.profile is not None:
            for name in a.profile or [f"arrow_E{sizes[-1]}", f"phatgoose_E{sizes[-1]}"]:
                profile(contenders[name], name)
    rows, goals = _rows(ms, mem, sizes, diffs, proto_cos), _goals(ms, sizes, peft_models)
    print(f"single LoRA {ms['single_lora']:.1f} ms")
    print_table(rows, ["experts", "arrow_ms", "arrow/single", "phatgoose_ms", "phatgoose/single", "peft_arrow_ms",
                       "arrow/peft_arrow", "max_abs_diff_vs_peft", "peft_proto_min_abs_cos"])
    for k, v in goals.items():
        print(f"  goal {k}: {v}")
    payload = {"config": vars(a), "ms": ms, "peak_mib": mem, "rows": rows, "goals": goals,
               "wall_s": round(time.perf_counter() - t0, 1)}
    if a.out:
        from common import environment

        from mtpeft.io import write_json

        write_json(a.out, {"benchmark": "zeroshot_routing", "environment": environment(), **payload})
    else:
        save("zeroshot_routing" if a.backbone == "minilm" else f"zeroshot_routing_{a.backbone}", payload, quiet=True)
    return payload


def _has_peft_arrow() -> bool:
    try:
        import peft.tuners.lora.arrow  # noqa: F401
    except ImportError:
        return False
    return True


def _peft_out(pm, family, ids, mask):
    out = pm(input_ids=ids, attention_mask=mask, output_hidden_states=family == "causal")
    return out.hidden_states[-1] if family == "causal" else out.last_hidden_state


def _rows(ms, mem, sizes, diffs, proto_cos) -> list[dict]:
    single, rows = ms["single_lora"], []
    for E in sizes:
        a, g = ms[f"arrow_E{E}"], ms[f"phatgoose_E{E}"]
        row = {"experts": E, "arrow_ms": a, "arrow/single": ratio(a, single), "phatgoose_ms": g,
               "phatgoose/single": ratio(g, single), "arrow_peak_mib": mem[f"arrow_E{E}"],
               "phatgoose_peak_mib": mem[f"phatgoose_E{E}"],
               f"arrow/arrow_E{sizes[0]}": ratio(a, ms[f"arrow_E{sizes[0]}"]),
               f"phatgoose/phatgoose_E{sizes[0]}": ratio(g, ms[f"phatgoose_E{sizes[0]}"])}
        if f"peft_arrow_E{E}" in ms:
            pa = ms[f"peft_arrow_E{E}"]
            row.update({"peft_arrow_ms": pa, "arrow/peft_arrow": ratio(a, pa), "phatgoose/peft_arrow": ratio(g, pa),
                        "peft_arrow_peak_mib": mem[f"peft_arrow_E{E}"],
                        "max_abs_diff_vs_peft": float(f"{diffs[E]:.2e}"), "peft_proto_min_abs_cos": proto_cos[E]})
        rows.append(row)
    return rows


def _goals(ms, sizes, peft_models) -> dict:
    single, goals = ms["single_lora"], {}
    for r in ("arrow", "phatgoose"):
        if 32 in sizes:
            goals[f"{r}_E32/single <= 1.25"] = ratio(ms[f"{r}_E32"], single)
        if 8 in sizes and 128 in sizes:
            goals[f"{r}_E128/{r}_E8 <= 1.4"] = ratio(ms[f"{r}_E128"], ms[f"{r}_E8"])
        for E in peft_models:
            goals[f"{r}_E{E}/peft_arrow_E{E} < 1"] = ratio(ms[f"{r}_E{E}"], ms[f"peft_arrow_E{E}"])
    return goals


if __name__ == "__main__":
    main()
