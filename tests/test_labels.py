"""Label spaces (global label ids over tasks) and the scorers scoring against them, with candidate sets."""
import json

import pytest
import torch
from conftest import perturb, synthetic_task
from test_scorer import _causal_reference

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.routing import Routing
from mtpeft.scorer import CausalScorer, make_scorer
from mtpeft.scoring import LabelSpace

TWEETS = ["tweet_airline", "tweet_deflategate", "tweet_selfdriving", "tweet_apple", "tweet_coachella"]


@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    """The five real built-in tweet tasks (capped; built into a private cache: a few seconds)."""
    from mtpeft.suite import load_builtin

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTPEFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return [load_builtin(n, max_examples=8) for n in TWEETS]


def _bank(bb, mtypes=(("lora", {"r": 4}),)):
    bank = ModuleBank(bb)
    for i, (mtype, cfg) in enumerate(mtypes):
        bank.add(f"m{i}", mtype, dict(cfg), seed=i)
        perturb(bank, f"m{i}", seed=i)
    bank.freeze()
    return bank


def _tasks():
    t1 = synthetic_task("one", labels=("red", "blue"))
    t2 = synthetic_task("two", labels=("small cat", "dog", "a big old bird"))
    t3 = synthetic_task("three", labels=("dog", "green", "red"))
    return t1, t2, t3


# ---- the label space ----------------------------------------------------------------------------
def test_union_of_the_five_tweet_tasks_is_three_labels(tweets):
    space = LabelSpace.union(tweets)
    assert len(space) == 3
    assert space.texts == ["negative sentiment", "neutral sentiment", "positive sentiment"]
    assert space.names == ["negative", "neutral", "positive"]
    for t in tweets:
        assert space.ids_of(t).tolist() == [0, 1, 2]
    assert LabelSpace.from_tasks(tweets) == space
    # after another task that shares one of their labels, the tweets' ids follow the shared text
    other = synthetic_task("other", labels=("positive", "mixed"))
    other.label_template = "{label} sentiment"
    grown = LabelSpace.union([other, *tweets])
    assert grown.texts == ["positive sentiment", "mixed sentiment", "negative sentiment", "neutral sentiment"]
    assert grown.ids_of(tweets[2]).tolist() == [2, 3, 0]
    assert grown.to_global(tweets[0], torch.tensor([0, 2, 2, 1])).tolist() == [2, 0, 0, 3]
    cand = grown.candidates_of([other, tweets[1]])
    assert cand.tolist() == [[True, True, False, False], [True, False, True, True]]


def test_label_space_growth_keeps_ids_stable():
    t1, t2, t3 = _tasks()
    s1 = LabelSpace.of(t1)
    assert s1.texts == ["red", "blue"] and s1.ids_of(t1).tolist() == [0, 1]
    s2 = s1.extend(t2)
    s3 = s2.extend(t3)
    assert s1.texts == ["red", "blue"]  # immutable: growth makes a new space
    assert s3.texts == ["red", "blue", "small cat", "dog", "a big old bird", "green"]
    for old in (s1, s2):
        assert s3.texts[: len(old)] == old.texts
        for t in (t1, t2):
            if all(x in old for x in t.label_texts):
                assert s3.ids_of(t).tolist() == old.ids_of(t).tolist()
    assert s3.ids_of(t3).tolist() == [3, 5, 0]
    assert s3.extend(t1, t2, t3) is s3  # nothing new: the same space
    assert LabelSpace.union([t1, t2, t3]) == s3 and s3.key == tuple(s3.texts)
    assert s3.id_of(" dog ") == 3  # compared after stripping; case matters
    assert "Dog" not in s3 and "dog" in s3
    assert s3.candidates_of([t3, t1]).tolist() == [[True, False, False, True, False, True],
                                                  [True, True, False, False, False, False]]


