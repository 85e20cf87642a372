"""Bottleneck adapters (houlsby, pfeiffer, parallel, scaled_parallel) on tiny BERT and Llama.

The checks every type passes (identity at init, gradients, learning, save/load, merging, mixed
batches, growing) are in test_modules_matrix.py. Here: config fields, sites, and the adapters' own
mechanics checked against a reference built from plain forward hooks on a bare copy of the
backbone: sequential adapters read the sublayer output, parallel ones the sublayer input of the
SAME layer.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import bank_with, batch, make_backbone

from mtpeft import kernels
from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.modules import MODULE_TYPES
from mtpeft.modules.adapter import source_site
from mtpeft.routing import Routing

FAMILIES = ["encoder", "causal"]
TYPES = [
    ("houlsby", {"r": 8}),
    ("pfeiffer", {"r": 8, "activation": "gelu"}),
    ("parallel", {"r": 8}),
    ("parallel", {"r": 8, "placement": "both", "activation": "tanh"}),
    ("scaled_parallel", {"reduction_factor": 4, "activation": "silu"}),
]
IDS = ["houlsby", "pfeiffer", "parallel", "parallel-both", "scaled_parallel"]
ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def out(bank, ids, mask, routing):
    return bank(ids, mask, routing=routing).output


needs = pytest.mark.parametrize("family", FAMILIES)
each_type = pytest.mark.parametrize("mtype,cfg", TYPES, ids=IDS)


# ---- per-token routing -------------------------------------------------------------------------
@pytest.mark.parametrize("mtype,bad", [
    ("pfeiffer", {"activation": "softmax"}), ("parallel", {"placement": "middle"}),
    ("scaled_parallel", {"scale": 0.0}), ("houlsby", {"scale": -1.0}),
    ("scaled_parallel", {"reduction_factor": 0}), ("parallel", {"reduction_factor": -2.0}),
])
def test_config_validation(mtype, bad):
    """Type-specific fields; sizes, dropout, unknown options: test_modules_matrix.py (test_config_*)."""
    with pytest.raises(MtpeftError):
        MODULE_TYPES.get(mtype).config_cls.from_dict(bad)


def test_defaults():
    get = MODULE_TYPES.get
    assert get("houlsby").config_cls().placement == "both"
    assert get("pfeiffer").config_cls().placement == "ffn"
    assert get("parallel").config_cls().placement == "ffn" and get("parallel").config_cls().scale == 1.0
    assert get("scaled_parallel").config_cls().scale == 4.0
    c = get("houlsby").config_cls()
    assert (c.r, c.activation, c.dropout, c.reduction_factor) == (64, "relu", 0.0, None)
    assert get("houlsby").default_targets["causal"] == ["o_proj", "down_proj"]


# ---- sites -----------------------------------------------------------------------------------
def _sites(bank, name):
    return sorted(bank.group_of(name).sites)


def test_sites_per_type():
    enc = ModuleBank(make_backbone("encoder"))
    enc.add("h", "houlsby", {"r": 4})
    enc.add("pf", "pfeiffer", {"r": 4})
    enc.add("pa", "parallel", {"r": 4, "placement": "attention"})
    att = [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    ffn = [f"encoder.layer.{i}.output.dense" for i in range(2)]
    assert _sites(enc, "h") == sorted(att + ffn)
    assert _sites(enc, "pf") == ffn
    assert _sites(enc, "pa") == att
    assert enc._stash_sites == {f"encoder.layer.{i}.attention.self.query" for i in range(2)}
    dec = ModuleBank(make_backbone("causal"))
    dec.add("h", "houlsby", {"r": 4})
    dec.add("p", "scaled_parallel", {"r": 4, "placement": "both"})
    both = sorted(f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj"))
    assert _sites(dec, "h") == _sites(dec, "p") == both
    assert dec._stash_sites == {f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.q_proj", "mlp.up_proj")}


def test_source_site_same_layer():
    assert source_site("encoder.layer.11.output.dense") == "encoder.layer.11.intermediate.dense"
    assert source_site("encoder.layer.3.attention.output.dense") == "encoder.layer.3.attention.self.query"
    assert source_site("model.layers.10.mlp.down_proj") == "model.layers.10.mlp.up_proj"
    assert source_site("model.layers.0.self_attn.o_proj") == "model.layers.0.self_attn.q_proj"
    with pytest.raises(MtpeftError, match="output projection"):
        source_site("encoder.layer.0.attention.self.value")


@needs
def test_parallel_on_a_non_output_layer_is_refused_cleanly(family):
    bank = ModuleBank(make_backbone(family))
    target = "value" if family == "encoder" else "v_proj"
    with pytest.raises(MtpeftError, match="output projection"):
        bank.add("p", "parallel", {"r": 4, "target_modules": [target]})
    assert bank.names == [] and bank.groups == {}
    bank.add("s", "pfeiffer", {"r": 4, "target_modules": [target]})  # sequential adapters go anywhere
    ids, mask = batch()
    with torch.no_grad():
        bank(ids, mask, routing=Routing.one_hot([0, 0, 0]))


# ---- reference: plain hooks on a bare copy of the backbone -----------------------------------
def _ref_source(site: str) -> str:
    """Independent of the code under test: the layer of the same index that reads the sublayer input."""
    for a, b in (("attention.output.dense", "attention.self.query"), ("output.dense", "intermediate.dense"),
                 ("o_proj", "q_proj"), ("down_proj", "up_proj")):
        if site.endswith(a):
            return site[: -len(a)] + b
    raise AssertionError(site)


def reference(family, bank, names, routing_w, mtype, cfg, ids, mask):
    """The bank's output recomputed on a bare backbone with forward hooks. routing_w: [B,E] or [B,T,E]."""
    model = make_backbone(family, layers=bank.model.config.num_hidden_layers).model
    conf = MODULE_TYPES.get(mtype).config_cls.from_dict(dict(cfg))
    act = ACTS[conf.activation]
    parallel = mtype in ("parallel", "scaled_parallel")
    store, handles = {}, []
    for site in bank.group_of(names[0]).sites:
        experts = [bank.module_parameters(n) for n in names]
        downs = [e[f"{site}.adapter_down"] for e in experts]
        ups = [e[f"{site}.adapter_up"] for e in experts]
        src = _ref_source(site)
        if parallel:
            handles.append(model.get_submodule(src).register_forward_pre_hook(
                lambda mod, inp, src=src: store.__setitem__(src, inp[0])))

        def hook(mod, inp, y, src=src, downs=downs, ups=ups):
            h = store[src] if parallel else y
            w = routing_w if routing_w.dim() == 3 else routing_w[:, None].expand(*h.shape[:2], -1)
            delta = sum(w[..., e, None] * conf.scale * act(h @ downs[e].t()) @ ups[e].t() for e in range(len(downs)))
            return y + delta

        handles.append(model.get_submodule(site).register_forward_hook(hook))
    body = model.get_decoder() if family == "causal" else model
    try:
        return body(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@needs
@each_type
@pytest.mark.parametrize("kind", ["example", "token-dense", "token-grouped"])
def test_matches_hook_reference(family, mtype, cfg, kind, monkeypatch):
    """Sequential adapters read the sublayer output, parallel ones the sublayer input of the same
    layer (reading another layer's stash, or the wrong site, breaks the match), under mixed-task
    per-example routing and per-token routing, dense and grouped."""
    bank = bank_with(family, mtype, cfg, n=3, layers=3)
    bank.freeze()
    ids, mask = batch()
    g = torch.Generator().manual_seed(5)
    if kind == "example":
        w = torch.rand(3, 3, generator=g)
        w[1] = torch.tensor([0.0, 1.0, 0.0])
        routing = Routing(w)
    else:
        routing = Routing.topk(torch.randn(3, 7, 3, generator=g), 1 if kind == "token-grouped" else 2)
        w = torch.zeros(3, 7, 3).scatter_(-1, routing.indices, routing.weights)
        if kind == "token-grouped":
            monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 0)
    with torch.no_grad():
        got = out(bank, ids, mask, routing)
        ref = reference(family, bank, ["m0", "m1", "m2"], w, mtype, cfg, ids, mask)
        bare = bank(ids, mask).output
    assert (got - bare).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@needs
