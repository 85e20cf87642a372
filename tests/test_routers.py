"""Routers as objects: the per-site call contract, the routing context, following the bank, save/load."""
import pytest
import torch
from conftest import batch, make_backbone, perturb

from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.routers import ROUTERS, FixedRouter, Router, TaskIdRouter, register_router
from mtpeft.routing import RouteContext, Routing

FAMILIES = ["encoder", "causal"]
QUERY = {"encoder": "query", "causal": "q_proj"}


def three_groups(family):
    """Two LoRA ranks and an (IA)3 at the same sites: three groups of stacks per site."""
    bank = ModuleBank(make_backbone(family))
    t = [QUERY[family]]
    specs = [("a", "lora", {"r": 2, "target_modules": t}), ("b", "lora", {"r": 4, "target_modules": t}),
             ("c", "ia3", {"target_modules": t}), ("d", "lora", {"r": 2, "target_modules": t})]
    for name, mtype, cfg in specs:
        bank.add(name, mtype, cfg, task=f"task-{name}")
        perturb(bank, name, seed=len(bank))
    bank.freeze()
    return bank


class Recorder(Router):
    """A per-site router that records its calls and routes every token to fixed weights."""

    per_site = True

    def __init__(self, weights):
        super().__init__()
        self.w = weights
        self.calls = []

    def at_site(self, site, x, ctx):
        self.calls.append((site, ctx))
        B, T = x.shape[:2]
        return Routing(self.w[None, None].expand(B, T, -1).contiguous())


@pytest.mark.parametrize("family", FAMILIES)
def test_per_site_router_called_once_per_site_across_groups(family):
    bank = three_groups(family)
    assert len({g.key for g in bank.groups.values()}) == 3
    w = torch.tensor([0.5, 0.3, 0.8, 0.2])
    r = Recorder(w)
    ids, mask = batch()
    with torch.no_grad():
        got = bank(ids, mask, routing=r).output
        want = bank(ids, mask, routing=Routing(w[None].expand(3, -1).contiguous())).output
    sites = bank.module_sites("a")
    assert [s for s, _ in r.calls] == sites  # exactly once per site, in forward order, not once per group
    assert len(sites) == 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_reaches_the_router_with_mask_and_task_ids(family):
    bank = three_groups(family)
    r = Recorder(torch.ones(4))
    ids, mask = batch()
    ctx = RouteContext.for_tasks(["x", "y", "x"], texts=["t0", "t1", "t2"])
    with torch.no_grad():
        bank(ids, mask, routing=r, ctx=ctx)
    seen = r.calls[0][1]
    assert seen is ctx
    assert torch.equal(seen.attention_mask, mask)
    assert seen.task_ids.tolist() == [0, 1, 0] and list(seen.task_names) == ["x", "y"]
    assert seen.texts == ["t0", "t1", "t2"]
    pooled = seen.pooled()
    with torch.no_grad():
        assert torch.equal(pooled, bank.pooled(ids, mask))  # the bare backbone's embedding
    assert seen.pooled() is pooled  # computed once per batch


@pytest.mark.parametrize("family", FAMILIES)
def test_a_router_can_say_nothing_at_a_site(family):
    bank = three_groups(family)
    first = bank.module_sites("a")[0]

    class OnlyFirst(Recorder):
        def at_site(self, site, x, ctx):
            return super().at_site(site, x, ctx) if site == first else None

    w = torch.tensor([1.0, 0.0, 0.0, 0.0])
    ids, mask = batch()
    with torch.no_grad():
        got = bank(ids, mask, routing=OnlyFirst(w)).output
        bare = bank(ids, mask).output
        full = bank(ids, mask, routing=Routing.one_hot([0, 0, 0])).output
    assert not torch.allclose(got, bare) and not torch.allclose(got, full)
    # a function returning None everywhere is the bare backbone
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, mask, routing=lambda site, x: None).output, bare)


@pytest.mark.parametrize("family", FAMILIES)
def test_task_id_router_equals_one_hot_and_follows_removal(family):
    bank = three_groups(family)
    ids, mask = batch()
    ctx = lambda: RouteContext.for_tasks(["task-b", "task-d", "task-a"])
    router = TaskIdRouter()
    with torch.no_grad():
        got = bank(ids, mask, routing=router, ctx=ctx()).output
        want = bank(ids, mask, routing=Routing.one_hot([1, 3, 0])).output
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    v = bank.version
    bank.remove("c")  # ids of d shift from 3 to 2
    assert bank.version > v
    with torch.no_grad():
        got = bank(ids, mask, routing=router, ctx=ctx()).output
        want = bank(ids, mask, routing=Routing.one_hot([1, 2, 0])).output
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    bank.remove("d")
    with pytest.raises(MtpeftError, match="no module in the bank was trained on task 'task-d'"):
        bank(ids, mask, routing=router, ctx=ctx())


