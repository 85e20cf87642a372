"""Input- and attention-level module types (prompt, ptuning, prefix, mam) on tiny BERT and Llama.

The checks every type passes (identity at init, gradients, learning, save/load, merging, mixed
batches, growing) are in test_modules_matrix.py. Here: config fields, finalize, and the masking,
position and prefix mechanics the types rely on, checked against reference computations with the
bare transformers models.
"""
from dataclasses import fields

import pytest
import torch
from conftest import VOCAB, StandInTokenizer, bank_with, batch, make_backbone, perturb
from transformers import DynamicCache

from mtpeft import kernels
from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.modules import MODULE_TYPES
from mtpeft.routing import Routing

FAMILIES = ["encoder", "causal"]
TYPES = [
    ("prompt", {"n_tokens": 4}),
    ("ptuning", {"n_tokens": 4, "encoder_hidden": 16}),
    ("ptuning", {"n_tokens": 3, "encoder": "lstm", "encoder_hidden": 8}),
    ("prefix", {"n_tokens": 3}),
    ("prefix", {"n_tokens": 3, "projection": True, "projection_hidden": 16}),
    ("mam", {"prefix_tokens": 3, "prefix_hidden": 16, "adapter_r": 8}),
]
IDS = ["prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-mlp", "mam"]


def real(out):
    """The outputs at real-token positions (the scorer drops the first n_virtual)."""
    return out.output[:, out.n_virtual:]


needs = pytest.mark.parametrize("family", FAMILIES)
each_type = pytest.mark.parametrize("mtype,cfg", TYPES, ids=IDS)


# ---- routing: unserved examples, mixing, per-token ----------------------------------------------
@needs
@each_type
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zero_weight_leaves_outputs_unchanged(family, mtype, cfg, attn):
    """No identity at init for prompts/prefixes; instead: unrouted examples equal the bare backbone."""
    bank = bank_with(family, mtype, cfg, n=1, attn=attn)
    bank.add("lora", "lora", seed=5)
    perturb(bank, "lora", seed=5)
    bank.freeze()
    ids, mask = batch()
    with torch.no_grad():
        bare = bank(ids, mask).output
        lora = bank(ids, mask, routing=Routing.one_hot([1, 1, 1])).output
        # explicit zero weight for the module, per example (dense over the bank)
        zero = bank(ids, mask, routing=Routing(torch.tensor([[0.0, 1.0]] * 3))).output
        mixed = bank(ids, mask, routing=Routing.one_hot([1, 0, 1]))
    assert (lora - bare).abs().max() > 1e-3
    torch.testing.assert_close(zero, lora, atol=1e-6, rtol=0)
    got = real(mixed)
    for b in (0, 2):  # the LoRA examples of the mixed batch, pads included
        torch.testing.assert_close(got[b], lora[b], atol=1e-6, rtol=0)
    assert (got[1, :5] - bare[1, :5]).abs().max() > 1e-3  # the module does act on its own example


@needs
@pytest.mark.parametrize("mtype,cfg", [pytest.param(t, c, id=i) for (t, c), i in zip(TYPES, IDS)
                                       if MODULE_TYPES.get(t).level in ("input", "attention")])
def test_params_and_output_mixing_agree(family, mtype, cfg):
    """Input- and attention-level modules mix what they inject (tokens, keys/values), whatever ``mix``
    says. (Not MAM: its FFN adapter, a linear-level part, mixes outputs or parameters as told.)"""
    bank = bank_with(family, mtype, cfg, n=3)
    bank.freeze()
    ids, mask = batch()
    w = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        soft = real(bank(ids, mask, routing=Routing(w)))
        params = real(bank(ids, mask, routing=Routing(w, mix="params")))
        one = real(bank(ids, mask, routing=Routing.one_hot([0, 0, 0])))
    assert (soft - one).abs().max() > 1e-3
    torch.testing.assert_close(params, soft, atol=1e-6, rtol=0)


