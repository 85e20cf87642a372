"""One training step of one expert: mtpeft vs peft (same config, same model) vs the frozen floor.

A step is forward + backward + Adam step on a batch of real text (the first examples of the built-in
``bbc_topic`` task, tokenised to exactly ``--seq`` tokens), with the same loss for every contender
(the mean square of the last hidden states). Module types, as the issue names them:

- ``lora``: LoRA r=8, alpha=16 on the attention query and value (``q_proj``/``v_proj`` on Llama);
- ``ia3``: (IA)3 on key, value and the FFN output (its input scaled), mtpeft's default sites;
- ``prompt``: prompt tuning with 20 virtual tokens.

Contenders, interleaved round-robin in one process, each on its own copy of the backbone:

- ``mtpeft_<type>``: a ``ModuleBank`` with one module of the type, routed by task id (one-hot);
- ``peft_<type>``: ``peft.get_peft_model`` on a copy of the same Hugging Face model (the bare encoder,
  or the decoder of a causal LM, task type ``FEATURE_EXTRACTION``), ``lora_dropout=0``;
- ``floor``: the frozen backbone's forward plus the backward to its input embeddings (what any
  method pays at least); ``floor_prompt``: the same over ``seq + 20`` positions (prompt tuning
  runs the model on the virtual tokens too: its fair floor).

Reported: median ms/step, ratios mtpeft/peft and mtpeft/floor, and the peak memory of one step
beyond what is resident before it (see benchmarks/common.py: CUDA allocator stats, or the CPU
resident-set high-water mark). Run: `.venv/bin/python benchmarks/bench_train.py` (writes
benchmarks/results/train_step.json); `--quick` for a smoke run; `--backbone smollm2 --batch 4
--seq 64` for the causal LM (writes train_step_smollm2.json).
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from common import add_common_args, interleaved, param_mib, peak_mib, print_table, ratio, save, setup_threads

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.modules.ia3 import IA3Config
from mtpeft.modules.lora import LoRAConfig
from mtpeft.modules.prompt import PromptConfig
from mtpeft.routing import Routing

TYPES = ("lora", "ia3", "prompt")
N_VIRTUAL = 20


def loss_of(h: torch.Tensor) -> torch.Tensor:
    return h.float().pow(2).mean()


def batch(backbone, n: int, seq: int):
    from mtpeft.suite import load_builtin

    texts = list(load_builtin("bbc_topic").splits["train"]["text"][:n])
    enc = backbone.tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def hf_body(backbone):
    """The Hugging Face module peft wraps: the bare encoder, or a causal LM's decoder (no LM head)."""
    return backbone.model.get_decoder() if backbone.family == "causal" else backbone.model


def mtpeft_step(name: str, mtype: str, ids, mask, lr: float):
    bb = load_backbone(name)
    bank = ModuleBank(bb)
    cfg = {"lora": LoRAConfig(r=8, alpha=16, dropout=0.0), "ia3": IA3Config(),
           "prompt": PromptConfig(n_tokens=N_VIRTUAL)}[mtype]
    bank.add("expert", mtype, cfg)
    bank.train()
    params = bank.trainable_parameters()
    opt = torch.optim.Adam(params, lr=lr)
    routing = Routing.one_hot([0] * ids.shape[0])

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(bank(ids, mask, routing=routing).output).backward()
        opt.step()

    sites = next(iter(bank.groups.values())).sites
    return step, params, sites, bb.family


def peft_step(hf_model, family: str, mtype: str, sites: list[str], ids, mask, lr: float):
    import peft

    model = copy.deepcopy(hf_model)
    prefix = "model." if family == "causal" else ""  # bank sites are paths in the LM; peft wraps its decoder
    paths = [s.removeprefix(prefix) for s in sites]
    if mtype == "lora":
        targets = sorted({p.rsplit(".", 1)[-1] for p in paths})  # query/value, q_proj/v_proj
        cfg = peft.LoraConfig(task_type="FEATURE_EXTRACTION", r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=targets)
    elif mtype == "ia3":
        ffn = [p for p in paths if p.endswith(("output.dense", "down_proj")) and "attention" not in p]
        cfg = peft.IA3Config(task_type="FEATURE_EXTRACTION", target_modules=paths, feedforward_modules=ffn)
    else:
        cfg = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=N_VIRTUAL)
    pm = peft.get_peft_model(model, cfg)
    pm.eval()  # the frozen model's dropout stays off, as a bank keeps its backbone (gradients still flow)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(pm(input_ids=ids, attention_mask=mask).last_hidden_state).backward()
        opt.step()

    return step, params


