import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(params=["tiny-bert", "tiny-llama"])
def tiny_backbone(request):
    from mtpeft.backbone import load_backbone

    return load_backbone(request.param, seed=0)


def synthetic_task(name="toy", n=48, seed=0, labels=("red", "blue")):
    """A learnable two-class task: the label word's synonym appears in the text."""
    import random

    from mtpeft.tasks import Task, make_dataset
    from datasets import DatasetDict

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
