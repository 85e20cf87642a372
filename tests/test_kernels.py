"""The batched routing kernels against a plain per-expert reference."""
import pytest
import torch
from torch import nn

from mtpeft import kernels
from mtpeft.io import MtpeftError
from mtpeft.modules.lora import LoRAConfig, LoRAStack
from mtpeft.routing import Routing, localize


def make_stack(E=6, d=16, r=4, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d, d)
    st = LoRAStack(LoRAConfig(r=r, alpha=8), base)
    g = torch.Generator().manual_seed(seed)
    for _ in range(E):
        st.add_expert(g)
    with torch.no_grad():
        for p in st.parameters():
            p.normal_(0, 0.3)
    st.requires_grad_(False)
    return st


def reference(st, x, weights, indices):
    """Loop over every (example or token, selected expert): the definition of output mixing."""
    out = torch.zeros(*x.shape[:-1], st.d_out)
    per_token = weights.dim() == 3
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            w = weights[b, t] if per_token else weights[b]
            ids = indices[b, t] if per_token else indices[b]
            for wk, e in zip(w.tolist(), ids.tolist()):
                out[b, t] += wk * (st.delta_weight(e) @ x[b, t])
    return out


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dense_max", [0, 64])
def test_routed_delta_matches_reference(per_token, dense_max, monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", dense_max)
    st = make_stack(E=10)
    x = torch.randn(3, 5, 16)
    shape = (3, 5, 10) if per_token else (3, 10)
    r = Routing.topk(torch.randn(shape), k=2)
    local = localize(r, torch.arange(10), 10)
    got = kernels.routed_delta(st, x, local)
    assert torch.allclose(got, reference(st, x, r.weights, r.indices), atol=1e-5)


def test_grouped_skewed_routing_pads_to_powers_of_two(monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 0)
    st = make_stack(E=12)
    x = torch.randn(2, 40, 16)
    idx = torch.zeros(2, 40, 1, dtype=torch.long)  # every token on expert 0 but one
    idx[0, 0, 0] = 7
    r = Routing(torch.ones(2, 40, 1), idx)
    got = kernels.routed_delta(st, x, localize(r, torch.arange(12), 12))
    assert torch.allclose(got, reference(st, x, r.weights, r.indices), atol=1e-5)


def test_skewed_routing_takes_few_batched_calls_not_one_per_expert(monkeypatch):
    """Token counts from 1 to 64 over 64 experts: padding every expert to 64 would more than double the
    work; runs of power-of-two lengths take one call per distinct length, each padded under 2x."""
    st = make_stack(E=64, d=8, r=2)
    calls = []
    grouped = st.grouped
    monkeypatch.setattr(st, "grouped", lambda X, used: calls.append(tuple(X.shape[:2])) or grouped(X, used))
    counts = [max(1, 2 ** (e % 7) - e % 2) for e in range(64)]
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    x = torch.randn(1, ids.numel(), 8)
    r = Routing(torch.rand(1, ids.numel(), 1) + 0.5, ids.view(1, -1, 1))
    got = kernels.routed_delta(st, x, localize(r, torch.arange(64), 64), path="grouped")
    assert torch.allclose(got, reference(st, x, r.weights, r.indices), atol=1e-5)
    caps = {1 << (c - 1).bit_length() for c in counts}
    assert len(calls) == len(caps) == 7
    assert {c for _, c in calls} == caps and sum(n * c for n, c in calls) < 2 * ids.numel()


def test_params_mixing_mixes_factors_not_outputs():
    st = make_stack(E=3)
    x = torch.randn(2, 4, 16)
    w = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    idx = torch.tensor([[0, 1], [1, 2]])
    got = kernels.routed_delta(st, x, localize(Routing(w, idx, mix="params"), torch.arange(3), 3))
    for b in range(2):
        A = sum(w[b, k] * st.experts[idx[b, k]].lora_A for k in range(2))
        B = sum(w[b, k] * st.experts[idx[b, k]].lora_B for k in range(2))
        assert torch.allclose(got[b], st.scale * x[b] @ A.t() @ B.t(), atol=1e-5)


def test_dense_per_example_weights_with_zeros_are_sparsified_exactly():
    st = make_stack(E=5)
    x = torch.randn(4, 3, 16)
    w = torch.zeros(4, 5)
    w[0, 1], w[1, 3], w[2, 0], w[2, 4], w[3, 2] = 1.0, 0.5, 0.3, 0.7, 2.0
    got = kernels.routed_delta(st, x, localize(Routing(w), torch.arange(5), 5))
    ref = reference(st, x, w, torch.arange(5).expand(4, 5))
    assert torch.allclose(got, ref, atol=1e-5)


def test_localize_restricts_to_group_and_skips_unused_groups():
    r = Routing(torch.ones(2, 1), torch.tensor([[3], [5]]))
    loc = localize(r, torch.tensor([5, 6]), 8)
    assert loc.weights[:, 0].tolist() == [0.0, 1.0] and loc.indices[1, 0].item() == 0
    assert localize(r, torch.tensor([0, 1]), 8) is None
    with pytest.raises(MtpeftError, match="outside"):
        localize(Routing(torch.ones(1, 1), torch.tensor([[9]])), torch.tensor([0]), 8)
    with pytest.raises(MtpeftError, match="columns"):
        localize(Routing(torch.ones(1, 3)), torch.tensor([0]), 8)


def test_routing_validation_errors():
    with pytest.raises(MtpeftError, match="same shape"):
        Routing(torch.ones(2, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(MtpeftError, match="per example"):
        Routing(torch.ones(2, 3, 2), mix="params")
    with pytest.raises(MtpeftError, match="batch"):
        Routing(torch.ones(2))


def test_training_gather_stacks_only_selected_experts():
    st = make_stack(E=4)
    st.experts[2].requires_grad_(True)
    x = torch.randn(2, 3, 16)
    out = kernels.routed_delta(st, x, localize(Routing.one_hot([2, 2]), torch.arange(4), 4))
    out.sum().backward()
    assert st.experts[2].lora_A.grad is not None
    assert all(st.experts[i].lora_A.grad is None for i in (0, 1, 3))


# ---- the per-token path: dense pass or grouped by expert ----------------------------------------

def lora_stack(E, d=384, r=8):
    return make_stack(E=E, d=d, r=r)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_forced_paths_agree_with_reference_and_each_other(k):
    st = make_stack(E=9)
    x = torch.randn(2, 11, 16)
    r = Routing.topk(torch.randn(2, 11, 9), k=k)
    local = localize(r, torch.arange(9), 9)
    dense = kernels.routed_delta(st, x, local, path="dense")
    grouped = kernels.routed_delta(st, x, local, path="grouped")
    ref = reference(st, x, r.weights, r.indices)
    assert torch.allclose(dense, ref, atol=1e-5) and torch.allclose(grouped, ref, atol=1e-5)
    with pytest.raises(ValueError, match="path"):
        kernels.routed_delta(st, x, local, path="sideways")


def test_grouped_path_drops_pairs_of_other_groups():
    """Per-token routing over a bank where some selected modules belong to another group (weight 0 here)."""
    st = make_stack(E=6)
    x = torch.randn(2, 9, 16)
    r = Routing.topk(torch.randn(2, 9, 10), k=3)  # modules 0..9; this stack holds 4..9
    local = localize(r, torch.arange(4, 10), 10)
    assert bool((local.weights == 0).any())
    grouped = kernels.routed_delta(st, x, local, path="grouped")
    dense = kernels.routed_delta(st, x, local, path="dense")
    assert torch.allclose(grouped, dense, atol=1e-5)
    assert torch.allclose(grouped, reference(st, x, local.weights, local.indices), atol=1e-5)


def test_chooser_dense_for_small_banks_grouped_for_large_banks_of_big_rank():
    small, big = lora_stack(1, r=8), lora_stack(1, r=64)
    assert kernels.token_path(small, 2048, 3, 2) == "dense"  # 2K >= E
    assert kernels.token_path(small, 2048, 6, 2) == "dense"
    assert kernels.token_path(big, 2048, 256, 2) == "grouped"
    # a bigger rank makes every expert of the dense pass dearer: grouped comes no later than for r=8
    first = {r: next(E for E in range(5, 4097) if kernels.token_path(st, 2048, E, 2) == "grouped")
             for r, st in ((8, small), (64, big))}
    assert first[64] <= first[8]
    # few tokens: the grouped path's fixed overhead is not worth it as early
    assert next(E for E in range(5, 4097) if kernels.token_path(big, 8, E, 2) == "grouped") >= first[64]


def test_chooser_keeps_ia3_on_the_ffn_dense():
    """(IA)3 on an FFN output scales the layer input: the grouped path would rerun the base matmul once
    per selected expert, the dense pass mixes the vectors and runs it once."""
    from mtpeft.modules.ia3 import IA3Config, IA3Stack

    base = nn.Linear(1536, 384)
    assert kernels.token_path(IA3Stack(IA3Config(), base, feedforward=True), 2048, 128, 2) == "dense"
    assert kernels.token_path(LoRAStack(LoRAConfig(r=8), base), 2048, 128, 2) == "grouped"


def test_stacks_can_state_their_own_costs_and_unknown_stacks_keep_the_old_rule():
    class Cheap:
        d_in = d_out = 16

        def token_costs(self):
            return kernels.TokenCosts(per_expert=1.0, per_pair=1e9)

    class Unknown:
        d_in = d_out = 16

    assert kernels.token_path(Cheap(), 2048, 1000, 2) == "dense"
    assert kernels.token_path(Unknown(), 2048, 8, 2) == "dense"
    assert kernels.token_path(Unknown(), 2048, 9, 2) == "grouped"


def test_fixed_threshold_override_still_forces_a_path(monkeypatch):
    st = lora_stack(1, r=64)
    monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 10**9)
    assert kernels.token_path(st, 2048, 256, 2) == "dense"
    monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 0)
    assert kernels.token_path(st, 2048, 5, 2) == "grouped"
    assert kernels.token_path(st, 2048, 4, 2) == "dense"  # 2K >= E: dense whatever the threshold


@pytest.mark.parametrize("kind", ["lora", "ia3", "ia3_ffn", "krona"])
@pytest.mark.parametrize("skewed", [False, True])
def test_dense_and_grouped_paths_agree_for_every_linear_stack(kind, skewed):
    from mtpeft.modules.ia3 import IA3Config, IA3Stack
    from mtpeft.modules.krona import KronAConfig, KronAStack

    base = nn.Linear(24, 16)
    st = {"lora": lambda: LoRAStack(LoRAConfig(r=3), base),
          "ia3": lambda: IA3Stack(IA3Config(), base, feedforward=False),
          "ia3_ffn": lambda: IA3Stack(IA3Config(), base, feedforward=True),
          "krona": lambda: KronAStack(KronAConfig(max_factor=4), base)}[kind]()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        st.add_expert(g)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    st.requires_grad_(False)
    x = torch.randn(3, 50, 16 if kind == "ia3" else 24, generator=g)  # (IA)3 on a key/value reads y
    logits = torch.randn(3, 50, 20, generator=g)
    if skewed:
        logits[..., 0] += 4.0  # most tokens pick expert 0
    local = localize(Routing.topk(logits, 2), torch.arange(20), 20)
    dense = kernels.routed_delta(st, x, local, path="dense")
    grouped = kernels.routed_delta(st, x, local, path="grouped")
    assert dense.abs().max() > 1e-3
    torch.testing.assert_close(grouped, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "houlsby"])
