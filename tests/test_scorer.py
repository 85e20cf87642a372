"""The one scorer: encoder similarity and causal rank classification, batched, against references."""
import torch
import torch.nn.functional as F
from conftest import synthetic_task

from mtpeft.bank import ModuleBank
from mtpeft.routing import Routing
from mtpeft.scorer import make_scorer


def _bank(bb):
    bank = ModuleBank(bb)
    bank.add("a", "lora", {"r": 4})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in bank.module_parameters("a").values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    bank.freeze()
    return bank


def _causal_reference(bank, tok, prompt, label):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    lab = tok(" " + label, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + lab])
    h = bank(ids, torch.ones_like(ids), routing=Routing.one_hot([0])).output
    logp = bank.lm_head(h).log_softmax(-1)[0]
    return torch.stack([logp[len(p) - 1 + j, t] for j, t in enumerate(lab)]).mean()


def test_scorer_matches_reference_and_mixed_tasks(tiny_backbone):
    bb = tiny_backbone
    bank = _bank(bb)
    scorer = make_scorer(bb)
    t1 = synthetic_task("one", labels=("red", "blue"))
    t2 = synthetic_task("two", labels=("small cat", "dog", "big old bird"))
    texts = ["the big apple", "a sky ocean thing", "one"]
    r = Routing.one_hot([0, 0, 0])
    got = scorer.logits(bank, texts, [t1, t2, t2], r)
    assert got.shape == (3, 3)
    assert torch.isinf(got[0, 2]) and torch.isfinite(got[1:]).all()
    if bb.family == "encoder":
        def emb(strings, routing):
            enc = bb.tokenizer(strings, padding=True, return_tensors="pt")
            out = bank(enc["input_ids"], enc["attention_mask"], routing=routing).output
            m = enc["attention_mask"][..., None].float()
            return F.normalize((out * m).sum(1) / m.sum(1), dim=-1)

        with bank.disabled():
            lab = emb(t2.label_texts, None)
        x = emb([texts[1]], Routing.one_hot([0]))
        want = (x @ lab.t())[0] / scorer.temperature
        assert torch.allclose(got[1], want, atol=1e-4)
    else:
        for b, task in ((0, t1), (2, t2)):
            prompt = task.format_input(texts[b]) + task.prompt_suffix
            want = torch.stack([_causal_reference(bank, bb.tokenizer, prompt, lt) for lt in task.label_texts])
            assert torch.allclose(got[b, : task.num_labels], want, atol=1e-4)
    # one task at a time gives the same logits as the mixed batch
    alone = scorer.logits(bank, texts[1:], t2, Routing.one_hot([0, 0]))
    assert torch.allclose(alone, got[1:], atol=1e-4)


def test_bare_scorer_differs_from_routed(tiny_backbone):
    bank = _bank(tiny_backbone)
    scorer = make_scorer(tiny_backbone)
    t = synthetic_task()
    with bank.disabled():
        bare = scorer.logits(bank, ["a sky"], t)
    routed = scorer.logits(bank, ["a sky"], t, Routing.one_hot([0]))
    assert not torch.allclose(bare, routed)
