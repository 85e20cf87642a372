import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_BACKBONES = ["tiny-bert", "tiny-llama"]  # one backbone per family: encoder, causal LM


@pytest.fixture(params=TINY_BACKBONES)
def tiny_backbone(request):
    from mtpeft.backbone import load_backbone

    return load_backbone(request.param, seed=0)


def synthetic_task(name="toy", n=48, seed=0, labels=("red", "blue")):
    """A learnable two-class task: the label word's synonym appears in the text."""
    import random

    from datasets import DatasetDict

    from mtpeft.tasks import Task, make_dataset

    rng = random.Random(seed)
    cue = {0: ["apple", "cherry", "ruby"], 1: ["sky", "ocean", "sapphire"]}
    filler = ["the", "a", "one", "some", "big", "small", "old", "new"]

    def split(k):
        texts, ys = [], []
        for i in range(k):
            y = i % 2
            words = rng.sample(filler, 3) + [rng.choice(cue[y])]
            rng.shuffle(words)
            texts.append(" ".join(words))
            ys.append(y)
        return make_dataset(texts, ys)

    return Task(name, DatasetDict(train=split(n), validation=split(16), test=split(16)), list(labels))


def perturb(bank, name, std=0.3, seed=0):
    """Move module ``name`` of ``bank`` off its init: add N(0, std^2) noise to each of its parameters.

    Checks that compare outputs (mixed batches, save/load, merging, growing) would pass trivially on
    modules still at an identity init (LoRA's B = 0, adapters' zero up-projection, (IA)3's ones).
    Noise is added to the init rather than replacing it, so every type keeps its scale ((IA)3
    vectors stay around one, a scale near zero would be degenerate). Cached stacks are dropped.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.module_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * std)
    group, _ = bank.locate(name)
    for _, stack in bank.stacks_of(group):
        stack.invalidate()


VOCAB = 100  # the tiny hand-built models' vocabulary


class StandInTokenizer:
    """One id per character, enough for modules that initialise from text (prompt tuning)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}


def make_backbone(family: str, layers: int = 2, seed: int = 0, hidden: int = 32, ffn: int = 64, heads: int = 4,
                  attn: str | None = None):
    """A tiny random BERT (``encoder``) or Llama (``causal``) wrapped like a loaded backbone, no files."""
    import types

    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "encoder":
        m = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64))
    else:
        m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, num_key_value_heads=2, intermediate_size=ffn))
    if attn:
        m.set_attn_implementation(attn)
    m.eval().requires_grad_(False)
    return types.SimpleNamespace(model=m, family=family, tokenizer=StandInTokenizer(),
                                 fingerprint=lambda: {"name": family},
                                 fingerprint_matches=lambda fp: True, describe_mismatch=lambda a, b: "")


def batch(B=3, T=7, seed=1):
    """Random ids ``[B, T]`` and a mask with one right-padded example."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 2:] = 0
    return ids, mask


def bank_with(family, mtype, cfg, n=1, layers=2, attn=None):
    """A bank on a tiny backbone with ``n`` perturbed modules ``m0..`` of one type."""
    from mtpeft.bank import ModuleBank

    bank = ModuleBank(make_backbone(family, layers=layers, attn=attn))
    for i in range(n):
        bank.add(f"m{i}", mtype, dict(cfg), seed=i)
        perturb(bank, f"m{i}", seed=i)
    return bank


def task_csv(path, task):
    """Write a Task's train/validation/test splits to one CSV task file (text, label name); returns ``path``."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for split in ("train", "validation", "test"):
            for x, y in zip(task.splits[split]["text"], task.splits[split]["label"]):
                w.writerow([x, task.label_names[y]])
    return path
