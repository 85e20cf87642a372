"""The causal scorer (rank classification) on SmolLM2: prompt once, labels packed, vs one sequence per label.

mtpeft's ``CausalScorer`` runs the prompts once, keeps their keys and values, then every label of
every example in one packed row per example with a block-causal mask: ``B*(P + L*l)`` tokens. The
baseline is the usual batched rank classification (as in T0/IA3-style evaluation code): each
(example, label) pair as its own full sequence, ``B*L*(P + l)`` tokens, still one forward pass.
Both run under ``torch.no_grad()`` with a LoRA module routed per example, and for training (forward +
backward) on a batch; their logits are checked equal (``max_abs_diff``).

The ``mixed`` row: one batch mixing tasks with label sets of different sizes (``--mixed``). The scorer packs each
example's own candidates in rows of their own width; the contender pads every example to the largest label
set in the batch (one row per example, as the scorer did before: a tweet's 3 labels then cost a 26-label
task's 26), emulated by giving every example extra candidates up to that size. Same logits for the real
candidates.

Run: `.venv/bin/python benchmarks/bench_scorer.py` (writes benchmarks/results/scorer_smollm2.json).
"""
from __future__ import annotations

import argparse

import torch
from common import add_common_args, interleaved, peak_mib, print_table, ratio, save, setup_threads

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.routing import Routing
from mtpeft.scorer import CausalScorer, LabelSpace
from mtpeft.suite import load_builtin


def flat_logits(scorer: CausalScorer, bank, texts, task, routing) -> torch.Tensor:
    """Baseline: every (example, label) as one right-padded sequence, all ``B*L`` in one forward."""
    B, L = len(texts), task.num_labels
    prompt, p_len = scorer._prompts([task] * B, texts)
    lab, l_len, _, _ = scorer._labels([task] * B)
    Tl = lab.shape[2]
    S = int(p_len.max()) + Tl
    pad = scorer.tokenizer.pad_token_id
    seq = torch.full((B, L, S + 1), pad, dtype=torch.long)
    seq[:, :, : prompt.shape[1]] = prompt[:, None]
    scorer._place(seq, lab, l_len, p_len[:, None].expand(B, L))
    seq = seq[..., :S].reshape(B * L, S)
    total = (p_len[:, None] + l_len).reshape(-1)
    mask = (torch.arange(S)[None] < total[:, None]).long()
    h = bank(seq, mask, routing=routing.repeat_interleave(L)).output
    j = torch.arange(Tl)
    pred = (p_len[:, None, None] - 1 + j).expand(B, L, Tl).reshape(B * L, Tl).clamp_max(S - 2)
    hsel = h.gather(1, pred[..., None].expand(-1, -1, h.shape[-1]))
    logp = bank.lm_head(hsel).float().log_softmax(-1).gather(-1, seq.gather(1, pred + 1)[..., None])[..., 0]
    ok = (j[None, None] < l_len[..., None]).reshape(B * L, Tl)
    return ((logp * ok).sum(-1) / ok.sum(-1)).reshape(B, L)


