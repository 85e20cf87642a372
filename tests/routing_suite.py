"""A synthetic library for zero-shot routing tests: tasks whose inputs come from disjoint vocabularies (each a
block of the tiny tokenizer's whole-word tokens), one LoRA expert trained per task, so each task is solved by
its own expert and an input's words say which expert it belongs to."""
from __future__ import annotations

import random

import torch

# Disjoint vocabularies (every word is one token of the tiny backbones' tokenizer).
BLOCKS = {
    "adj": "big small old new good bad great poor high low long short hot cold fast slow",
    "color": "red blue green yellow black white orange purple pink brown gray grey apple cherry ruby sky",
    "market": "team player match win won lose lost score goal market price company bank money stock economy",
    "civic": "government election minister party vote law court phone computer software internet data flight "
             "airline plane delay",
}


def block_task(name: str, words: str, n_train: int = 96, n_eval: int = 48, seed: int = 0, length: int = 5):
    """Two classes: an input is ``length`` filler words of the block plus one cue word of its class (the
    block's first two words cue class 0, the next two class 1), shuffled."""
    from datasets import DatasetDict

    from mtpeft.tasks import Task, make_dataset

    vocab = words.split()
    cues, filler = (vocab[0:2], vocab[2:4]), vocab[4:]
    rng = random.Random(f"{name}:{seed}")

    def text(y):
        w = rng.choices(filler, k=length) + [rng.choice(cues[y])]
        rng.shuffle(w)
        return " ".join(w)

    def split(k):
        ys = [i % 2 for i in range(k)]
        return make_dataset([text(y) for y in ys], ys)

    return Task(name, DatasetDict(train=split(n_train), validation=split(n_eval), test=split(n_eval)),
                ["yes", "no"])


def block_suite(names=("adj", "color", "market"), **kw) -> list:
    return [block_task(n, BLOCKS[n], **kw) for n in names]


def wide_tiny(family: str, hidden: int = 128, layers: int = 2, seed: int = 0, word_scale: float = 4.0):
    """A tiny random backbone of the given width with the tiny backbones' word-level tokenizer."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    from mtpeft.backbone import Backbone, _tiny_tokenizer

    tok = _tiny_tokenizer(family)
    if family == "encoder":
        config, auto = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                                  pad_token_id=tok.pad_token_id), AutoModel
    else:
        config, auto = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, tie_word_embeddings=False), AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        with torch.no_grad():  # the words, not positions or segment, dominate a token's state (as when pretrained)
            model.get_input_embeddings().weight.mul_(word_scale)
    return Backbone(f"wide-tiny-{family}", model, tok, family, f"random, hidden {hidden}")


def train_library(backbone, tasks, steps: int = 40, lr: float = 1e-2):
    """A bank on ``backbone`` (a name, or a Backbone) holding one LoRA expert ``<task>-lora`` per task."""
    from mtpeft.backbone import load_backbone
    from mtpeft.bank import ModuleBank
    from mtpeft.scorer import make_scorer
    from mtpeft.train import TrainConfig, fit_expert

    bb = load_backbone(backbone, seed=0) if isinstance(backbone, str) else backbone
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    cfg = TrainConfig(max_steps=steps, lr=lr, progress=False, batch_size=16)
    for t in tasks:
        fit_expert(bank, scorer, t, f"{t.name}-lora", "lora", {"r": 4}, cfg)
    return bank, scorer


class Recording:
    """Wraps a router: the mean routing weight of each module per example, over the real tokens of every site
    (per-site routers) or once per batch (per-example ones). ``totals``: ``[examples, modules]``."""

    def __init__(self, inner, num_modules: int):
        self.inner, self.E = inner, num_modules
        self.per_site = inner.per_site
        self.rows: list[torch.Tensor] = []
        self._cur = None

    def check_bank(self, bank):
        self.inner.check_bank(bank)

    def _add(self, r, mask):
        w = r.weights.float()
        dense = torch.zeros(*w.shape[:-1], self.E).scatter_add_(-1, r.indices.long(), w)
        if dense.dim() == 3:
            m = mask.float()
            dense = (dense * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        self._cur = dense if self._cur is None else self._cur + dense

    def route(self, bank, ctx):
        r = self.inner.route(bank, ctx)
        self._add(r, None)
        return r

    def at_site(self, site, x, ctx):
        r = self.inner.at_site(site, x, ctx)
        mask = ctx.token_mask(x)
        if r is not None and mask is not None and mask.shape[0] == x.shape[0]:  # the inputs' forward, not the
            self._add(r, mask)  # causal scorer's label continuations
        return r

    def flush(self):
        self.rows.append(self._cur)
        self._cur = None

    @property
    def totals(self) -> torch.Tensor:
        return torch.cat(self.rows)


@torch.no_grad()
def routed_share(bank, scorer, router, task, expert: str, split: str = "test", batch: int = 16) -> float:
    """The share of ``task``'s ``split`` inputs whose largest mean routing weight goes to ``expert``. The
    scorer gets no task: the routers see the raw inputs, nothing else."""
    from mtpeft.scorer import LabelSpace

    rec = Recording(router, len(bank))
    texts = list(task.splits[split]["text"])
    space = LabelSpace.of(task)
    for s in range(0, len(texts), batch):
        scorer.logits(bank, texts[s:s + batch], None, rec, labels=space)
        rec.flush()
    return float((rec.totals.argmax(-1) == bank.index(expert)).float().mean())


_LIBRARIES: dict = {}


def gated_library(family: str = "encoder", gates: bool = True, expert_steps: int = 40):
    """The synthetic library on a wide tiny backbone, every expert given its retrieval centroid and (``gates``)
    gated by the recipe (100 steps, lr 5e-3); built once per process (tests must not change it)."""
    key = (family, gates, expert_steps)
    if key not in _LIBRARIES:
        from mtpeft.gates import fit_centroid, prepare_expert
        from mtpeft.train import TrainConfig

        tasks = block_suite(length=8)
        bank, scorer = train_library(wide_tiny(family), tasks, steps=expert_steps)
        for t in tasks:
            if gates:
                prepare_expert(bank, scorer, t, f"{t.name}-lora", TrainConfig(progress=False))
            else:
                fit_centroid(bank, scorer, t, f"{t.name}-lora")
        _LIBRARIES[key] = (bank, scorer, tasks)
    return _LIBRARIES[key]
