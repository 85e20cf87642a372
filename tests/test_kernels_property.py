"""Property-based checks of the routing kernels: any bank size, k, batch shape and routing granularity."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels import make_stack, reference

from mtpeft import kernels
from mtpeft.routing import Routing, localize


@st.composite
def routing_case(draw):
    E = draw(st.integers(1, 12))
    k = draw(st.integers(1, min(E, 3)))
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    per_token = draw(st.booleans())
    path = draw(st.sampled_from([None, "dense", "grouped"]))
    skew = draw(st.sampled_from([0.0, 6.0]))  # 6.0: nearly every row picks expert 0 first
    seed = draw(st.integers(0, 2**16))
    return E, k, B, T, per_token, path, skew, seed


@settings(max_examples=60, deadline=None)
@given(routing_case())
def test_routed_delta_equals_the_per_pair_loop(case):
    E, k, B, T, per_token, path, skew, seed = case
    stack = make_stack(E=E, d=8, r=2, seed=seed % 97)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 8, generator=g)
    logits = torch.randn((B, T, E) if per_token else (B, E), generator=g)
    logits[..., 0] += skew
    r = Routing.topk(logits, k=k)
    local = localize(r, torch.arange(E), E)
    got = kernels.routed_delta(stack, x, local, path=path if per_token else None)
    torch.testing.assert_close(got, reference(stack, x, r.weights, r.indices), atol=1e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**16))
def test_one_hot_routing_equals_each_expert_alone(E, seed):
    stack = make_stack(E=E, d=8, r=2, seed=seed % 97)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(E, 3, 8, generator=g)
    choice = torch.randperm(E, generator=g)
    local = localize(Routing.one_hot(choice.tolist()), torch.arange(E), E)
    got = kernels.routed_delta(stack, x, local)
    for b, e in enumerate(choice.tolist()):
        torch.testing.assert_close(got[b], x[b] @ stack.delta_weight(e).T, atol=1e-5, rtol=1e-4)