def test_one_expert_for_all_takes_plain_matmuls_and_equals_the_batched_path(kind, monkeypatch):
    """Task-id routing of a whole batch to one expert (training) skips the gather and batched products."""
    from mtpeft.modules.adapter import AdapterStack, HoulsbyConfig

    st = make_stack(E=4) if kind == "lora" else None
    if st is None:
        base = nn.Linear(16, 16)
        st = AdapterStack(HoulsbyConfig(r=4), base, parallel=False)
        for _ in range(4):
            st.add_expert(torch.Generator().manual_seed(1))
        with torch.no_grad():
            for p in st.parameters():
                p.normal_(0, 0.3)
    x = torch.randn(3, 5, 16)
    local = localize(Routing.one_hot([2, 2, 2]), torch.arange(4), 4)
    assert local.single_expert == 2
    calls = []
    monkeypatch.setattr(type(st), "per_example", lambda *a, **k: calls.append(1))
    fast = kernels.routed_delta(st, x, local)
    assert not calls  # the batched path was not taken
    monkeypatch.undo()
    general = st.per_example(x, local.indices, local.weights, local.mix)
    torch.testing.assert_close(fast, general, atol=1e-6, rtol=1e-5)
    # not one expert for all, or not wholly: no fast path
    assert localize(Routing.one_hot([2, 1, 2]), torch.arange(4), 4).single_expert is None
    assert localize(Routing(torch.tensor([[0.5], [0.5], [0.5]]), torch.tensor([[2], [2], [2]])),
                    torch.arange(4), 4).single_expert is None
