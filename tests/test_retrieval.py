"""Retrieval: per-example top-k over cosine similarity to each expert's centroid, centroids from the frozen
backbone's pooled embedding of the task's training inputs, round trips, and routing a synthetic library."""
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_task
from routing_suite import gated_library, routed_share

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.gates import fit_centroid
from mtpeft.io import MtpeftError
from mtpeft.routers import RetrievalRouter, Router
from mtpeft.routers.retrieval import CENTROID, COUNT
from mtpeft.routing import RouteContext
from mtpeft.scorer import make_scorer

NAMES = ["tiny-bert", "tiny-llama"]


def centroid_bank(name, n=4, seed=0):
    """``n`` LoRA modules on a tiny backbone, each with a random centroid (no training)."""
    bb = load_backbone(name, seed=0)
    bank = ModuleBank(bb)
    g = torch.Generator().manual_seed(seed)
    H = bb.model.config.hidden_size
    for i in range(n):
        bank.add(f"m{i}", "lora", {"r": 2}, task=f"t{i}", seed=i)
        bank.set_artifact(f"m{i}", CENTROID, torch.randn(H, generator=g))
    return bank, make_scorer(bb)


def ctx_for(bank, scorer, texts):
    enc = scorer.tokenize(texts, bank.device) if hasattr(scorer, "tokenize") else None
    if enc is None:
        ids, lens = scorer._ids(texts)
        mask = (torch.arange(ids.shape[1]) < lens[:, None]).long()
        enc = {"input_ids": ids, "attention_mask": mask}
    return RouteContext(embed_fn=lambda: bank.pooled(enc["input_ids"], enc["attention_mask"]))


TEXTS = ["the big red apple", "a small blue sky", "one old green stone", "some new ocean"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_weights_are_topk_of_cosine_and_sum_to_one(name, k):
    bank, scorer = centroid_bank(name)
    router = RetrievalRouter.from_bank(bank, top_k=k, temperature=0.5)
    router.check_bank(bank)
    ctx = ctx_for(bank, scorer, TEXTS)
    r = router.route(bank, ctx)
    assert r.weights.shape == (4, k) and r.indices.shape == (4, k)  # per example, k kept of 4
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(4))
    assert all(len(set(row)) == k for row in r.indices.tolist())
    C = torch.stack([bank.artifact(n, CENTROID) for n in bank.names])
    sims = F.normalize(ctx.pooled(), dim=-1) @ F.normalize(C, dim=-1).t()
    vals, idx = sims.topk(k, dim=-1)
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.weights, (vals / 0.5).softmax(-1))


@pytest.mark.parametrize("name", NAMES)
def test_centroid_is_the_mean_pooled_embedding_of_a_sample(name):
    bank, scorer = centroid_bank(name, n=1)
    task = synthetic_task("toy", n=40)
    out = fit_centroid(bank, scorer, task, "m0", n=16, seed=3)
    assert out["centroid_n"] == 16 and int(bank.artifact("m0", COUNT)) == 16
    c = bank.artifact("m0", CENTROID)
    assert c.shape == (bank.backbone.model.config.hidden_size,)
    # the same sample, the same seed: the same centroid; another seed: another sample
    fit_centroid(bank, scorer, task, "m0", n=16, seed=3)
    assert torch.equal(bank.artifact("m0", CENTROID), c)
    fit_centroid(bank, scorer, task, "m0", n=16, seed=4)
    assert not torch.equal(bank.artifact("m0", CENTROID), c)
    # all 40 inputs: the mean of what ctx.pooled() gives the routers for them
    fit_centroid(bank, scorer, task, "m0", n=1000)
    assert int(bank.artifact("m0", COUNT)) == 40
    seen = []

    class Probe(Router):
        def route(self, bank, ctx):
            seen.append(ctx.pooled())

    with torch.no_grad():
        scorer.logits(bank, list(task.splits["train"]["text"]), task, Probe())
    torch.testing.assert_close(bank.artifact("m0", CENTROID), torch.cat(seen).mean(0))


@pytest.mark.parametrize("name", NAMES)
def test_router_state_round_trips_with_identical_routing(name, tmp_path):
    bank, scorer = centroid_bank(name)
    router = RetrievalRouter.from_bank(bank, modules=["m3", "m0", "m2"], top_k=2)
    router.save(tmp_path / "r")
    loaded = Router.load(tmp_path / "r")
    assert isinstance(loaded, RetrievalRouter) and loaded.get_config() == router.get_config()
    for r in (router, loaded):
        r.check_bank(bank)
    ctx = ctx_for(bank, scorer, TEXTS)
    a, b = router.route(bank, ctx), loaded.route(bank, ctx)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert set(a.indices.unique().tolist()) <= set(bank.ids(["m3", "m0", "m2"]).tolist())
    # and through the bank's own save/load of the artifacts
    bank.save(tmp_path / "bank")
    again = ModuleBank.load(tmp_path / "bank", load_backbone(name, seed=0))
    c = RetrievalRouter.from_bank(again, modules=["m3", "m0", "m2"], top_k=2)
    c.check_bank(again)
    rc = c.route(again, ctx_for(again, scorer, TEXTS))
    assert torch.equal(rc.indices, a.indices) and torch.equal(rc.weights, a.weights)


def test_missing_centroids_name_the_command_that_makes_them():
    bank, _ = centroid_bank("tiny-bert", n=2)
    bank.add("fresh", "lora", {"r": 2}, task="news")
    with pytest.raises(MtpeftError, match=r"mtpeft gate --bank BANK --module fresh --task news"):
        RetrievalRouter.from_bank(bank, modules=["m1", "fresh"])
    assert RetrievalRouter.from_bank(bank).module_names == ["m0", "m1"]
    for bad in ({"top_k": 0}, {"temperature": 0.0}):
        with pytest.raises(MtpeftError):
            RetrievalRouter.from_bank(bank, **bad)
    with pytest.raises(MtpeftError, match="unknown option"):
        RetrievalRouter.from_bank(bank, colour="red")
    bare = ModuleBank(load_backbone("tiny-bert", seed=0))
    bare.add("x", "lora", {"r": 2})
    with pytest.raises(MtpeftError, match="mtpeft gate"):
        RetrievalRouter.from_bank(bare)


def test_a_centroid_of_another_width_is_refused():
    bank, _ = centroid_bank("tiny-bert", n=2)
    bank.set_artifact("m1", CENTROID, torch.ones(7))
    with pytest.raises(MtpeftError):
        RetrievalRouter.from_bank(bank)


@pytest.mark.parametrize("family", ["encoder", "causal"])
def test_retrieval_sends_each_task_to_its_expert(family):
    bank, scorer, tasks = gated_library(family, gates=family == "encoder")  # the encoder's: PHATGOOSE's too
    router = RetrievalRouter.from_bank(bank)
    for t in tasks:
        share = routed_share(bank, scorer, router, t, f"{t.name}-lora")
        assert share > 0.9, (t.name, share)
