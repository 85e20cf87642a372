"""Inference on the whole backbone with banks of E = 1, 8, 32, 128 LoRA experts (r=8 on query, value).

(a) Per-token top-2 routing (random routing logits, the same at every layer: this times the layers,
    not a router) through banks of E experts, against a single LoRA (E=1, task-id routing).
    Goals: top-2 at E=32 within 1.3x the single LoRA; E=128 within 1.5x of E=8.
(b) A mixed-task batch: example i served by expert i mod E (task-id routing, one expert per
    example) through the bank, against peft's mixed adapter batch (E adapters loaded in one
    PeftModel with the same weights, called with ``adapter_names=[...]``) and against one merged
    model (peft ``merge_and_unload`` of one adapter: a bare forward). Goal: faster than peft.
(c) The peak memory of each forward beyond what is resident before it (benchmarks/common.py), and
    the resident adapter weights.

Every contender runs on its own copy of the backbone, interleaved round-robin in one process, under
``torch.no_grad()``. The mixed batch's outputs are checked against peft's (``max_abs_diff``).
Run: `.venv/bin/python benchmarks/bench_inference.py` (writes benchmarks/results/inference.json);
`--quick` for a smoke run.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from bench_train import batch, hf_body
from common import add_common_args, interleaved, param_mib, peak_mib, print_table, ratio, save, setup_threads

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.modules.lora import LoRAConfig
from mtpeft.routing import Routing

R, ALPHA = 8, 16


def make_bank(name: str, E: int) -> ModuleBank:
    bank = ModuleBank(load_backbone(name))
    g = torch.Generator().manual_seed(E)
    for i in range(E):
        bank.add(f"e{i}", "lora", LoRAConfig(r=R, alpha=ALPHA), seed=i)
        with torch.no_grad():  # off the identity init (B = 0), so every expert changes the outputs
            for p in bank.module_parameters(f"e{i}").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    bank.freeze()  # frozen: the stacked weights are cached, as in serving
    bank.eval()
    return bank


def peft_model(body, bank: ModuleBank, E: int, family: str):
    """E adapters in one PeftModel, with the bank's weights."""
    import peft

    prefix = "model." if family == "causal" else ""
    sites = next(iter(bank.groups.values())).sites
    targets = sorted({s.rsplit(".", 1)[-1] for s in sites})
    cfg = peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                          target_modules=targets)
    pm = peft.get_peft_model(copy.deepcopy(body), cfg, adapter_name="e0")
    for i in range(1, E):
        pm.add_adapter(f"e{i}", cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for i in range(E):
            for key, p in bank.module_parameters(f"e{i}").items():
                site, pname = key.rsplit(".", 1)  # ...query.lora_A
                site = site.removeprefix(prefix)
                getattr(inner.get_submodule(site), pname)[f"e{i}"].weight.copy_(p)
    return pm.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=5, warmup=1)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--k", type=int, default=2)
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup = 2, 1
    setup_threads(a)
    t0 = time.perf_counter()
    ref = load_backbone(a.backbone)
    body, family = hf_body(ref), ref.family
    ids, mask = batch(ref, a.batch, a.seq)
    B, T = ids.shape
    sizes = sorted(set(a.experts) | {1})
    banks = {E: make_bank(a.backbone, E) for E in sizes}
    g = torch.Generator().manual_seed(0)
    topk = {E: Routing.topk(torch.randn(B, T, E, generator=g), a.k) for E in sizes if E > 1}
    mixed = {E: [i % E for i in range(B)] for E in sizes if E > 1}
    peft_models = {E: peft_model(body, banks[E], E, family) for E in mixed}

    # one merged model: peft merge_and_unload of expert 0 (a bare forward of modified weights)
    merged = peft_model(body, banks[1], 1, family).merge_and_unload().eval()

    def fwd_bank(E, routing):
        return lambda: banks[E](ids, mask, routing=routing).output

    contenders = {"merged": lambda: merged(input_ids=ids, attention_mask=mask).last_hidden_state,
                  "single_lora": fwd_bank(1, Routing.one_hot([0] * B))}
    for E, routing in topk.items():
        contenders[f"topk_E{E}"] = fwd_bank(E, routing)
    for E, experts in mixed.items():
        contenders[f"mixed_mtpeft_E{E}"] = fwd_bank(E, Routing.one_hot(experts))
        contenders[f"mixed_peft_E{E}"] = (
            lambda pm=peft_models[E], names=[f"e{i}" for i in experts]:
            pm(input_ids=ids, attention_mask=mask, adapter_names=names).last_hidden_state)
    with torch.no_grad():
        diffs = {E: float((contenders[f"mixed_mtpeft_E{E}"]() - contenders[f"mixed_peft_E{E}"]()).abs().max())
                 for E in mixed}
        d1 = float((contenders["single_lora"]() - contenders["merged"]()).abs().max())
        print(f"{len(contenders)} contenders, {a.repeats} rounds after {a.warmup} warm-up; batch {B} x {T} "
              f"tokens on {a.backbone}, {torch.get_num_threads()} threads", flush=True)
        ms = interleaved(contenders, repeats=a.repeats, warmup=a.warmup)
        mem = {k: peak_mib(f) for k, f in contenders.items()}
    single, merged_ms = ms["single_lora"], ms["merged"]
    smallest = min((E for E in topk), default=None)
    rows = []
    for E in sizes:
        row = {"experts": E, "bank_adapter_mib": _adapter_mib(banks[E])}
        if E in topk:
            t = ms[f"topk_E{E}"]
            row.update({"topk_ms": t, "topk/single": ratio(t, single),
                        f"topk/topk_E{smallest}": ratio(t, ms[f"topk_E{smallest}"]),
                        "topk_peak_mib": mem[f"topk_E{E}"]})
        if E in mixed:
            m, pf = ms[f"mixed_mtpeft_E{E}"], ms[f"mixed_peft_E{E}"]
            row.update({"mixed_mtpeft_ms": m, "mixed_peft_ms": pf, "mixed_mtpeft/peft": ratio(m, pf),
                        "mixed_mtpeft/merged": ratio(m, merged_ms), "mixed_peft/merged": ratio(pf, merged_ms),
                        "mixed_mtpeft_peak_mib": mem[f"mixed_mtpeft_E{E}"],
                        "mixed_peft_peak_mib": mem[f"mixed_peft_E{E}"],
                        "peft_adapter_mib": param_mib(q for n, q in peft_models[E].named_parameters() if "lora_" in n),
                        "max_abs_diff_vs_peft": float(f"{diffs[E]:.2e}")})
        rows.append(row)
    goals = {}
    if 32 in topk:
        goals["topk_E32/single <= 1.3"] = ratio(ms["topk_E32"], single)
    if 128 in topk and 8 in topk:
        goals["topk_E128/topk_E8 <= 1.5"] = ratio(ms["topk_E128"], ms["topk_E8"])
    for E in mixed:
        goals[f"mixed_mtpeft_E{E}/peft < 1"] = ratio(ms[f"mixed_mtpeft_E{E}"], ms[f"mixed_peft_E{E}"])
    print(f"single LoRA {single:.1f} ms, merged (bare forward) {merged_ms:.1f} ms, single/merged "
          f"{ratio(single, merged_ms)}; peak MiB single {mem['single_lora']}, merged {mem['merged']}")
    print_table(rows, ["experts", "topk_ms", "topk/single", f"topk/topk_E{smallest}", "mixed_mtpeft_ms",
                       "mixed_peft_ms", "mixed_mtpeft/peft", "mixed_mtpeft/merged", "topk_peak_mib",
                       "mixed_mtpeft_peak_mib", "mixed_peft_peak_mib"])
    for k, v in goals.items():
        print(f"  goal {k}: {v}")
    save("inference" if a.backbone == "minilm" else f"inference_{a.backbone}", {"config": vars(a), "ms": ms, "peak_mib": mem, "rows": rows, "goals": goals,
                       "single_vs_merged_max_abs_diff": float(f"{d1:.2e}"),
                       "wall_s": round(time.perf_counter() - t0, 1)}, quiet=True)


def _adapter_mib(bank: ModuleBank) -> float:
    return param_mib(q for g in bank.groups.values() for _, st in bank.stacks_of(g) for q in st.parameters())


if __name__ == "__main__":
    main()