@needs
@each_type
def test_per_token_routing_is_refused(family, mtype, cfg):
    bank = bank_with(family, mtype, cfg, n=2)
    ids, mask = batch()
    with pytest.raises(MtpeftError, match="per example"):
        bank(ids, mask, routing=Routing(torch.rand(3, 7, 2)))
    kernels_max = kernels.DENSE_TOKEN_MAX_EXPERTS
    try:  # per-token routing that leaves these modules out is fine (the grouped path included)
        kernels.DENSE_TOKEN_MAX_EXPERTS = 0
        bank.add("lora", "lora")
        bank.add("lora2", "lora")
        w = torch.zeros(3, 7, 4)
        w[..., 2:] = torch.rand(3, 7, 2)
        top = Routing.topk(w[..., 2:], 1)
        bank(ids, mask, routing=Routing(top.weights, top.indices + 2))
    finally:
        kernels.DENSE_TOKEN_MAX_EXPERTS = kernels_max


@needs
@each_type
def test_finalize_keeps_outputs(family, mtype, cfg):
    bank = bank_with(family, mtype, cfg, n=2)
    ids, mask = batch()
    r = Routing(torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0]]))
    with torch.no_grad():
        before = real(bank(ids, mask, routing=r))
    changed = bank.finalize("m1")
    reparam = mtype == "ptuning" or cfg.get("projection") or mtype == "mam"
    assert changed == bool(reparam) and bank.record("m1").finalized == bool(reparam)
    assert not bank.finalize("m1")
    names = {k.rsplit(".", 1)[-1] for k in bank.module_parameters("m1") if k.startswith("<")}
    if reparam:
        assert names in ({"virtual_tokens"}, {"kv"})
    with torch.no_grad():
        torch.testing.assert_close(real(bank(ids, mask, routing=r)), before, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in bank.module_parameters("m1").values())


def _types_where(keep):
    return [t for t in MODULE_TYPES.names() if keep(MODULE_TYPES.get(t))]


@pytest.mark.parametrize("mtype", _types_where(lambda t: t.level in ("input", "attention")))
@pytest.mark.parametrize("targets", [["query"], ["q_proj", "v_proj"], []])
def test_config_refuses_target_modules(mtype, targets):
    """Input- and attention-level types act on the embeddings / every attention layer, not on linear layers."""
    with pytest.raises(MtpeftError, match="leave target_modules unset"):
        MODULE_TYPES.get(mtype).config_cls.from_dict({"target_modules": targets})


@pytest.mark.parametrize("mtype", _types_where(lambda t: "init_std" in {f.name for f in fields(t.config_cls)}))
@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_config_init_std_must_be_positive(mtype, bad):
    with pytest.raises(MtpeftError, match="init_std"):
        MODULE_TYPES.get(mtype).config_cls.from_dict({"init_std": bad})


@pytest.mark.parametrize("mtype,bad", [
    ("prompt", {"init_text": "  "}), ("ptuning", {"encoder": "gru"}), ("prefix", {"projection": "yes"}),
    ("mam", {"adapter_scale": 0.0}), ("mam", {"adapter_activation": "softmax"}),
])
def test_config_validation(mtype, bad):
    """Type-specific fields; sizes, dropout, unknown options: test_modules_matrix.py (test_config_*)."""
    with pytest.raises(MtpeftError):
        MODULE_TYPES.get(mtype).config_cls.from_dict(bad)


# ---- prompt mechanics -------------------------------------------------------------------------
@needs
def test_prompt_matches_manual_prepend(family):
    """A routed prompt == the bare model run on [prompt; embeddings] with default positions 0..n+T-1."""
    bank = bank_with(family, "prompt", {"n_tokens": 4}, n=1)
    ids, mask = batch()
    with torch.no_grad():
        out = bank(ids, mask, routing=Routing.one_hot([0, 0, 0]))
        P = bank.module_parameters("m0")["<input>.prompt"]
        emb = bank.model.get_input_embeddings()(ids)
        body = bank.model.get_decoder() if family == "causal" else bank.model
        ref = body(inputs_embeds=torch.cat([P.expand(3, -1, -1), emb], 1),
                   attention_mask=torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1)).last_hidden_state
    assert out.n_virtual == 4 and out.attention_mask.shape == (3, 11)
    torch.testing.assert_close(out.output, ref, atol=1e-5, rtol=0)


