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


def test_grouped_skewed_routing_falls_back_to_per_expert_loop(monkeypatch):
    monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 0)
    st = make_stack(E=12)
    x = torch.randn(2, 40, 16)
    idx = torch.zeros(2, 40, 1, dtype=torch.long)  # every token on expert 0 but one
    idx[0, 0, 0] = 7
    r = Routing(torch.ones(2, 40, 1), idx)
    got = kernels.routed_delta(st, x, localize(r, torch.arange(12), 12))
    assert torch.allclose(got, reference(st, x, r.weights, r.indices), atol=1e-5)


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
