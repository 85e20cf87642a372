"""Arrow routing and the average of outputs: prototypes, weights, caching, save/load, a synthetic suite."""
import pytest
import torch
from conftest import bank_with, batch, make_backbone, perturb

from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.routers import ROUTERS, ArrowRouter, AverageRouter, Router
from mtpeft.routers.arrow import DIGEST, KEY, top_right_singular_from_factors
from mtpeft.routing import RouteContext, Routing

FAMILIES = ["encoder", "causal"]


class Recording(Router):
    """Delegates to a per-site router and keeps what it returned at each site."""

    per_site = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = {}

    def check_bank(self, bank):
        self.inner.check_bank(bank)

    def at_site(self, site, x, ctx):
        r = self.inner.at_site(site, x, ctx)
        self.seen[site] = r
        return r


def lora_bank(family, n=4, r=4, **cfg):
    return bank_with(family, "lora", {"r": r, **cfg}, n=n)


def route_all(bank, router, ids=None, mask=None):
    ids, mask = batch() if ids is None else (ids, mask)
    rec = Recording(router)
    with torch.no_grad():
        out = bank(ids, mask, routing=rec).output
    return out, rec.seen


@pytest.mark.parametrize("family", FAMILIES)
def test_prototype_is_the_top_right_singular_vector_of_delta_w(family):
    bank = lora_bank(family, n=3)
    bank.add("ia3", "ia3", {})
    perturb(bank, "ia3", seed=9)
    ArrowRouter.from_bank(bank)
    for name in bank.names:
        for site, delta in bank.delta_weight(name).items():
            v = torch.linalg.svd(delta.double())[2][0]
            p = bank.artifact(name, f"{KEY}:{site}")
            assert p.shape == (delta.shape[1],)
            assert abs(float(v @ p.double())) == pytest.approx(1.0, abs=1e-5)  # equal up to sign