def test_label_space_to_dict_round_trip():
    t1, t2, t3 = _tasks()
    space = LabelSpace.union([t1, t2, t3])
    back = LabelSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert back == space and back.key == space.key and hash(back) == hash(space)
    assert back.names == space.names and back.ids_of(t3).tolist() == [3, 5, 0]
    assert back != LabelSpace.of(t1) and {space: 1}[back] == 1


def test_bad_label_inputs_raise_with_the_fix():
    t1, t2, _ = _tasks()
    with pytest.raises(MtpeftError, match="empty label text"):
        LabelSpace.of(synthetic_task("e", labels=("red", " ")))
    with pytest.raises(MtpeftError, match="both verbalise to 'red'"):
        LabelSpace.of(synthetic_task("d", labels=("red", "red ")))
    with pytest.raises(MtpeftError, match="appears twice"):
        LabelSpace(["a", "b", " a"])
    with pytest.raises(MtpeftError, match="one name per text"):
        LabelSpace(["a", "b"], ["a"])
    space = LabelSpace.of(t1)
    with pytest.raises(MtpeftError, match=r"not in the label space.*extend"):
        space.ids_of(t2)
    with pytest.raises(MtpeftError, match="outside 0..1"):
        space.to_global(t1, [0, 2])
    with pytest.raises(MtpeftError, match=r"shape \[3, 2\], expected \[2, 2\]"):
        space.candidate_mask(torch.ones(3, 2, dtype=torch.bool), 2)
    with pytest.raises(MtpeftError, match="must be bool"):
        space.candidate_mask(torch.ones(2, 2), 2)
    with pytest.raises(MtpeftError, match="outside 0..1"):
        space.candidate_mask([[0], [5]], 2)
    with pytest.raises(MtpeftError, match="one list per example"):
        space.candidate_mask([[0]], 2)
    with pytest.raises(MtpeftError, match="example 1 has no candidate"):
        space.candidate_mask(torch.tensor([[True, False], [False, False]]), 2)
    with pytest.raises(MtpeftError, match="texts"):
        LabelSpace.from_dict({"labels": ["a"]})
    with pytest.raises(MtpeftError, match="schema"):
        LabelSpace.from_dict({"schema": "other/9", "texts": ["a"]})
    with pytest.raises(MtpeftError, match="label_chunk"):
        CausalScorer(load_backbone("tiny-llama").tokenizer, label_chunk=0)
    bb = load_backbone("tiny-bert")
    scorer, bank = make_scorer(bb), ModuleBank(bb)
    with pytest.raises(MtpeftError, match="needs the examples' tasks"):
        scorer.logits(bank, ["a sky"], None)
    with pytest.raises(MtpeftError, match="2 tasks for 1 texts"):
        scorer.logits(bank, ["a sky"], [t1, t1])


# ---- scoring against a label space ----------------------------------------------------------------
def test_union_space_scoring_equals_per_task_scoring(tiny_backbone, tweets):
    """Each tweet task alone, and the five in one mixed batch, scored against the union (3 labels) and
    against a grown space (shifted ids, one non-candidate) with the task's candidates: the per-task
    logits, mapped through ids_of; non-candidates -inf."""
    bank = _bank(tiny_backbone)
    scorer = make_scorer(tiny_backbone)
    union = LabelSpace.union(tweets)
    other = synthetic_task("other", labels=("positive", "mixed"))
    other.label_template = "{label} sentiment"
    grown = LabelSpace.union([other, *tweets])
    with torch.no_grad():
        for task in tweets:
            texts = task.splits["test"]["text"][:2]
            r = Routing.one_hot([0, 0])
            per_task = scorer.logits(bank, texts, task, r)
            assert per_task.shape == (2, 3) and torch.isfinite(per_task).all()
            for space in (union, grown):
                got = scorer.logits(bank, texts, task, r, labels=space, candidates=space.candidates_of([task] * 2))
                assert got.shape == (2, len(space))
                torch.testing.assert_close(got[:, space.ids_of(task)], per_task, atol=1e-5, rtol=1e-5)
            assert torch.isinf(got[:, 1]).all()  # "mixed sentiment" is no tweet task's label
            torch.testing.assert_close(scorer.logits(bank, texts, task, r, labels=union), per_task,
                                       atol=1e-5, rtol=1e-5)  # every label of the union is a candidate
        texts = [t.splits["test"]["text"][2] for t in tweets]
        r = Routing.one_hot([0] * 5)
        mixed = scorer.logits(bank, texts, tweets, r, labels=grown, candidates=grown.candidates_of(tweets))
        per_task = scorer.logits(bank, texts, tweets, r)
        torch.testing.assert_close(mixed[:, [2, 3, 0]], per_task, atol=1e-5, rtol=1e-5)


