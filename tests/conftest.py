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
    group, _ = bank._group_of(name)
    for _, stack in bank.stacks_of(group):
        stack.invalidate()