def test_prompt_init_from_text():
    bb = make_backbone("encoder")
    bank = ModuleBank(bb)
    bank.add("p", "prompt", {"n_tokens": 5, "init_text": "ab"})
    P = bank.module_parameters("p")["<input>.prompt"]
    ids = torch.tensor(StandInTokenizer()("ab")["input_ids"] * 3)[:5]
    torch.testing.assert_close(P, bb.model.get_input_embeddings().weight[ids])
    bank.backbone.tokenizer = None
    with pytest.raises(MtpeftError, match="tokenizer"):
        bank.add("p2", "prompt", {"init_text": "ab"})


def test_prompt_random_init_scale_and_seed():
    bb = make_backbone("causal")
    bank = ModuleBank(bb)
    state = torch.random.get_rng_state()
    bank.add("a", "prompt", {"n_tokens": 50}, seed=1)
    bank.add("b", "ptuning", {"n_tokens": 5}, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # init draws from the seed, not the global RNG
    P = bank.module_parameters("a")["<input>.prompt"]
    std = bb.model.get_input_embeddings().weight.std()
    assert 0.7 < float(P.detach().std() / std) < 1.3


def test_prompt_overflowing_positions_is_a_clear_error():
    bank = ModuleBank(make_backbone("encoder"))
    bank.add("p", "prompt", {"n_tokens": 10})
    ids = torch.randint(1, VOCAB, (1, 60))
    with pytest.raises(MtpeftError, match="positions"):
        bank(ids, torch.ones_like(ids), routing=Routing.one_hot([0]))


def test_prompt_and_prefix_compose():
    """Two input-level groups and a LoRA in one batch; each example == its own forward."""
    for family in FAMILIES:
        bank = ModuleBank(make_backbone(family))
        for name, t, c in [("p", "prompt", {"n_tokens": 2}), ("x", "prefix", {"n_tokens": 3}), ("l", "lora", None)]:
            bank.add(name, t, c)
            perturb(bank, name)
        bank.freeze()
        ids, mask = batch(B=4)
        w = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 1.0, 1.0]])
        with torch.no_grad():
            mixed = real(bank(ids, mask, routing=Routing(w)))
            per = torch.cat([real(bank(ids[i:i + 1], mask[i:i + 1], routing=Routing(w[i:i + 1]))) for i in range(4)])
        torch.testing.assert_close(mixed, per, atol=1e-5, rtol=0)


