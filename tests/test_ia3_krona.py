"""(IA)3 and KronA on tiny BERT and Llama.

The checks every type passes (identity at init, gradients, learning, save/load, merging, mixed
batches, growing) are in test_modules_matrix.py. Here: config fields, sites, factor shapes, and each
type's mechanics checked against a reference built from plain forward hooks on a bare copy of the
backbone: (IA)3 scales the key/value
outputs and the FFN output layer's input; KronA adds ``x (s A kron B)^T`` with the product materialised.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import bank_with, batch, make_backbone, perturb

from mtpeft import kernels
from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.modules import MODULE_TYPES
from mtpeft.modules.krona import largest_divisor
from mtpeft.routing import Routing

FAMILIES = ["encoder", "causal"]
TYPES = [
    ("ia3", {}),
    ("ia3", {"feedforward_modules": []}),  # every target scales its output
    ("krona", {}),
    ("krona", {"a_out": 4, "a_in": 8, "alpha": 2.0}),
]
IDS = ["ia3", "ia3-no-ff", "krona", "krona-4x8"]


def out(bank, ids, mask, routing=None):
    return bank(ids, mask, routing=routing).output


needs = pytest.mark.parametrize("family", FAMILIES)
each_type = pytest.mark.parametrize("mtype,cfg", TYPES, ids=IDS)


# ---- routing and merging (the generic checks are in test_modules_matrix.py) --------------------
@needs
def test_krona_merged_plus_routed_equals_both_routed(family):
    """KronA is additive: a merged module plus another one routed == both routed. (For (IA)3 the two
    compose multiplicatively instead: see mtpeft/modules/ia3.py.)"""
    bank = bank_with(family, "krona", {"a_out": 4, "a_in": 8, "alpha": 2.0}, n=2)
    bank.freeze()
    ids, mask = batch()
    with torch.no_grad():
        both = out(bank, ids, mask, Routing(torch.ones(3, 2), torch.tensor([[0, 1]] * 3)))
        assert (both - out(bank, ids, mask, Routing.one_hot([0, 0, 0]))).abs().max() > 1e-3  # m1 contributes
        bank.merge("m1")
        merged_plus = out(bank, ids, mask, Routing.one_hot([0, 0, 0]))
    torch.testing.assert_close(merged_plus, both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mtype,bad", [
    ("ia3", {"feedforward_modules": "down_proj"}),
    ("ia3", {"feedforward_modules": [3]}),
    ("ia3", {"target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]}),
    ("krona", {"alpha": 0.0}), ("krona", {"alpha": -1.0}),
])
def test_config_validation(mtype, bad):
    """Type-specific fields; sizes, dropout, unknown options: test_modules_matrix.py (test_config_*)."""
    with pytest.raises(MtpeftError):
        MODULE_TYPES.get(mtype).config_cls.from_dict(bad)


@needs
def test_krona_factor_that_does_not_divide_is_refused_cleanly(family):
    bank = ModuleBank(make_backbone(family))
    with pytest.raises(MtpeftError, match="does not divide"):
        bank.add("k", "krona", {"a_out": 5})
    assert bank.names == [] and bank.groups == {}
    bank.add("k", "krona", {"a_out": 4})
    ids, mask = batch()
    with torch.no_grad():
        out(bank, ids, mask, Routing.one_hot([0, 0, 0]))


# ---- defaults and sites -------------------------------------------------------------------------
def _stacks(bank, name):
    group, _ = bank.locate(name)
    return dict(bank.stacks_of(group))


def test_ia3_sites_and_feedforward_flags():
    enc = ModuleBank(make_backbone("encoder"))
    enc.add("a", "ia3")
    st = _stacks(enc, "a")
    want = {f"encoder.layer.{i}.{s}": ff for i in range(2)
            for s, ff in (("attention.self.key", False), ("attention.self.value", False), ("output.dense", True))}
    assert {s: stack.feedforward for s, stack in st.items()} == want  # not attention.output.dense
    p = enc.module_parameters("a")
    assert p["encoder.layer.0.output.dense.ia3_l"].shape == (64,)  # the FFN intermediate size (input)
    assert p["encoder.layer.0.attention.self.key.ia3_l"].shape == (32,)
    dec = ModuleBank(make_backbone("causal"))
    dec.add("a", "ia3")
    dec.add("b", "ia3", {"target_modules": ["v_proj", "up_proj"], "feedforward_modules": ["up_proj"]})
    assert {s: stack.feedforward for s, stack in _stacks(dec, "a").items()} == {
        f"model.layers.{i}.{s}": s.endswith("down_proj") for i in range(2)
        for s in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert {s: stack.dim for s, stack in _stacks(dec, "b").items()} == {
        f"model.layers.{i}.{s}": d for i in range(2) for s, d in (("self_attn.v_proj", 16), ("mlp.up_proj", 32))}
    dec.add("c", "ia3", {"target_modules": ["down_proj"]})  # custom targets: the family's FFN rule still holds
    assert all(stack.feedforward for stack in _stacks(dec, "c").values())


def test_krona_default_factors():
    sizes = (384, 1536, 32, 64, 16, 576, 192, 100, 7)  # MiniLM, its FFN, tiny models, SmolLM2, odd sizes
    assert [largest_divisor(n, 16) for n in sizes] == [16, 16, 16, 16, 16, 16, 16, 10, 7]
    assert largest_divisor(13, 4) == 1
    enc = ModuleBank(make_backbone("encoder", hidden=384, ffn=64, heads=6, layers=1))
    enc.add("k", "krona")
    p = enc.module_parameters("k")
    assert p["encoder.layer.0.attention.self.query.krona_A"].shape == (16, 16)
    assert p["encoder.layer.0.attention.self.query.krona_B"].shape == (24, 24)
    assert sorted({k.rsplit(".", 2)[1] for k in p}) == ["query", "value"]
    dec = ModuleBank(make_backbone("causal"))
    dec.add("k", "krona", {"a_out": 4, "a_in": 8})
    p = dec.module_parameters("k")
    assert p["model.layers.0.self_attn.v_proj.krona_A"].shape == (4, 8)
    assert p["model.layers.0.self_attn.v_proj.krona_B"].shape == (4, 4)  # d_out 16 = 4*4, d_in 32 = 8*4
    assert p["model.layers.1.self_attn.q_proj.krona_B"].shape == (8, 4)
    assert MODULE_TYPES.get("ia3").default_targets["causal"] == ["k_proj", "v_proj", "down_proj"]


def test_krona_delta_weight_is_the_kronecker_product():
    bank = bank_with("encoder", "krona", {"a_out": 4, "a_in": 8, "alpha": 3.0}, n=1)
    site = "encoder.layer.0.attention.self.query"
    stack = _stacks(bank, "m0")[site]
    A, B = stack.experts[0].krona_A, stack.experts[0].krona_B
    dw = stack.delta_weight(0)
    assert dw.shape == (32, 32)
    torch.testing.assert_close(dw[1 * 8 + 2, 3 * 4 + 1], 3.0 * A[1, 3] * B[2, 1])
    x = torch.randn(5, 32)
    torch.testing.assert_close(stack.dense_tokens(x, torch.ones(5, 1)), x @ dw.t(), atol=1e-5, rtol=1e-5)


# ---- reference: plain hooks on a bare copy of the backbone -----------------------------------
def _is_ffn_output(site: str) -> bool:
    return site.endswith("down_proj") or (site.endswith("output.dense") and ".attention." not in site)


def reference(family, bank, names, routing_w, mtype, cfg, ids, mask):
    """The bank's output recomputed on a bare backbone with forward hooks. routing_w: [B,E] or [B,T,E]."""
    model = make_backbone(family, layers=bank.model.config.num_hidden_layers).model
    conf = MODULE_TYPES.get(mtype).config_cls.from_dict(dict(cfg))
    handles = []
    for site in bank.group_of(names[0]).sites:
        experts = [bank.module_parameters(n) for n in names]
        ls = [e.get(f"{site}.ia3_l") for e in experts]
        ff = _is_ffn_output(site) and conf.feedforward_modules is None
        if mtype == "krona":
            dws = [conf.alpha * torch.kron(e[f"{site}.krona_A"], e[f"{site}.krona_B"]) for e in experts]

        def hook(mod, inp, y, ls=ls, ff=ff, dws=dws if mtype == "krona" else None):
            x = inp[0]
            w = routing_w if routing_w.dim() == 3 else routing_w[:, None].expand(*x.shape[:2], -1)
            if mtype == "krona":
                return y + sum(w[..., e, None] * (x @ dws[e].t()) for e in range(len(dws)))
            scale = 1 + sum(w[..., e, None] * (ls[e] - 1) for e in range(len(ls)))
            return F.linear(x * scale, mod.weight, mod.bias) if ff else y * scale

        handles.append(model.get_submodule(site).register_forward_hook(hook))
    body = model.get_decoder() if family == "causal" else model
    try:
        return body(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@needs
@each_type
@pytest.mark.parametrize("kind", ["example", "params", "token-dense", "token-grouped"])
def test_matches_hook_reference(family, mtype, cfg, kind, monkeypatch):
    bank = bank_with(family, mtype, cfg, n=3, layers=3)
    bank.freeze()
    ids, mask = batch()
    g = torch.Generator().manual_seed(5)
    if kind in ("example", "params"):
        w = torch.rand(3, 3, generator=g)
        w[1] = torch.tensor([0.0, 1.0, 0.0])
        if kind == "params" and mtype == "krona":  # parameter mixing is not a mixture of outputs for KronA
            w = torch.eye(3)[[2, 0, 1]] * torch.rand(3, 1, generator=g)
        routing = Routing(w, mix="params" if kind == "params" else "output")
    else:
        routing = Routing.topk(torch.randn(3, 7, 3, generator=g), 1 if kind == "token-grouped" else 2)
        w = torch.zeros(3, 7, 3).scatter_(-1, routing.indices, routing.weights)
        if kind == "token-grouped":
            monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 0)
    with torch.no_grad():
        got = out(bank, ids, mask, routing)
        ref = reference(family, bank, ["m0", "m1", "m2"], w, mtype, cfg, ids, mask)
        bare = out(bank, ids, mask)
    assert (got - bare).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_krona_params_mix_mixes_each_factor():
    """mix='params' over K > 1 experts: one update (sum w A) kron (sum w B), as Poly mixes LoRA's factors."""
    bank = bank_with("encoder", "krona", {"a_out": 4, "a_in": 8}, n=2)
    site = "encoder.layer.0.attention.self.value"
    stack = _stacks(bank, "m0")[site]
    w = torch.tensor([[0.3, 0.7]])
    x = torch.randn(1, 4, 32)
    A = sum(w[0, e] * stack.experts[e].krona_A for e in range(2))
    B = sum(w[0, e] * stack.experts[e].krona_B for e in range(2))
    with torch.no_grad():
        got = stack.per_example(x, torch.tensor([[0, 1]]), w, "params")
    torch.testing.assert_close(got, x @ torch.kron(A, B).t().detach(), atol=1e-5, rtol=1e-5)