def test_router_bound_to_removed_module_refuses_with_a_clear_message():
    bank = three_groups("encoder")
    fixed = FixedRouter({"a": 0.5, "d": 0.5})
    ids, mask = batch()
    with torch.no_grad():
        before = bank(ids, mask, routing=fixed).output
    bank.remove("b")  # unrelated: the router rebinds, same output
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, mask, routing=fixed).output, before, atol=1e-6, rtol=0)
    bank.remove("d")
    with pytest.raises(MtpeftError, match=r"module\(s\) \['d'\] that the bank no longer holds"):
        bank(ids, mask, routing=fixed)


def test_router_fitted_to_the_whole_bank_refuses_after_a_change():
    @register_router("_test_whole_bank")
    class WholeBank(Router):
        follows_names = False

        def route(self, bank, ctx):
            return Routing(torch.full((ctx.batch_size, len(bank)), 1.0 / len(bank)))

    bank = three_groups("encoder")
    r = WholeBank()
    ids, mask = batch()
    with torch.no_grad():
        bank(ids, mask, routing=r)
        bank.merge("a")  # same modules: still fine
        bank(ids, mask, routing=r)
    bank.remove("b")
    with pytest.raises(MtpeftError, match="refit the router"):
        bank(ids, mask, routing=r)


def test_fixed_router_params_mix_and_save_load(tmp_path):
    bank = three_groups("encoder")
    ids, mask = batch()
    r = FixedRouter({"a": 0.25, "d": 0.75}, mix="params")
    with torch.no_grad():
        got = bank(ids, mask, routing=r).output
        want = bank(ids, mask, routing=Routing(torch.tensor([[0.25, 0.75]] * 3), torch.tensor([[0, 3]] * 3),
                                               "params")).output
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    r.save(tmp_path / "r")
    back = Router.load(tmp_path / "r")
    assert isinstance(back, FixedRouter) and back.mix == "params"
    assert back.bound_names == bank.names
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, mask, routing=back).output, got, atol=0, rtol=0)
    (tmp_path / "r" / "router.json").write_text('{"format": "mtpeft-router", "name": "nope", "config": {}}')
    with pytest.raises(MtpeftError, match="unknown router 'nope'"):
        Router.load(tmp_path / "r")


def test_router_parameters_receive_gradients():
    @register_router("_test_learned")
    class Learned(Router):
        def __init__(self, n: int = 4):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(n))

        def route(self, bank, ctx):
            return Routing(self.logits.softmax(-1)[None].expand(ctx.batch_size, -1))

    bank = three_groups("encoder")
    r = Learned()
    ids, mask = batch()
    bank(ids, mask, routing=r).output.pow(2).sum().backward()
    assert r.logits.grad is not None and bool((r.logits.grad != 0).any())
    assert all(p.grad is None for p in bank.parameters())  # frozen bank, frozen backbone
    assert "_test_learned" in ROUTERS


def test_per_example_router_is_called_once_per_scope():
    bank = three_groups("causal")
    calls = []

    class Once(Router):
        def route(self, bank, ctx):
            calls.append(ctx.batch_size)
            return Routing.one_hot([0] * ctx.batch_size)

    ids, mask = batch()
    with torch.no_grad(), bank.route(Once()):
        first = bank(ids, mask, use_cache=True)
        bank(ids[:, :2], torch.ones(3, 1, 2, ids.shape[1] + 2), cache=first.cache)
    assert calls == [3]


def test_bad_router_outputs_are_refused():
    bank = three_groups("encoder")
    ids, mask = batch()

    class Wrong(Router):
        per_site = True

        def at_site(self, site, x, ctx):
            return Routing(torch.ones(x.shape[0] + 1, 4))

    with pytest.raises(MtpeftError, match="does not fit the input"):
        bank(ids, mask, routing=Wrong())
    with pytest.raises(MtpeftError, match="cannot route with a int"):
        bank(ids, mask, routing=3)
    with pytest.raises(MtpeftError, match="needs the task of each example"):
        bank(ids, mask, routing=TaskIdRouter())


def test_the_example_router_routes_each_input_to_its_nearest_centroid():
    """examples/custom_router.py: centroids kept as artifacts, the context's pooled embedding, one-hot routing."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "custom_router.py"
    spec = importlib.util.spec_from_file_location("custom_router_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bank = three_groups("encoder")
    ids, mask = batch()
    pooled = bank.pooled(ids, mask)
    # centroids: example 0 and 2 are nearest to module d's, example 1 to module a's
    bank.set_artifact("a", "centroid", pooled[1])
    bank.set_artifact("d", "centroid", (pooled[0] + pooled[2]) / 2)
    router = mod.NearestCentroid(["a", "d"])
    with torch.no_grad():
        got = bank(ids, mask, routing=router).output
        want = bank(ids, mask, routing=Routing.one_hot([3, 0, 3])).output
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    bank.remove("b")  # d's id shifts to 2: the router follows it by name
    with torch.no_grad():
        torch.testing.assert_close(bank(ids, mask, routing=router).output,
                                   bank(ids, mask, routing=Routing.one_hot([2, 0, 2])).output, atol=1e-6, rtol=0)
