"""The one scorer: encoder similarity and causal rank classification, batched, against references."""
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, synthetic_task

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


def _causal_reference(bank, tok, prompt, label, module=0):
    """The definition: prompt + label as one sequence, alone, through the bank; mean label-token log-prob."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    lab = tok(" " + label, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + lab])
    out = bank(ids, torch.ones_like(ids), routing=Routing.one_hot([module]))
    logp = bank.lm_head(out.output[:, out.n_virtual:]).log_softmax(-1)[0]
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


@pytest.mark.parametrize("mtype,cfg", [
    ("lora", {"r": 4}), ("ia3", {}), ("prompt", {"n_tokens": 3}), ("ptuning", {"n_tokens": 2, "encoder_hidden": 8}),
    ("prefix", {"n_tokens": 3}), ("houlsby", {"r": 4}), ("mam", {"prefix_tokens": 2, "adapter_r": 4}),
])
@pytest.mark.parametrize("chunk", [16, 2])
def test_causal_two_pass_scoring_equals_one_sequence_per_label(mtype, cfg, chunk):
    """The prompt-once, labels-packed scorer == scoring each (example, label) as its own full sequence,
    with a mixed-task, mixed-module batch of prompts of different lengths and labels of 1-3 tokens; with
    ``label_chunk=2`` the 3-label task's candidates span two rows, each continuing its example's cache rows."""
    from mtpeft.backbone import load_backbone

    bb = load_backbone("tiny-llama", seed=0)
    bank = ModuleBank(bb)
    for i in range(2):
        bank.add(f"m{i}", mtype, dict(cfg), seed=i)
        perturb(bank, f"m{i}", seed=i)
    bank.freeze()
    scorer = make_scorer(bb, label_chunk=chunk)
    t1 = synthetic_task("one", labels=("red", "blue"))
    t2 = synthetic_task("two", labels=("small cat", "dog", "a big old bird"))
    texts = ["the big apple and more words here", "a sky", "one small old ocean", "x"]
    tasks, modules = [t1, t2, t2, t1], [0, 1, 0, 1]
    with torch.no_grad():
        got = scorer.logits(bank, texts, tasks, Routing.one_hot(modules))
        for b, (task, m) in enumerate(zip(tasks, modules)):
            prompt = task.format_input(texts[b]) + task.prompt_suffix
            want = torch.stack([_causal_reference(bank, bb.tokenizer, prompt, lt, m) for lt in task.label_texts])
            torch.testing.assert_close(got[b, : task.num_labels], want, atol=1e-4, rtol=1e-4)
        assert torch.isinf(got[0, 2]) and torch.isinf(got[3, 2])


def test_causal_scoring_gradients_reach_the_module():
    from mtpeft.backbone import load_backbone

    bb = load_backbone("tiny-llama", seed=0)
    bank = ModuleBank(bb)
    bank.add("p", "prefix", {"n_tokens": 2})
    bank.add("l", "lora", {"r": 2})
    perturb(bank, "l")
    t = synthetic_task("two", labels=("small cat", "dog"))
    logits = make_scorer(bb).logits(bank, ["a sky", "one"], t, Routing(torch.tensor([[1.0, 1.0]] * 2)))
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for name in ("p", "l"):
        grads = [p.grad for p in bank.module_parameters(name).values()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_causal_scorer_refuses_per_token_routing():
    from mtpeft.backbone import load_backbone
    from mtpeft.io import MtpeftError

    bb = load_backbone("tiny-llama", seed=0)
    bank = ModuleBank(bb)
    bank.add("l", "lora")
    with pytest.raises(MtpeftError, match="per-token"):
        make_scorer(bb).logits(bank, ["a sky"], synthetic_task(), Routing(torch.ones(1, 4, 1)))


def test_a_router_through_the_scorer_gets_the_batch_tasks_and_texts(tiny_backbone):
    """Scorers hand a router a RouteContext with each example's task and raw text: task-id routing through
    the scorer equals the one-hot routing it stands for, in a mixed-task batch."""
    from mtpeft.routers import TaskIdRouter

    bb = tiny_backbone
    bank = _bank(bb)
    bank.add("b", "lora", {"r": 4}, task="two")
    perturb(bank, "b", seed=5)
    bank.record("a").task = "one"
    bank.freeze()
    scorer = make_scorer(bb)
    t1, t2 = synthetic_task("one"), synthetic_task("two", labels=("small cat", "dog", "big old bird"))
    texts, tasks = ["the big apple", "a sky ocean thing", "one"], [t2, t1, t2]
    seen = []

    class Spy(TaskIdRouter):
        def route(self, bank, ctx):
            seen.append((list(ctx.texts), [ctx.task_names[i] for i in ctx.task_ids.tolist()]))
            return super().route(bank, ctx)

    with torch.no_grad():
        want = scorer.logits(bank, texts, tasks, Routing.one_hot([1, 0, 1]))
        got = scorer.logits(bank, texts, tasks, Spy())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert seen == [(texts, ["two", "one", "two"])]


def test_causal_rows_of_a_mixed_batch_keep_each_examples_routing():
    """A mixed batch whose label sets differ (2, 3 and 5 labels, ``label_chunk=2``: rows of widths 1 and 2 that
    continue some examples' cache rows only) scores as each task alone, under a per-site factored router (MHR)
    and a per-example router (task-id, LoRA and prompts); gradients reach the prompts through the picked rows."""
    from mtpeft.backbone import load_backbone
    from mtpeft.routers import PolyRouter, TaskIdRouter

    bb = load_backbone("tiny-llama", seed=0)
    tasks = [synthetic_task("one", labels=("red", "blue")), synthetic_task("two", labels=("small cat", "dog", "a bird")),
             synthetic_task("three", labels=("u", "v w", "x", "y z q", "w"))]
    texts = ["the big apple and more words here", "a sky", "one small old ocean", "x", "cold ocean"]
    which = [2, 0, 1, 2, 1]
    bank = ModuleBank(bb)
    for i in range(3):
        bank.add(f"s{i}", "lora", {"r": 2}, seed=i)
        perturb(bank, f"s{i}", seed=i)
    bank.freeze()
    poly = PolyRouter([f"s{i}" for i in range(3)], [t.name for t in tasks], n_splits=2, seed=1)
    poly.bind(bank)
    with torch.no_grad():
        poly.logits.normal_(generator=torch.Generator().manual_seed(0))
    poly.eval()
    scorer = make_scorer(bb, label_chunk=2)
    for router in (poly, "task-id"):
        if router == "task-id":  # prompts (per-example routing only) beside the LoRA modules
            for i in range(3):
                bank.add(f"p{i}", "prompt", {"n_tokens": 2}, seed=i)
                perturb(bank, f"p{i}", seed=10 + i)
            bank.freeze()
            router = by_id = TaskIdRouter({t.name: f"p{i}" for i, t in enumerate(tasks)})
        with torch.no_grad():
            got = scorer.logits(bank, texts, [tasks[w] for w in which], router)
            for i, w in enumerate(which):
                alone = scorer.logits(bank, [texts[i]], tasks[w], router)[0]
                n = tasks[w].num_labels
                torch.testing.assert_close(got[i, :n], alone[:n], atol=1e-4, rtol=1e-4)
                assert torch.isinf(got[i, n:]).all()
    for i in range(3):
        bank.unfreeze(f"p{i}")
    logits = scorer.logits(bank, texts, [tasks[w] for w in which], by_id)
    F.cross_entropy(logits, torch.tensor([3, 1, 2, 4, 0])).backward()
    for i in range(3):  # example 4's target is past its prompt-pass label: only the rows reach it
        g = bank.module_parameters(f"p{i}")["<input>.prompt"].grad
        assert g is not None and g.abs().sum() > 0, i