@needs
def test_ffn_ia3_folds_into_the_base_matmul(family, monkeypatch):
    """A leading FFN (IA)3 stack scales the layer input before the one base matmul; behind another stack at
    the same site it adds W (x * dl) instead (a second matmul). Both orders give the same outputs."""
    from mtpeft.modules.ia3 import IA3Stack

    sites = ["down_proj"] if family == "causal" else [r"re:layer\.\d+\.output\.dense$"]
    cfgs = {"lora": {"target_modules": sites}, "ia3": {"target_modules": sites, "feedforward_modules": sites}}
    ids, mask = batch()
    outs, calls, first = {}, {}, None
    real = IA3Stack.combine
    for order in (("ia3", "lora"), ("lora", "ia3")):
        bank = ModuleBank(make_backbone(family))
        for t in order:
            bank.add(t, t, dict(cfgs[t]), seed=0)
            perturb(bank, t, seed=1)
            if first is not None:  # the same weights in both banks (init draws depend on the order)
                with torch.no_grad():
                    for k, p in bank.module_parameters(t).items():
                        p.copy_(first.module_parameters(t)[k])
                perturb(bank, t, std=0.0)  # drops cached stacks
        first = first or bank
        n = []
        monkeypatch.setattr(IA3Stack, "combine", lambda self, *a, n=n: n.append(1) or real(self, *a))
        with torch.no_grad():
            outs[order] = out(bank, ids, mask, Routing(torch.ones(3, 2), mix="output"))
        calls[order] = len(n)
    assert calls[("ia3", "lora")] == 0  # folded into the base matmul
    assert calls[("lora", "ia3")] == 2  # the separate W (x * dl), once per FFN site (2 layers)
    bare = out(bank, ids, mask)
    assert (outs[("ia3", "lora")] - bare).abs().max() > 1e-2
    torch.testing.assert_close(outs[("ia3", "lora")], outs[("lora", "ia3")], atol=1e-5, rtol=1e-5)
