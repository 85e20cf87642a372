"""AdapterFusion (mtpeft.routers.fusion, mtpeft.skills.fusion, the ``fusion`` adapt method) on tiny models: the
adapters' individual outputs, one adapter at init, the reference formulation, the regulariser, training,
persistence with the bank, the adapt method end to end and bad input."""
import json
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import bank_with, batch, perturb, synthetic_task

from mtpeft.errors import MtpeftError
from mtpeft.routers.fusion import FusionRouter
from mtpeft.routing import LocalRouting, Routing
from mtpeft.skills.fusion import add_fusion, evaluate_fusion, fit_fusion, load_fusion, save_fusion, trainable

FAMILIES = ["encoder", "causal"]
ADAPTERS = [("pfeiffer", {"r": 4}), ("houlsby", {"r": 4, "activation": "gelu"}),
            ("parallel", {"r": 4, "placement": "both"}), ("scaled_parallel", {"r": 4})]


def perturb_router(router, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def capture(bank, site):
    """Record the input and output of the banked layer at ``site`` on each forward."""
    seen = {}
    handle = bank.banked_layer(site).register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    return seen, handle


# ---- the adapters' individual outputs ---------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mtype,cfg", ADAPTERS[:2])
def test_expert_outputs_equal_each_adapter_alone(family, mtype, cfg):
    bank = bank_with(family, mtype, cfg, n=3)
    bank.freeze()
    _, stack = next(iter(bank.stacks_of("m0")))
    x = torch.randn(2, 5, stack.d_in, generator=torch.Generator().manual_seed(0))
    y = torch.randn(2, 5, stack.d_out, generator=torch.Generator().manual_seed(1))
    src = stack.source(x, y)
    out = stack.expert_outputs(src, torch.tensor([2, 0]))
    assert out.shape == (2, 5, 2, stack.d_out)
    for j, i in enumerate((2, 0)):
        e = stack.experts[i]  # the adapter alone, from its parameters
        ref = stack.act(src @ e.adapter_down.t()) @ e.adapter_up.t() * stack.scale
        torch.testing.assert_close(out[:, :, j], ref, atol=1e-6, rtol=0)
        # ... and as the bank applies it (routed to it alone): y + its output
        one = LocalRouting(torch.ones(2, 1), torch.full((2, 1), i), "output", 3)
        torch.testing.assert_close(stack(x, y, one), y + out[:, :, j], atol=1e-6, rtol=0)
    assert (out[:, :, 0] - out[:, :, 1]).abs().max() > 1e-3  # two different adapters
    torch.testing.assert_close(stack.expert_outputs(src)[:, :, [2, 0]], out, atol=1e-6, rtol=0)


# ---- one adapter at init ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mtype,cfg", ADAPTERS)
def test_fusion_at_init_with_one_adapter_equals_that_adapter(family, mtype, cfg):
    bank = bank_with(family, mtype, cfg, n=2)
    bank.freeze()
    ids, mask = batch(B=3)
    router = add_fusion(bank, ["m1"]).eval()
    with torch.no_grad():
        bare = bank(ids, mask).output
        alone = bank(ids, mask, routing=Routing.one_hot([1, 1, 1])).output
        fused = bank(ids, mask, routing=router).output
        router.train()  # dropout on the scores: softmax over one adapter is 1 all the same
        fused_train = bank(ids, mask, routing=router).output
    assert (alone - bare).abs().max() > 1e-3  # the adapter does something: the check is not trivial
    torch.testing.assert_close(fused, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused_train, alone, atol=1e-6, rtol=0)
    assert router.regulariser().item() == 0.0


# ---- the reference formulation --------------------------------------------------------------------------------
def test_fuse_equals_the_reference_attention():
    """BertFusion (dynamic config): q = Q h, k_i = K u_i, v_i = V u_i, softmax(q . k_i), sum_i a_i v_i."""
    d, n = 16, 3
    router = FusionRouter(["a", "b", "c"], ["s0", "s1"], d, dropout=0.0)
    perturb_router(router)
    g = torch.Generator().manual_seed(1)
    h, ups = torch.randn(2, 5, d, generator=g), torch.randn(2, 5, n, d, generator=g)
    pos = 1
    q = F.linear(h, router.query_weight[pos], router.query_bias[pos])
    k = F.linear(ups, router.key_weight[pos], router.key_bias[pos])
    v = F.linear(ups, router.value_weight[pos])
    a = torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2).softmax(-1)  # [2, 5, n]
    ref = torch.matmul(a.unsqueeze(2), v).squeeze(2)
    with torch.no_grad():
        torch.testing.assert_close(router.fuse(pos, h, ups), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(router.attention(pos, h, ups), a, atol=1e-6, rtol=1e-5)
    assert (a.max(-1).values - a.min(-1).values).max() > 1e-3  # the adapters get different weights


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_layer_output_is_the_attention_mixture_of_the_adapters(family):
    """At a site, the bank's output under the fusion == y + sum_i a_i V u_i from the adapters' own outputs."""
    bank = bank_with(family, "pfeiffer", {"r": 4}, n=3)
    bank.freeze()
    router = add_fusion(bank, ["m0", "m1", "m2"]).eval()
    perturb_router(router, seed=3)
    site, stack = next(iter(bank.stacks_of("m0")))
    ids, mask = batch()
    seen, handle = capture(bank, site)
    try:
        with torch.no_grad():
            bank(ids, mask, routing=router)
    finally:
        handle.remove()
    x, got = seen["x"], seen["y"]
    with torch.no_grad():
        y = bank.banked_layer(site).base(x)
        ups = stack.expert_outputs(y)
        a = router.attention(router.sites.index(site), y, ups)
        want = y + F.linear((a.unsqueeze(-1) * ups).sum(-2), router.value_weight[router.sites.index(site)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- the regulariser --------------------------------------------------------------------------------------------
def test_regulariser_is_zero_at_init_grows_with_v_and_enters_the_objective():
    from mtpeft.lightning.objectives import Regularised, make_objective

    router = FusionRouter(["a", "b"], ["s0", "s1", "s2"], 8)
    assert router.regulariser().item() == 0.0
    step = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        router.value_weight.add_(step)
    r1 = router.regulariser()
    torch.testing.assert_close(r1, step.pow(2).sum())
    with torch.no_grad():
        router.value_weight.add_(step)
    assert router.regulariser() > r1 > 0
    logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    module = types.SimpleNamespace(router=router)
    loss, logs = Regularised()(module, {"target": target}, logits)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target) + 0.01 * router.regulariser())
    torch.testing.assert_close(logs["reg"], router.regulariser().detach())
    assert isinstance(make_objective("regularised"), Regularised)
    with pytest.raises(MtpeftError, match="regulariser"):
        Regularised()(types.SimpleNamespace(router=torch.nn.Linear(2, 2)), {"target": target}, logits)
    with pytest.raises(MtpeftError, match=">= 0"):
        Regularised(-1.0)


# ---- training -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_bank():
    """tiny-bert with three perturbed Pfeiffer adapters on tasks a, b, c (frozen) and its scorer (the one backbone
    these tests load: loading is the slow part)."""
    from mtpeft.api import new_bank

    bank, scorer = new_bank("tiny-bert")
    for i, t in enumerate("abc"):
        bank.add(f"ad-{t}", "pfeiffer", {"r": 4}, task=t, seed=i)
        perturb(bank, f"ad-{t}", std=1.0, seed=i)  # outputs large enough to matter to the scores
    bank.freeze()
    return bank, scorer


def _params(bank):
    return {k: v.detach().clone() for k, v in bank.named_parameters()}


def test_training_lowers_the_loss_and_moves_only_the_fusion(adapter_bank):
    bank, scorer = adapter_bank
    task = synthetic_task("target", n=32, seed=5)
    texts, labels = list(task.splits["train"]["text"]), torch.tensor(task.splits["train"]["label"])
    before_bank = _params(bank)
    router = add_fusion(bank, bank.names, dropout=0.0, seed=1)
    assert all(not p.requires_grad for p in bank.parameters())
    opt = torch.optim.Adam(router.parameters(), lr=3e-2)

    def loss():
        return F.cross_entropy(scorer.logits(bank, texts, task, router), labels) + 0.01 * router.regulariser()

    router.train()
    start = loss().item()
    for _ in range(10):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < start - 5e-3, f"loss {start:.4f} -> {loss().item():.4f}"
    assert router.regulariser().item() > 0
    after = _params(bank)
    assert all(torch.equal(before_bank[k], after[k]) for k in before_bank)  # adapters and backbone as they were


def test_fit_fusion_trains_the_router_through_lightning(adapter_bank):
    from mtpeft.train import TrainConfig

    bank, scorer = adapter_bank
    task = synthetic_task("target", n=32, seed=5)
    before = _params(bank)
    router = add_fusion(bank, ["ad-a", "ad-b"], seed=2)
    v0 = router.value_weight.detach().clone()
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_epochs=50, max_steps=8, patience=100, progress=False)
    m = fit_fusion(bank, scorer, [task], router, cfg, name="fuse-test")
    assert m["steps"] == 8 and not router.training and not any(p.requires_grad for p in router.parameters())
    assert not torch.equal(router.value_weight, v0)
    assert all(torch.equal(before[k], v) for k, v in _params(bank).items())
    assert trainable(router) == len(router.sites) * (3 * 32 * 32 + 2 * 32)
    acc = evaluate_fusion(bank, scorer, task, router)
    assert acc["n"] == len(task.splits["test"])


