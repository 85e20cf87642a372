"""PHATGOOSE: the per-token top-k router, gate training (only the gates move), state round trips, and routing a
synthetic library where each task is solved by one expert."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bank_with, batch, synthetic_task
from routing_suite import gated_library, routed_share

from mtpeft import kernels
from mtpeft.bank import ModuleBank
from mtpeft.gates import fit_gates
from mtpeft.io import MtpeftError
from mtpeft.routers import PhatgooseGates, PhatgooseRouter, Router
from mtpeft.routers.phatgoose import gate_key, gates_of
from mtpeft.routing import Routing
from mtpeft.train import TrainConfig

FAMILIES = ["encoder", "causal"]


def gated_bank(family, n=5, seed=0):
    """``n`` perturbed LoRA modules, each with random gates at its sites (no training)."""
    bank = bank_with(family, "lora", {"r": 2}, n=n)
    bank.freeze()
    g = torch.Generator().manual_seed(seed)
    for name in bank.names:
        for site in bank.module_sites(name):
            d = bank.banked_layer(site).base.in_features
            bank.set_artifact(name, gate_key(site), torch.randn(d, generator=g))
    return bank


def site_inputs(bank, ids, mask):
    """``{site: x}``: what each site of the bank sees in a forward routed by ``router``."""
    seen = {}

    class Spy(Router):
        per_site = True

        def at_site(self, site, x, ctx):
            seen[site] = x

    with torch.no_grad():
        bank(ids, mask, routing=Spy())
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_topk_of_standardised_scores_and_sum_to_one(family):
    bank = gated_bank(family)
    router = PhatgooseRouter.from_bank(bank)  # top-2 by default
    assert router.top_k == 2
    ids, mask = batch(B=3, T=7)
    xs = site_inputs(bank, ids, mask)
    router.check_bank(bank)
    assert len(xs) == len(bank.module_sites("m0"))
    for site, x in xs.items():
        r = router.at_site(site, x, None)
        assert r.weights.shape == (3, 7, 2) and r.indices.shape == (3, 7, 2)  # per token, k kept
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(3, 7))
        assert bool((r.weights > 0).all())
        assert bool((r.indices[..., 0] != r.indices[..., 1]).all())  # two distinct experts
        # brute force: every expert's LN(x) . LN(v) / sqrt(d), the top 2, softmax over them
        d = x.shape[-1]
        V = torch.stack([bank.artifact(n, gate_key(site)) for n in bank.names])
        s = F.layer_norm(x, (d,)) @ F.layer_norm(V, (d,)).t() / math.sqrt(d)
        vals, idx = s.topk(2, dim=-1)
        assert torch.equal(r.indices, idx)
        torch.testing.assert_close(r.weights, vals.softmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_bank_mixes_only_the_kept_experts(family):
    """Top-k routing through the bank equals dense routing with zeros outside the top-k: sparse for real."""
    bank = gated_bank(family)
    router = PhatgooseRouter.from_bank(bank, top_k=2)
    ids, mask = batch()

    class Dense(Router):  # the same choice as dense [B, T, E] weights (zeros elsewhere), no indices
        per_site = True

        def at_site(self, site, x, ctx):
            r = router.at_site(site, x, ctx)
            w = torch.zeros(*x.shape[:2], len(bank)).scatter(-1, r.indices, r.weights)
            assert int((w != 0).sum(-1).max()) == 2
            return Routing(w)

    with torch.no_grad():
        got = bank(ids, mask, routing=router).output
        with bank.route(router):
            want = bank(ids, mask, routing=Dense()).output
        top1 = bank(ids, mask, routing=PhatgooseRouter.from_bank(bank, top_k=1)).output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, top1, atol=1e-4)  # the second expert does contribute


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_gate_training_moves_only_the_gates(name):
    """Every parameter and buffer of the bank (backbone and experts) is bit-identical after gate training;
    the gates, zero at init, moved at every site of the expert and are stored as its artifacts."""
    from conftest import perturb

    from mtpeft.backbone import load_backbone
    from mtpeft.scorer import make_scorer

    bb = load_backbone(name, seed=0)
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    for i in range(2):
        bank.add(f"e{i}", "lora", {"r": 2}, task="toy", seed=i)
        perturb(bank, f"e{i}", std=0.1, seed=i)
    bank.unfreeze("e0")  # fit_gates freezes whatever would train
    before = {k: v.detach().clone() for k, v in bank.state_dict().items()}
    out = fit_gates(bank, scorer, synthetic_task("toy"), "e0", TrainConfig(progress=False, batch_size=8), steps=3)
    after = bank.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []
    assert out["steps"] == 3 and out["val_acc"] is not None
    gates = gates_of(bank, "e0")
    assert set(gates) == set(bank.module_sites("e0")) and out["sites"] == len(gates)
    assert all(float(g.abs().max()) > 0 for g in gates.values())
    assert gates_of(bank, "e1") == {}
    assert not any(p.requires_grad for p in bank.parameters())
    assert bank.record("e0").metrics["phatgoose"]["steps"] == 3


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_gradients_reach_the_gates_through_both_per_token_kernels(path, monkeypatch):
    bank = bank_with("encoder", "lora", {"r": 2}, n=6)
    bank.freeze()
    monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 10**6 if path == "dense" else 0)
    torch.manual_seed(0)
    gates = PhatgooseGates.for_module(bank, "m3")
    with torch.no_grad():
        for g in gates.gates:
            g.normal_()
    ids, mask = batch()
    out = bank(ids, mask, routing=gates).output
    out.pow(2).sum().backward()
    grads = [g.grad for g in gates.gates]
    assert all(gr is not None and float(gr.abs().max()) > 0 for gr in grads)
    # the same gradient on either path
    other = PhatgooseGates.for_module(bank, "m3")
    with torch.no_grad():
        for a, b in zip(other.gates, gates.gates):
            a.copy_(b)
    monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 0 if path == "dense" else 10**6)
    bank(ids, mask, routing=other).output.pow(2).sum().backward()
    for a, b in zip(other.gates, gates.gates):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_state_round_trips_with_identical_routing(family, tmp_path):
    bank = gated_bank(family)
    router = PhatgooseRouter.from_bank(bank, modules=["m4", "m1", "m2"], top_k=2)
    router.save(tmp_path / "r")
    loaded = Router.load(tmp_path / "r")
    assert isinstance(loaded, PhatgooseRouter) and loaded.module_names == ["m4", "m1", "m2"]
    ids, mask = batch()
    with torch.no_grad():
        a = bank(ids, mask, routing=router).output
        b = bank(ids, mask, routing=loaded).output
    assert torch.equal(a, b)
    xs = site_inputs(bank, ids, mask)
    for site, x in xs.items():
        ra, rb = router.at_site(site, x, None), loaded.at_site(site, x, None)
        assert torch.equal(ra.indices, rb.indices) and torch.equal(ra.weights, rb.weights)
        assert set(ra.indices.unique().tolist()) <= set(bank.ids(["m4", "m1", "m2"]).tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_round_trip_through_bank_save_and_load(family, tmp_path):
    bank = gated_bank(family)
    bank.save(tmp_path / "bank")
    from conftest import make_backbone

    loaded = ModuleBank.load(tmp_path / "bank", make_backbone(family))
    for n in bank.names:
        assert gates_of(loaded, n).keys() == gates_of(bank, n).keys()
        assert all(torch.equal(gates_of(loaded, n)[s], g) for s, g in gates_of(bank, n).items())
    ids, mask = batch()
    with torch.no_grad():
        a = bank(ids, mask, routing=PhatgooseRouter.from_bank(bank)).output
        b = loaded(ids, mask, routing=PhatgooseRouter.from_bank(loaded)).output
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_follows_the_bank_when_ids_shift(family):
    bank = gated_bank(family)
    router = PhatgooseRouter.from_bank(bank, modules=["m3", "m4"])
    ids, mask = batch()
    with torch.no_grad():
        before = bank(ids, mask, routing=router).output
        bank.remove("m0")  # m3, m4 move down one id
        after = bank(ids, mask, routing=router).output
    torch.testing.assert_close(before, after, atol=1e-6, rtol=0)
    bank.remove("m3")
    with pytest.raises(MtpeftError, match="no longer holds"):
        bank(ids, mask, routing=router)


def test_missing_gates_name_the_command_that_makes_them():
    bank = gated_bank("encoder", n=2)
    bank.add("fresh", "lora", {"r": 2}, task="news")
    with pytest.raises(MtpeftError, match=r"mtpeft gate --bank BANK --module fresh --task news"):
        PhatgooseRouter.from_bank(bank, modules=["m0", "fresh"])
    assert PhatgooseRouter.from_bank(bank).module_names == ["m0", "m1"]  # default: the gated ones
    with pytest.raises(MtpeftError, match="no module"):
        PhatgooseRouter.from_bank(bank, modules=["nope"])
    with pytest.raises(MtpeftError, match="top_k"):
        PhatgooseRouter.from_bank(bank, top_k=0)
    empty = bank_with("encoder", "lora", {"r": 2}, n=1)
    with pytest.raises(MtpeftError, match="mtpeft gate"):
        PhatgooseRouter.from_bank(empty)


def test_gates_refuse_modules_that_do_not_act_on_linear_layers():
    bank = bank_with("encoder", "prompt", {"n_tokens": 2}, n=1)
    with pytest.raises(MtpeftError, match="linear layers"):
        PhatgooseGates.for_module(bank, "m0")


def test_phatgoose_sends_each_task_to_its_expert():
    """Three tasks with disjoint vocabularies, one LoRA expert each, gated by the recipe (100 steps, lr 5e-3):
    over more than 90% of each task's held-out inputs the largest mean routing weight is its own expert's."""
    bank, scorer, tasks = gated_library("encoder")
    router = PhatgooseRouter.from_bank(bank)
    assert router.module_names == [f"{t.name}-lora" for t in tasks]
    for t in tasks:
        share = routed_share(bank, scorer, router, t, f"{t.name}-lora")
        assert share > 0.9, (t.name, share)


def test_gate_training_refuses_a_merged_module():
    from mtpeft.backbone import load_backbone
    from mtpeft.scorer import make_scorer

    bb = load_backbone("tiny-bert", seed=0)
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    bank.add("e0", "lora", {"r": 2}, task="toy")
    bank.merge("e0")
    with pytest.raises(MtpeftError, match="unmerge"):
        fit_gates(bank, scorer, synthetic_task("toy"), "e0", TrainConfig(progress=False), steps=1)
    assert gates_of(bank, "e0") == {}