def mixed_row(scorer: CausalScorer, bank, a, ms: dict) -> dict:
    """A batch mixing ``a.mixed`` (examples in turn): each example's own candidates vs padded to the largest set."""
    tasks = [load_builtin(n, max_examples=a.batch) for n in a.mixed]
    which = [i % len(tasks) for i in range(a.batch)]
    texts = [tasks[w].splits["test"]["text"][i] for i, w in enumerate(which)]
    batch_tasks = [tasks[w] for w in which]
    space = LabelSpace.union(tasks)
    own = space.candidates_of(batch_tasks)
    count = own.sum(1)
    rank = torch.cumsum(~own, 1)  # each non-candidate's rank among its row's non-candidates, from 1
    padded = own | (~own & (rank <= (count.max() - count)[:, None]))  # K_max candidates in every row
    routing = Routing.one_hot([0] * a.batch)
    target = torch.stack([space.ids_of(t)[t.splits["test"]["label"][i]] for i, t in enumerate(batch_tasks)])

    def call(cands, train):
        def run():
            if not train:
                with torch.no_grad():
                    return scorer.logits(bank, texts, batch_tasks, routing, labels=space, candidates=cands)
            bank.zero_grad(set_to_none=True)
            logits = scorer.logits(bank, texts, batch_tasks, routing, labels=space, candidates=cands)
            torch.nn.functional.cross_entropy(logits.masked_fill(~cands, -1e4), target).backward()
        return run

    with torch.no_grad():
        diff = (call(own, False)() - call(padded, False)())[own]
    contenders = {f"mixed_{ph}_{k}": call(c, ph == "train") for ph in ("infer", "train")
                  for k, c in (("own", own), ("padded", padded))}
    t = interleaved(contenders, repeats=a.repeats, warmup=a.warmup)
    ms.update(t)
    row = {"tasks": "+".join(a.mixed), "labels": "/".join(str(x.num_labels) for x in tasks), "batch": a.batch,
           "candidates": int(own.sum()), "padded_candidates": int(padded.sum()),
           "max_abs_diff": round(float(diff.abs().max()), 6)}
    for ph in ("infer", "train"):
        row[f"{ph}_own_ms"], row[f"{ph}_padded_ms"] = t[f"mixed_{ph}_own"], t[f"mixed_{ph}_padded"]
        row[f"{ph}_speedup"] = ratio(t[f"mixed_{ph}_padded"], t[f"mixed_{ph}_own"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, repeats=3, warmup=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=["bbc_topic", "wordnet_noun"])
    p.add_argument("--mixed", nargs="*", default=["tweet_airline", "bbc_topic", "wordnet_noun"],
                   help="tasks of the mixed batch (examples taken in turn); none: no mixed row")
    a = p.parse_args(argv)
    setup_threads(a)
    if a.quick:
        a.repeats, a.warmup, a.batch, a.tasks = 1, 0, 4, a.tasks[:1]
    bb = load_backbone("smollm2")
    bank = ModuleBank(bb)
    bank.add("lora", "lora", {"r": 8})
    with torch.no_grad():
        for q in bank.module_parameters("lora").values():
            q.add_(torch.randn(q.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    scorer = CausalScorer(bb.tokenizer)
    routing = Routing.one_hot([0] * a.batch)
    rows, ms, peaks = [], {}, {}
    for name in a.tasks:
        task = load_builtin(name, max_examples=a.batch)
        texts = task.splits["test"]["text"][: a.batch]
        labels = torch.tensor(task.splits["test"]["label"][: a.batch])

        def infer(f, texts=texts, task=task):
            def run():
                with torch.no_grad():
                    return f(scorer, bank, texts, task, routing)
            return run

        def train(f, texts=texts, task=task, labels=labels):
            def run():
                bank.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(f(scorer, bank, texts, task, routing), labels).backward()
            return run

        packed = lambda s, b, t, k, r: s.logits(b, t, k, r)
        with torch.no_grad():
            diff = (packed(scorer, bank, texts, task, routing) - flat_logits(scorer, bank, texts, task, routing))
        contenders = {f"{name}_infer_packed": infer(packed), f"{name}_infer_flat": infer(flat_logits),
                      f"{name}_train_packed": train(packed), f"{name}_train_flat": train(flat_logits)}
        t = interleaved(contenders, repeats=a.repeats, warmup=a.warmup)
        ms.update(t)
        for k, f in contenders.items():
            peaks[k] = peak_mib(f)
        row = {"task": name, "labels": task.num_labels, "batch": a.batch,
               "max_abs_diff": round(float(diff.abs().max()), 6)}
        for phase in ("infer", "train"):
            row[f"{phase}_packed_ms"] = t[f"{name}_{phase}_packed"]
            row[f"{phase}_flat_ms"] = t[f"{name}_{phase}_flat"]
            row[f"{phase}_speedup"] = ratio(t[f"{name}_{phase}_flat"], t[f"{name}_{phase}_packed"])
            row[f"{phase}_packed_peak_mib"] = peaks[f"{name}_{phase}_packed"]
            row[f"{phase}_flat_peak_mib"] = peaks[f"{name}_{phase}_flat"]
        rows.append(row)
    mixed = mixed_row(scorer, bank, a, ms) if a.mixed else None
    if mixed:
        print_table([mixed], ["tasks", "labels", "infer_own_ms", "infer_padded_ms", "infer_speedup", "train_own_ms",
                              "train_padded_ms", "train_speedup", "max_abs_diff"])
    print_table(rows, ["task", "labels", "infer_packed_ms", "infer_flat_ms", "infer_speedup", "train_packed_ms",
                       "train_flat_ms", "train_speedup", "max_abs_diff"])
    save("scorer_smollm2", {"config": vars(a), "ms": ms, "peak_mib": peaks, "rows": rows, "mixed": mixed},
         quiet=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