def test_mixed_batch_against_candidate_sets_equals_each_example_alone(tiny_backbone):
    """Per-example candidate sets (lists of ids, or the same as a mask), no tasks (raw text; causal: the
    default suffix), two modules: the batch == each example alone == (causal) one sequence per label."""
    bb = tiny_backbone
    bank = _bank(bb, (("lora", {"r": 4}), ("lora", {"r": 2})))
    scorer = make_scorer(bb)
    space = LabelSpace.union(_tasks())  # red, blue, small cat, dog, a big old bird, green
    texts = ["the big apple and more words here", "a sky", "one small old ocean", "x"]
    cands = [[0, 1], [2, 3, 4, 5], [1], [5, 4, 3, 2, 1, 0]]
    modules = [0, 1, 0, 1]
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for b, c in enumerate(cands):
        mask[b, c] = True
    with torch.no_grad():
        got = scorer.logits(bank, texts, None, Routing.one_hot(modules), labels=space, candidates=cands)
        assert got.shape == (4, 6)
        assert torch.equal(torch.isfinite(got), mask)
        torch.testing.assert_close(scorer.logits(bank, texts, None, Routing.one_hot(modules), labels=space,
                                                 candidates=mask), got, atol=0, rtol=0)
        for b in range(4):
            alone = scorer.logits(bank, texts[b:b + 1], None, Routing.one_hot(modules[b:b + 1]), labels=space,
                                  candidates=cands[b:b + 1])
            torch.testing.assert_close(alone, got[b:b + 1], atol=1e-5, rtol=1e-5)
            if bb.family == "causal":
                want = torch.stack([_causal_reference(bank, bb.tokenizer, texts[b] + "\nAnswer:", space.texts[i],
                                                      modules[b]) for i in sorted(cands[b])])
                torch.testing.assert_close(got[b, sorted(cands[b])], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mtypes", [(("lora", {"r": 4}), ("lora", {"r": 2})),
                                    (("prefix", {"n_tokens": 3}), ("lora", {"r": 2}))], ids=["lora", "prefix+lora"])