# ---- persistence ----------------------------------------------------------------------------------------------------
def test_save_load_round_trip_with_the_bank(adapter_bank, tmp_path):
    from mtpeft.api import open_bank

    bank, scorer = adapter_bank
    router = add_fusion(bank, ["ad-c", "ad-a"], seed=4).eval()
    perturb_router(router, seed=5)
    task = synthetic_task(n=8)
    texts = list(task.splits["test"]["text"])
    with torch.no_grad():
        want = scorer.logits(bank, texts, task, router)
        assert (want - scorer.logits(bank, texts, task, Routing.one_hot([0] * len(texts)))).abs().max() > 1e-4
    bank.save(tmp_path / "bank")
    d = save_fusion(router, tmp_path / "bank", "fuse")
    assert (d / "router.safetensors").is_file() and json.loads((d / "router.json").read_text())["name"] == "fusion"
    bank2, scorer2 = open_bank(tmp_path / "bank")
    loaded = load_fusion(bank2, tmp_path / "bank", "fuse")
    assert loaded.module_names == ["ad-c", "ad-a"] and not loaded.training
    for k, v in router.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(scorer2.logits(bank2, texts, task, loaded), want)
    with pytest.raises(MtpeftError, match="no fusion 'other'"):
        load_fusion(bank2, tmp_path / "bank", "other")
    bank2.remove("ad-a")  # a fused adapter gone: the router refuses, naming it
    with pytest.raises(MtpeftError, match=r"no longer holds"):
        load_fusion(bank2, tmp_path / "bank", "fuse")