# ---- prefix mechanics: the pre-filled cache against reference computations ---------------------
def _attention_kv(model, family, ids):
    """Each layer's keys/values for ``ids`` as the model's attention computes them (via its own cache)."""
    cache = DynamicCache()
    body = model.get_decoder() if family == "causal" else model
    body(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


@needs
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_equals_attending_to_real_tokens(family, attn):
    """Prefix kv := the keys/values of real tokens P; the output on X then equals the model run on [P; X].

    Causal (Llama, any depth): X attends to P exactly as in the joint run, at positions l..l+T-1.
    Encoder (BERT, bidirectional): holds for one layer, where P's keys do not depend on X.
    """
    layers = 2 if family == "causal" else 1
    bank = ModuleBank(make_backbone(family, layers=layers, attn=attn))
    bank.add("x", "prefix", {"n_tokens": 3})
    ids, mask = batch()
    mask[:] = 1
    P = torch.randint(1, VOCAB, (1, 3))
    kv = _attention_kv(bank.model, family, P)
    with torch.no_grad():
        param = bank.module_parameters("x")["<attention>.kv"]
        for i, (k, v) in enumerate(kv):  # [1, heads, l, hd] -> [l, heads*hd]
            param[i, 0] = k[0].transpose(0, 1).reshape(3, -1)
            param[i, 1] = v[0].transpose(0, 1).reshape(3, -1)
        out = bank(ids, mask, routing=Routing.one_hot([0, 0, 0])).output
        body = bank.model.get_decoder() if family == "causal" else bank.model
        joint = body(input_ids=torch.cat([P.expand(3, -1), ids], 1), attention_mask=torch.ones(3, 10)).last_hidden_state
    torch.testing.assert_close(out, joint[:, 3:], atol=1e-5, rtol=1e-5)


def test_prefix_shapes_follow_gqa():
    bank = ModuleBank(make_backbone("causal"))
    bank.add("x", "prefix", {"n_tokens": 5})
    kv = bank.module_parameters("x")["<attention>.kv"]
    assert kv.shape == (2, 2, 5, 2 * 8)  # layers, k/v, l, kv_heads * head_dim (4 query heads, 2 kv heads)


def test_prefix_refuses_a_user_cache():
    bank = ModuleBank(make_backbone("causal"))
    bank.add("x", "prefix", {"n_tokens": 2})
    ids, mask = batch()
    with pytest.raises(MtpeftError, match="past_key_values"):
        bank(ids, mask, routing=Routing.one_hot([0, 0, 0]), past_key_values=DynamicCache())


def test_per_layer_router_with_input_level_modules_is_refused():
    bank = ModuleBank(make_backbone("encoder"))
    bank.add("p", "prompt", {"n_tokens": 2})
    ids, mask = batch()
    with pytest.raises(MtpeftError, match="per-example routing"):
        bank(ids, mask, routing=lambda site, x: Routing.one_hot([0] * x.shape[0]))


# ---- MAM: a composite of the prefix and scaled_parallel types -----------------------------------
@needs
def test_mam_equals_its_parts(family):
    """MAM routed with weight w == a prefix and a scaled parallel adapter with the same weights, both at w."""
    cfg = {"prefix_tokens": 3, "prefix_projection": False, "adapter_r": 8}
    bank = bank_with(family, "mam", cfg, n=1)
    parts = ModuleBank(make_backbone(family))
    parts.add("x", "prefix", {"n_tokens": 3})
    parts.add("a", "scaled_parallel", {"r": 8})
    mam = bank.module_parameters("m0")
    with torch.no_grad():
        for name in ("x", "a"):
            for k, p in parts.module_parameters(name).items():
                p.copy_(mam[k])
    assert len(mam) == 1 + 2 * 2  # kv, and down/up at each layer's FFN output projection
    ids, mask = batch()
    w = torch.tensor([[1.0], [0.0], [0.4]])
    with torch.no_grad():
        got = bank(ids, mask, routing=Routing(w)).output
        want = parts(ids, mask, routing=Routing(w.expand(3, 2).contiguous())).output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mam_defaults_follow_the_paper():
    c = MODULE_TYPES.get("mam").config_cls()
    assert (c.prefix_tokens, c.adapter_r, c.adapter_scale, c.prefix_projection) == (30, 512, 4.0, True)


def test_failed_install_leaves_nothing_behind():
    bank = ModuleBank(make_backbone("encoder"))
    with pytest.raises(MtpeftError, match="match no linear layer"):
        bank.add("m", "mam", {"target_modules": ["nothing_here"]})
    assert len(bank) == 0 and not len(bank.input_stacks) and not bank.groups
    bank.add("m", "mam", {"prefix_tokens": 2, "adapter_r": 4})  # and the type still installs afterwards
    ids, mask = batch()
    bank(ids, mask, routing=Routing.one_hot([0, 0, 0]))



def test_continuing_a_cache_equals_one_pass_and_does_not_reapply_modules():
    """Prompt pass with use_cache, then the rest with cache=: the same hidden states as one pass over
    the whole sequence; the prefix/prompt modules act once (their positions live in the cache)."""
    bank = ModuleBank(make_backbone("causal"))
    bank.add("p", "prompt", {"n_tokens": 2})
    bank.add("x", "prefix", {"n_tokens": 3})
    for name in ("p", "x"):
        perturb(bank, name)
    bank.freeze()
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    r = Routing(torch.ones(2, 2))
    with torch.no_grad():
        whole = bank(ids, torch.ones_like(ids), routing=r)
        first = bank(ids[:, :6], torch.ones(2, 6, dtype=torch.long), routing=r, use_cache=True)
        assert first.cache_mask.shape == (2, 3 + 2 + 6) and first.next_positions.tolist() == [11, 11]
        mask = torch.cat([first.cache_mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
        pos = first.next_positions[:, None] + torch.arange(3)
        rest = bank(ids[:, 6:], mask, routing=r, cache=first.cache, position_ids=pos)
    assert rest.n_virtual == 0
    torch.testing.assert_close(rest.output, whole.output[:, whole.n_virtual + 6:], atol=1e-5, rtol=1e-5)


def test_cache_given_twice_is_refused():
    bank = ModuleBank(make_backbone("causal"))
    ids, mask = batch()
    with pytest.raises(MtpeftError, match="once"):
        bank(ids, mask, cache=DynamicCache(), past_key_values=DynamicCache())