def test_causal_scores_and_gradients_equal_across_label_chunks(mtypes):
    """label_chunk 1, 2 and larger than any candidate set: equal logits (label space and per-task paths)
    and equal gradients (the prompts' cache, prefix positions included, is cut back between chunks)."""
    bb = load_backbone("tiny-llama", seed=0)
    bank = _bank(bb, mtypes)
    for i in range(len(mtypes)):  # _bank froze them: train the modules again for the gradients
        bank.unfreeze(f"m{i}")
    params = [p for i in range(len(mtypes)) for p in bank.module_parameters(f"m{i}").values()]
    t1, t2, t3 = _tasks()
    space = LabelSpace.union([t1, t2, t3])
    texts = ["the big apple and more words here", "a sky", "one small old ocean"]
    tasks = [t2, t1, t3]
    cands = [[0, 2, 3, 4, 5], [1], [5, 4, 3, 0]]
    routing = Routing(torch.tensor([[1.0, 0.5], [0.0, 1.0], [0.7, 0.3]]))
    runs = []
    for chunk in (1, 2, 1000):
        scorer = CausalScorer(bb.tokenizer, label_chunk=chunk)
        got = scorer.logits(bank, texts, tasks, routing, labels=space, candidates=cands)
        local = scorer.logits(bank, texts, tasks, routing)
        bank.zero_grad(set_to_none=True)
        (got[torch.isfinite(got)].sum() + local[torch.isfinite(local)].sum()).backward()
        runs.append((got.detach(), local.detach(), [p.grad.clone() for p in params]))
    got, local, grads = runs[-1]
    assert torch.isfinite(got).sum() == 10 and torch.isinf(local[1, 2])
    assert all(g.abs().sum() > 0 for g in grads)
    for other_got, other_local, other_grads in runs[:-1]:
        torch.testing.assert_close(other_got, got, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other_local, local, atol=1e-5, rtol=1e-5)
        for g, want in zip(other_grads, grads):
            torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)
    # the per-task path is the label-space path mapped to local columns
    torch.testing.assert_close(local[0], got[0, space.ids_of(t2)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(local[2], got[2, space.ids_of(t3)], atol=1e-5, rtol=1e-5)


def test_scorers_prepare_a_label_space_once(tiny_backbone):
    """The encoder embeds a space's texts once per bank version; the causal scorer tokenises them once."""
    bb = tiny_backbone
    bank = _bank(bb)
    scorer = make_scorer(bb)
    space = LabelSpace.union(_tasks())
    seen = []
    label_texts = {" " + t for t in space.texts} | set(space.texts)

    class Counting:  # the tokenizer, noting every call that tokenises label texts
        def __call__(self, texts, *a, **kw):
            if isinstance(texts, list) and set(texts) <= label_texts:
                seen.append(list(texts))
            return bb.tokenizer(texts, *a, **kw)

        def __getattr__(self, name):
            return getattr(bb.tokenizer, name)

    scorer.tokenizer = Counting()
    with torch.no_grad():
        first = scorer.logits(bank, ["a sky", "one"], None, Routing.one_hot([0, 0]), labels=space)
        again = scorer.logits(bank, ["the apple"], None, Routing.one_hot([0]), labels=space)
        again2 = scorer.logits(bank, ["a sky", "one"], None, Routing.one_hot([0, 0]), labels=space)
    assert len(seen) == 1 and len(seen[0]) == 6
    assert again.shape == (1, 6)
    torch.testing.assert_close(again2, first, atol=0, rtol=0)
    if bb.family == "encoder":
        keys = list(scorer._label_cache)
        assert keys == [(space.key, getattr(bank, "version", None), str(bank.device), bank.dtype)]


@pytest.mark.xfail(not hasattr(ModuleBank, "bare"), strict=True,
                   reason="needs ModuleBank.bare(): label embeddings from the original base weights while a "
                          "module is merged (bank.disabled() keeps merged modules in the weights)")
def test_bank_bare_encoder_scores_merged_module_as_routed_unmerged():
    """Encoder scorer logits with a module merged equal those with it routed unmerged, for a reused and
    for a fresh scorer: label embeddings come from the bare backbone whatever is merged."""
    bb = load_backbone("tiny-bert", seed=0)
    bank = _bank(bb)
    t1, t2, t3 = _tasks()
    space = LabelSpace.union([t1, t2, t3])
    texts, tasks = ["the big apple", "a sky ocean thing", "one"], [t1, t2, t3]
    reused = make_scorer(bb)
    with torch.no_grad():
        routed = reused.logits(bank, texts, tasks, Routing.one_hot([0, 0, 0]))
        routed_space = reused.logits(bank, texts, tasks, Routing.one_hot([0, 0, 0]), labels=space)
        bank.merge("m0")
        for scorer in (reused, make_scorer(bb)):
            torch.testing.assert_close(scorer.logits(bank, texts, tasks), routed, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(scorer.logits(bank, texts, tasks, labels=space), routed_space,
                                       atol=1e-4, rtol=1e-4)