def test_load_refuses_state_that_does_not_fit_the_config(adapter_bank, tmp_path):
    bank, _ = adapter_bank
    router = add_fusion(bank, ["ad-a"])
    router.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    meta["config"]["hidden"] = 16
    (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
    with pytest.raises(MtpeftError, match="re-save the router"):
        FusionRouter.load(tmp_path / "r")


# ---- the adapt method --------------------------------------------------------------------------------------------------
def test_adapt_fusion_end_to_end_leaves_the_bank_as_it_was(adapter_bank, tmp_path):
    from mtpeft.adapt import Budget, run_adapt, source_experts

    bank, scorer = adapter_bank
    names, before = list(bank.names), _params(bank)
    assert source_experts(bank, "target") == names  # a bank of adapters alone: its adapters are the experts
    target = synthetic_task("target", n=32, seed=5)
    kept = {}
    rep = run_adapt(bank, scorer, target, [2, 4], ["fusion", "scratch"], [0], Budget(steps=3, batch_size=4, lr=1e-2),
                    out=tmp_path, keep=True, save_router=lambda n, r: kept.update({n: r}))
    assert rep["complete"] and bank.names != names  # scratch's kept modules were added; fusion added none
    fusion_runs = [r for r in rep["runs"] if r["method"] == "fusion"]
    assert len(fusion_runs) == 2 and all(r["info"]["adapters"] == names for r in fusion_runs)
    n_sites = len(bank.module_sites("ad-a"))
    assert all(r["trainable"] == n_sites * (3 * 32 * 32 + 2 * 32) for r in fusion_runs)
    assert sorted(kept) == ["target.adapt.k2.s0.fusion", "target.adapt.k4.s0.fusion"]
    assert not any(n.endswith(".fusion") for n in bank.names)
    for r in [r for r in rep["runs"] if r["method"] == "scratch"]:
        bank.remove(r["module"])
    assert bank.names == names
    after = _params(bank)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the accuracy reported is the kept router's
    acc = evaluate_fusion(bank, scorer, target, kept["target.adapt.k2.s0.fusion"])["accuracy"]
    assert acc == fusion_runs[0]["accuracy"]


def test_cli_adapt_fusion_keeps_the_router_with_the_bank(adapter_bank, tmp_path, capsys):
    from conftest import task_csv

    from mtpeft.cli import main

    bank, _ = adapter_bank
    bank.save(tmp_path / "bank")
    csv = task_csv(tmp_path / "target.csv", synthetic_task("target", n=32, seed=5))
    rc = main(["adapt", "--bank", str(tmp_path / "bank"), "--task-file", f"target={csv}", "--shots", "2",
               "--methods", "fusion", "--max-steps", "2", "--keep", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["runs"][0]["method"] == "fusion" and rep["runs"][0]["module"] == "target.adapt.k2.s0.fusion"
    assert (tmp_path / "bank" / "routers" / "target.adapt.k2.s0.fusion" / "router.safetensors").is_file()
    # `mtpeft eval --router` scores through the saved fusion: the accuracy the report gave
    rc = main(["eval", "--bank", str(tmp_path / "bank"), "--task-file", f"target={csv}", "--router",
               "target.adapt.k2.s0.fusion", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["results"][0]["accuracy"] == rep["runs"][0]["accuracy"]
    assert main(["eval", "--bank", str(tmp_path / "bank"), "--task-file", f"target={csv}", "--router", "nope"]) == 2
    err = capsys.readouterr().err
    assert "has no router 'nope'" in err and "saved routers: target.adapt.k2.s0.fusion" in err


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_gets_clear_errors(adapter_bank):
    from mtpeft.adapt import Budget, run_adapt

    bank, scorer = adapter_bank
    bank.add("ex", "lora", {"r": 4}, task="a")  # a LoRA expert: the default experts, and no adapter among them
    bank.add("other-cfg", "pfeiffer", {"r": 2}, task="d")
    bank.freeze()
    try:
        with pytest.raises(MtpeftError, match="fuses bottleneck adapters.*none among the experts .*--experts ad-a,ad-b,ad-c,other-cfg"):
            run_adapt(bank, scorer, synthetic_task("target", n=8), [2], ["fusion"], [0], Budget(steps=1))
        with pytest.raises(MtpeftError, match=r"fuses bottleneck adapters .*\['ex \(lora\)'\] are not"):
            add_fusion(bank, ["ex"])
        with pytest.raises(MtpeftError, match="fuses bottleneck adapters"):
            FusionRouter(["ex"], bank.module_sites("ex"), 32).check_bank(bank)
        with pytest.raises(MtpeftError, match="one type and config"):
            add_fusion(bank, ["ad-a", "other-cfg"])
    finally:
        bank.remove("ex")
        bank.remove("other-cfg")
    for kw, msg in [({"adapters": []}, "non-empty list"), ({"adapters": ["a", "a"]}, "name each once"),
                    ({"hidden": 0}, "positive integer"), ({"dropout": 1.0}, r"\[0, 1\)"),
                    ({"sites": ["x", "x"]}, "name each once")]:
        args = {"adapters": ["a"], "sites": ["s"], "hidden": 8, **kw}
        with pytest.raises(MtpeftError, match=msg):
            FusionRouter(**args)
    with pytest.raises(MtpeftError, match="made for sites"):
        FusionRouter(["ad-a"], ["encoder.layer.0.output.dense"], 32).check_bank(bank)