def test_parallel_reads_the_stash_of_its_own_layer(family):
    """Each layer's parallel adapter delta == f(input of that layer's FFN), checked at every layer."""
    bank = bank_with(family, "parallel", {"r": 4}, n=1, layers=3)
    mods = dict(bank.model.named_modules())
    src_in, tgt = {}, {}
    handles = []
    for site in bank.group_of("m0").sites:
        handles.append(mods[_ref_source(site)].register_forward_pre_hook(
            lambda m, i, s=site: src_in.__setitem__(s, i[0])))
        handles.append(mods[site].register_forward_hook(
            lambda m, i, o, s=site: tgt.__setitem__(s, (m.base(i[0]), o))))
    ids, mask = batch()
    with torch.no_grad():
        bank(ids, mask, routing=Routing.one_hot([0, 0, 0]))
    for h in handles:
        h.remove()
    params = bank.module_parameters("m0")
    assert len(tgt) == 3
    inputs = list(src_in.values())
    assert all((a - b).abs().max() > 1e-3 for i, a in enumerate(inputs) for b in inputs[i + 1:])  # layers differ
    for site, (base_y, y) in tgt.items():
        down, up = params[f"{site}.adapter_down"], params[f"{site}.adapter_up"]
        torch.testing.assert_close(y - base_y, F.relu(src_in[site] @ down.t()) @ up.t(), atol=1e-5, rtol=1e-5)