def floor_step(hf_model, ids, mask, extra: int = 0):
    emb = hf_model.get_input_embeddings()
    if extra:
        ids = torch.cat([ids[:, :1].expand(-1, extra), ids], dim=1)
        mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], dim=1)

    def step():
        x = emb(ids).detach().requires_grad_()
        loss_of(hf_model(inputs_embeds=x, attention_mask=mask).last_hidden_state).backward()

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=5, warmup=1)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup = 2, 1
    setup_threads(a)
    warnings.filterwarnings("ignore", message=".*already has a `model_type`.*")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ref = load_backbone(a.backbone)
    ids, mask = batch(ref, a.batch, a.seq)
    body = hf_body(ref)
    contenders, params, info = {}, {}, {}
    for mtype in a.types:
        step, ps, sites, family = mtpeft_step(a.backbone, mtype, ids, mask, a.lr)
        contenders[f"mtpeft_{mtype}"], params[f"mtpeft_{mtype}"] = step, ps
        step, ps = peft_step(body, family, mtype, sites, ids, mask, a.lr)
        contenders[f"peft_{mtype}"], params[f"peft_{mtype}"] = step, ps
        info[mtype] = {"sites": len(sites) if mtype != "prompt" else 0}
    contenders["floor"] = floor_step(body, ids, mask)
    if "prompt" in a.types:
        contenders["floor_prompt"] = floor_step(body, ids, mask, extra=N_VIRTUAL)
    print(f"{len(contenders)} contenders, {a.repeats} rounds after {a.warmup} warm-up; "
          f"batch {a.batch} x {a.seq} tokens on {a.backbone}, {torch.get_num_threads()} threads", flush=True)
    ms = interleaved(contenders, repeats=a.repeats, warmup=a.warmup)
    mem = {k: peak_mib(f) for k, f in contenders.items()}
    rows = []
    for mtype in a.types:
        m, pf = f"mtpeft_{mtype}", f"peft_{mtype}"
        fl = "floor_prompt" if mtype == "prompt" else "floor"
        rows.append({
            "type": mtype, "mtpeft_ms": ms[m], "peft_ms": ms[pf], "floor_ms": ms[fl],
            "mtpeft/peft": ratio(ms[m], ms[pf]), "mtpeft/floor": ratio(ms[m], ms[fl]),
            "peft/floor": ratio(ms[pf], ms[fl]), "floor_used": fl,
            "mtpeft_peak_mib": mem[m], "peft_peak_mib": mem[pf], "floor_peak_mib": mem[fl],
            "trainable_mib": param_mib(params[m]), "peft_trainable_mib": param_mib(params[pf]),
            "trainable_params": sum(q.numel() for q in params[m]),
            "peft_trainable_params": sum(q.numel() for q in params[pf]), **info[mtype],
        })
    print_table(rows, ["type", "mtpeft_ms", "peft_ms", "floor_ms", "mtpeft/peft", "mtpeft/floor",
                       "mtpeft_peak_mib", "peft_peak_mib", "floor_peak_mib"])
    save("train_step" if a.backbone == "minilm" else f"train_step_{a.backbone}", {"config": vars(a), "ms": ms, "peak_mib": mem, "rows": rows,
                        "floor_ms": {"floor": ms["floor"], "floor_prompt": ms.get("floor_prompt")},
                        "wall_s": round(time.perf_counter() - t0, 1)}, quiet=True)


if __name__ == "__main__":
    main()