def test_factor_path_handles_rank_above_width_and_batches():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 6, 4, generator=g), torch.randn(3, 5, 6, generator=g)  # r=6 > d_in=4
    got = top_right_singular_from_factors(A, B)
    for i in range(3):
        v = torch.linalg.svd((B[i] @ A[i]).double())[2][0]
        assert abs(float(v @ got[i])) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_shape_sum_to_one_and_are_top_k_sparse(family):
    bank = lora_bank(family, n=5)
    router = ArrowRouter.from_bank(bank, top_k=2, temperature=0.5)
    ids, mask = batch()
    _, seen = route_all(bank, router, ids, mask)
    assert set(seen) == set(bank.module_sites("m0"))
    for site, r in seen.items():
        assert r.weights.shape == (*ids.shape, 2) and r.indices.shape == r.weights.shape
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(ids.shape), atol=1e-6, rtol=0)
        assert bool((r.weights > 0).all())
        assert bool((r.indices[..., 0] != r.indices[..., 1]).all())  # two distinct experts per token
    # the kept experts are the two with the largest |<x, p>|, weighted by softmax(score / T)
    site = bank.module_sites("m0")[0]
    x = torch.randn(2, 3, bank.banked_layer(site).base.in_features)
    logits = router.logits(site, x)
    P = torch.stack([bank.artifact(n, f"{KEY}:{site}") for n in bank.names])
    torch.testing.assert_close(logits, (x @ P.t()).abs() / 0.5)
    r = router.at_site(site, x, RouteContext())
    vals, idx = logits.topk(2, -1)
    assert torch.equal(r.indices, idx)  # the bank's ids are 0..4 here
    torch.testing.assert_close(r.weights, vals.softmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_arrow_output_is_the_mix_of_the_selected_experts(family):
    """The bank under Arrow gives what a fixed per-site routing with Arrow's own weights gives."""
    bank = lora_bank(family, n=4)
    router = ArrowRouter.from_bank(bank, top_k=3)
    ids, mask = batch()
    out, seen = route_all(bank, router, ids, mask)
    replay = lambda site, x: seen[site]
    with torch.no_grad():
        again = bank(ids, mask, routing=replay).output
        one = bank(ids, mask, routing=Routing.one_hot([0, 0, 0])).output
    torch.testing.assert_close(out, again, atol=0, rtol=0)
    assert (out - one).abs().max() > 1e-4  # the routing matters


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_modules_at_a_site_compete_there(family):
    q = {"encoder": "query", "causal": "q_proj"}[family]
    bank = ModuleBank(make_backbone(family))
    bank.add("full", "lora", {"r": 2}, seed=1)
    bank.add("qonly", "lora", {"r": 3, "target_modules": [q]}, seed=2)
    for n in bank.names:
        perturb(bank, n, seed=len(n))
    router = ArrowRouter.from_bank(bank, top_k=2)
    _, seen = route_all(bank, router)
    for site, r in seen.items():
        want = {0, 1} if site.endswith(q) else {0}
        assert set(r.indices.unique().tolist()) == want
        assert r.weights.shape[-1] == len(want)  # top_k capped by the experts present


def test_prototypes_are_cached_and_recomputed_when_the_module_changes():
    bank = lora_bank("encoder", n=2)
    ArrowRouter.from_bank(bank)
    site = bank.module_sites("m0")[0]
    old = bank.artifact("m0", f"{KEY}:{site}").clone()
    digest = bank.artifact("m0", DIGEST).clone()
    # a cached prototype is read back, not recomputed: a planted value survives a new router
    bank.set_artifact("m0", f"{KEY}:{site}", -old)
    ArrowRouter.from_bank(bank)
    assert torch.equal(bank.artifact("m0", f"{KEY}:{site}"), -old)
    # ... until the module's weights change
    perturb(bank, "m0", seed=5)
    ArrowRouter.from_bank(bank)
    assert not torch.equal(bank.artifact("m0", DIGEST), digest)
    new = bank.artifact("m0", f"{KEY}:{site}")
    v = torch.linalg.svd(bank.delta_weight("m0")[site].double())[2][0]
    assert abs(float(v @ new.double())) == pytest.approx(1.0, abs=1e-5)
    # a missing prototype is recomputed
    bank.delete_artifact("m1", f"{KEY}:{site}")
    ArrowRouter.from_bank(bank)
    assert f"{KEY}:{site}" in bank.artifacts("m1")


def test_a_bound_router_follows_in_place_weight_changes():
    bank = lora_bank("encoder", n=3)
    router = ArrowRouter.from_bank(bank, top_k=1)
    site = bank.module_sites("m0")[0]
    before = router._site[site][0].clone()
    with torch.no_grad():  # in place, as training does: the bank's version does not move
        for p in bank.module_parameters("m1").values():
            p.mul_(-2).add_(0.1)
    route_all(bank, router)
    assert not torch.equal(router._site[site][0], before)
    v = torch.linalg.svd(bank.delta_weight("m1")[site].double())[2][0]
    assert abs(float(v @ router._site[site][0][1].double())) == pytest.approx(1.0, abs=1e-5)


def test_router_state_round_trips_with_identical_routing(tmp_path):
    bank = lora_bank("encoder", n=4)
    router = ArrowRouter.from_bank(bank, modules=["m3", "m1", "m2"], top_k=2, temperature=0.7)
    out, seen = route_all(bank, router)
    router.save(tmp_path / "r")
    back = Router.load(tmp_path / "r")
    assert isinstance(back, ArrowRouter) and back.top_k == 2 and back.temperature == 0.7
    out2, seen2 = route_all(bank, back)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    for site in seen:
        assert torch.equal(seen[site].indices, seen2[site].indices)
        assert torch.equal(seen[site].weights, seen2[site].weights)
        assert set(seen[site].indices.unique().tolist()) <= {1, 2, 3}  # only the named modules
    # the bank saved and loaded keeps the prototypes (artifacts) and routes the same
    bank.save(tmp_path / "bank")
    bank2 = ModuleBank.load(tmp_path / "bank", make_backbone("encoder"))
    site = bank.module_sites("m0")[0]
    assert torch.equal(bank2.artifact("m1", f"{KEY}:{site}"), bank.artifact("m1", f"{KEY}:{site}"))
    out3, _ = route_all(bank2, Router.load(tmp_path / "r"))
    torch.testing.assert_close(out, out3, atol=1e-6, rtol=0)


def test_router_follows_a_removed_module_and_refuses_a_missing_one():
    bank = lora_bank("encoder", n=3)
    router = ArrowRouter.from_bank(bank, modules=["m1", "m2"], top_k=1)
    bank.remove("m0")  # ids shift down by one
    _, seen = route_all(bank, router)
    assert set(torch.cat([r.indices.flatten() for r in seen.values()]).tolist()) <= {0, 1}
    bank.remove("m2")
    with pytest.raises(MtpeftError, match="no longer holds"):
        route_all(bank, router)


def test_bad_arguments_are_refused_clearly():
    bank = lora_bank("encoder", n=1)
    with pytest.raises(MtpeftError, match="top_k"):
        ArrowRouter(["m0"], top_k=0)
    with pytest.raises(MtpeftError, match="temperature"):
        ArrowRouter(["m0"], temperature=0)
    with pytest.raises(MtpeftError, match="unknown Arrow option"):
        ArrowRouter.from_bank(bank, tau=2)
    bank.add("p", "prompt", {"n_tokens": 2})
    with pytest.raises(MtpeftError, match="weight delta"):
        ArrowRouter.from_bank(bank, modules=["m0", "p"])
    empty = ModuleBank(make_backbone("encoder"))
    with pytest.raises(MtpeftError, match="no module Arrow can route to"):
        ArrowRouter.from_bank(empty)
    assert ROUTERS.get("arrow") is ArrowRouter and ROUTERS.get("average") is AverageRouter


# ---- average of outputs -------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_average_router_is_the_mean_of_the_experts_outputs(family):
    bank = lora_bank(family, n=3)
    router = AverageRouter.from_bank(bank)
    ids, mask = batch()
    r = router.route(bank, RouteContext(attention_mask=mask))
    assert r.weights.shape == (3, 3) and torch.equal(r.indices, torch.arange(3).expand(3, -1))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(3))
    # the first site's input does not depend on the modules: there, the output is the mean of the experts'
    layer = bank.banked_layer(bank.module_sites("m0")[0])
    got = []
    hook = layer.register_forward_hook(lambda m, i, o: got.append(o))
    with torch.no_grad():
        bank(ids, mask, routing=router)
        for i in range(3):
            bank(ids, mask, routing=Routing.one_hot([i] * 3))
    hook.remove()
    avg, singles = got[0], torch.stack(got[1:])
    torch.testing.assert_close(avg, singles.mean(0), atol=1e-5, rtol=1e-5)
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # the experts differ: not a vacuous mean