@needs
def test_houlsby_is_sequential_not_parallel(family):
    """Houlsby reads the projection's output: its delta is f(y) and differs from f(x)."""
    bank = bank_with(family, "houlsby", {"r": 4, "placement": "attention"}, n=1)
    site = bank.group_of("m0").sites[0]
    layer = bank.model.get_submodule(site)
    seen = {}
    h = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=m.base(i[0]), out=o))
    ids, mask = batch()
    with torch.no_grad():
        bank(ids, mask, routing=Routing.one_hot([0, 0, 0]))
    h.remove()
    p = bank.module_parameters("m0")
    down, up = p[f"{site}.adapter_down"], p[f"{site}.adapter_up"]
    torch.testing.assert_close(seen["out"], seen["y"] + F.relu(seen["y"] @ down.t()) @ up.t(), atol=1e-5, rtol=1e-5)


@needs
def test_per_layer_router_callable(family):
    """A router called at each site gives the same result as the equivalent static routing."""
    bank = bank_with(family, "parallel", {"r": 4, "placement": "both"}, n=3)
    ids, mask = batch()
    w = torch.rand(3, 7, 3, generator=torch.Generator().manual_seed(8))
    calls = []

    def router(site, x):
        calls.append(site)
        return Routing(w)

    with torch.no_grad():
        torch.testing.assert_close(out(bank, ids, mask, router), out(bank, ids, mask, Routing(w)), atol=1e-6, rtol=0)
    assert len(calls) == 4  # once per adapter site (2 layers x attention, FFN)


@needs
def test_composes_with_a_prompt(family):
    """Prompt positions lengthen every layer's hidden states; the stash follows, in mixed batches too."""
    bank = bank_with(family, "parallel", {"r": 4}, n=1)
    bank.add("prompt", "prompt", {"n_tokens": 2})
    ids, mask = batch()
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # both, adapter only, prompt only
    with torch.no_grad():
        mixed = bank(ids, mask, routing=Routing(w))
        assert mixed.n_virtual == 2
        for b in range(3):
            one = bank(ids[b:b + 1], mask[b:b + 1], routing=Routing(w[b:b + 1]))
            torch.testing.assert_close(mixed.output[b:b + 1, 2:], one.output[:, one.n_virtual:], atol=1e-5, rtol=0)
        prompt = bank(ids, mask, routing=Routing.one_hot([1, 1, 1]))
        assert (mixed.output[0] - prompt.output[0]).abs().max() > 1e-3


def test_parameter_counts_minilm_shape():
    """Defaults (r = 64) on a 384-hidden 6-layer BERT: 2 * 384 * 64 per adapter site."""
    bank = ModuleBank(make_backbone("encoder", layers=6, hidden=384, ffn=1536, heads=12))
    counts = {}
    for t in ("houlsby", "pfeiffer", "parallel", "scaled_parallel"):
        bank.add(t, t)
        counts[t] = sum(p.numel() for p in bank.module_parameters(t).values())
    assert counts == {"houlsby": 589_824, "pfeiffer": 294_912, "parallel": 294_912, "scaled_parallel": 294_912}
    bank.add("rf16", "pfeiffer", {"reduction_factor": 16})
    assert sum(p.numel() for p in bank.module_parameters("rf16").values()) == 6 * 2 * 384 * 24