def test_average_router_round_trips_and_follows_the_bank(tmp_path):
    bank = lora_bank("encoder", n=2)
    router = AverageRouter()  # every module, looked up at each bind
    ids, mask = batch()
    with torch.no_grad():
        a = bank(ids, mask, routing=router).output
    router.save(tmp_path / "r")
    back = Router.load(tmp_path / "r")
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, mask, routing=back).output, a, atol=0, rtol=0)
        bank.add("m2", "lora", {"r": 4}, seed=7)
        perturb(bank, "m2", seed=7)
    router.check_bank(bank)
    r = router.route(bank, RouteContext(attention_mask=mask))
    assert r.weights.shape == (3, 3) and float(r.weights[0, 0]) == pytest.approx(1 / 3)


# ---- a synthetic suite: each task solved by one expert, inputs of disjoint domains -----------------------
SUITE_TASKS, SUITE_BLOCK = 4, 24


def domain_inputs(task, n, seed):
    """``n`` sequences of 12 tokens from task ``task``'s own vocabulary block (disjoint between tasks)."""
    g = torch.Generator().manual_seed(seed)
    ids = 4 + task * SUITE_BLOCK + torch.randint(0, SUITE_BLOCK, (n, 12), generator=g)
    return ids, torch.ones_like(ids)


@pytest.fixture(scope="module")
def suite_bank():
    """A tiny encoder whose tasks are domains: each task's words cluster around a direction of their own (as a
    domain's words do in a real embedding space; the tiny model's random embeddings alone share one dominant
    direction, see docs/routing-arrow-merge.md). One LoRA per task is trained, alone, to map its task's inputs to
    a representation of that task's own."""
    bb = make_backbone("encoder", seed=0)
    emb = bb.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    std = float(emb.std())
    with torch.no_grad():
        for t in range(SUITE_TASKS):
            lo = 4 + t * SUITE_BLOCK
            emb[lo: lo + SUITE_BLOCK] = torch.randn(emb.shape[1], generator=g) * 3 * std + \
                torch.randn(SUITE_BLOCK, emb.shape[1], generator=g) * std
    targets = torch.randn(SUITE_TASKS, emb.shape[1], generator=g)
    bank = ModuleBank(bb)
    for t in range(SUITE_TASKS):
        name = f"task{t}"
        bank.add(name, "lora", {"r": 4}, seed=t)
        params = list(bank.module_parameters(name).values())
        opt = torch.optim.Adam(params, lr=1e-2)
        ids, mask = domain_inputs(t, 32, 100 + t)
        losses = []
        for _ in range(15):
            out = bank(ids, mask, routing=Routing.one_hot([t] * ids.shape[0])).output
            loss = ((out - targets[t]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0]  # the expert learned its task
        bank.freeze(name)
    return bank


@pytest.mark.parametrize("top_k", [1, 3])
def test_arrow_sends_held_out_inputs_of_a_task_to_its_expert(suite_bank, top_k):
    router = ArrowRouter.from_bank(suite_bank, top_k=top_k)
    for t in range(SUITE_TASKS):
        ids, mask = domain_inputs(t, 40, 999 + t)  # held out: sequences no expert saw
        _, seen = route_all(suite_bank, router, ids, mask)
        mass = torch.zeros(ids.shape[0], SUITE_TASKS)  # each example's mean routing weight per expert
        for r in seen.values():
            dense = torch.zeros(*r.weights.shape[:2], SUITE_TASKS).scatter_add_(-1, r.indices, r.weights)
            mass += dense.mean(1) / len(seen)
        sent = float((mass.argmax(-1) == t).float().mean())
        assert sent > 0.9, f"task {t}: {sent:.2f} of its inputs go to its expert"


def test_an_unbound_router_refuses_instead_of_routing_nothing():
    router = ArrowRouter(["m0"])
    with pytest.raises(MtpeftError, match="not bound"):
        router.at_site("encoder.layer.0.attention.self.query", torch.randn(1, 2, 32), RouteContext())
