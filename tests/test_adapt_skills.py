"""Few-shot transfer on a bank's skills (`mtpeft adapt --methods poly,mhr-z,mhr-mu`): the one-row router, the
routed module composed into one plain module, what each method trains (and what it leaves alone), the parameter
counts, the refusals, the CLI. Tiny random BERT, skills perturbed off their init rather than trained."""
import json

import pytest
import torch
from conftest import perturb, synthetic_task
from test_skills import out, skills_bank

from mtpeft.adapt import AdaptContext, Budget, get_method, run_adapt, sample_shots
from mtpeft.adapt.methods import mhr_mu
from mtpeft.cli import main
from mtpeft.errors import MtpeftError
from mtpeft.routing import RouteContext, Routing
from mtpeft.skills import add_skills, compose_task, save_skills, task_router

QUICK = Budget(steps=4, batch_size=8, lr=2e-2, router_lr=0.1)
SOURCES = ["src", "flip"]
METHODS = ["poly", "mhr-z", "mhr-mu"]


def make_skills(n_splits=2, n_skills=3):
    """A tiny-bert bank (with its scorer) holding ``n_skills`` perturbed LoRA skills (r 4) routed over SOURCES."""
    from mtpeft.api import new_bank

    bank, scorer = new_bank("tiny-bert")
    router = add_skills(bank, "sk", n_skills, SOURCES, "lora", {"r": 4}, n_splits=n_splits)
    for i, n in enumerate(router.module_names):
        perturb(bank, n, seed=i)
    bank.freeze()
    with torch.no_grad():  # far from the near-zero init: the source tasks get clearly different mixtures
        router.logits.copy_(torch.randn(router.logits.shape, generator=torch.Generator().manual_seed(7)) * 2)
    router.logits.requires_grad_(False)
    return bank, scorer, router.eval()


@pytest.fixture
def lib():
    return make_skills()


def params_of(bank, names):
    return {(n, k): p.detach().clone() for n in names for k, p in bank.module_parameters(n).items()}


def source_logits(bank, scorer, router, name):
    task = synthetic_task(name, n=16, seed=9)
    texts = task.splits["test"]["text"]
    with torch.no_grad(), bank.route(router, RouteContext.for_tasks([name] * len(texts))):
        return scorer.logits(bank, texts, task)


def context(bank, scorer, router, seed=0, k=4):
    few, _ = sample_shots(synthetic_task("target", n=64, seed=5), k, seed)
    return AdaptContext(bank, scorer, few, [], seed, QUICK, f"target.{seed}", skills=router)


def capture_task_router(monkeypatch):
    """Record the routers the methods build (``mtpeft.skills.task_router``)."""
    import mtpeft.skills as sk

    made = []
    real = sk.task_router

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(sk, "task_router", spy)
    return made


# ---- the building blocks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_splits, shared, mtype", [(1, False, "lora"), (2, False, "lora"), (4, True, "lora"),
                                                     (2, False, "parallel")])
def test_composed_task_module_equals_routing_the_task_through_the_skills(n_splits, shared, mtype):
    bank, r = skills_bank(n_skills=3, n_splits=n_splits, shared=shared, mtype=mtype)
    routed = out(bank, r, RouteContext.for_tasks(["b", "b", "b"]))
    compose_task(bank, r, "b", "baked", metadata={"note": 1})
    alone = out(bank, Routing.one_hot([bank.index("baked")] * 3))
    torch.testing.assert_close(alone, routed, atol=1e-5, rtol=1e-5)
    assert bank.record("baked").type == mtype and bank.record("baked").task == "b"
    assert bank.record("baked").metadata == {"composed_from": r.module_names, "note": 1}
    other = out(bank, r, RouteContext.for_tasks(["c", "c", "c"]))  # another task's mixture is another module
    assert (other - alone).abs().max() > 1e-3


def test_task_router_is_one_fresh_row_and_leaves_the_router_alone(lib):
    _, _, r = lib
    before = r.logits.detach().clone()
    new = task_router(r, "target", seed=3)
    L, _, n, S = r.logits.shape
    assert new.logits.shape == (L, 1, n, S) and new.tasks == ["target"] and new.module_names == r.module_names
    assert 0 < float(new.logits.detach().abs().max()) <= 1e-3 and new.logits.requires_grad  # U(-1e-3, 1e-3)
    assert torch.equal(task_router(r, "target", seed=3).logits, new.logits)  # seeded
    assert torch.equal(r.logits, before) and r.tasks == SOURCES
    with pytest.raises(MtpeftError, match="one module per skill"):
        task_router(r, "target", ["sk-0"])


# ---- what each method trains ------------------------------------------------------------------------------
def test_mhr_z_trains_the_row_only_and_leaves_the_skills_bit_identical(lib, monkeypatch):
    bank, scorer, r = lib
    made = capture_task_router(monkeypatch)
    skills = params_of(bank, r.module_names)
    src = {t: source_logits(bank, scorer, r, t) for t in SOURCES}
    ctx = context(bank, scorer, r)
    res = get_method("mhr-z").run(ctx)
    (row,) = made
    init = task_router(r, "target", seed=ctx.seed).logits.detach()
    changed_row = int((row.logits.detach() != init).sum())
    changed_skills = sum(int((p.detach() != skills[(n, k)]).sum()) for n in r.module_names
                         for k, p in bank.module_parameters(n).items())
    L, _, n, S = r.logits.shape
    assert changed_skills == 0 and changed_row == res.trainable == L * n * S == 4 * 2 * 3
    assert bank.names == [*r.module_names, ctx.module_name] and bank.record(ctx.module_name).metadata["adapt"] == "mhr-z"
    # the added module is what the trained row routes the task to
    mine = out(bank, Routing.one_hot([bank.index(ctx.module_name)] * 3))
    torch.testing.assert_close(mine, out(bank, row.eval(), RouteContext.for_tasks(["target"] * 3)), atol=1e-5, rtol=1e-5)
    for t in SOURCES:  # the source tasks get what they got
        assert torch.equal(source_logits(bank, scorer, r, t), src[t])


def test_poly_trains_copies_of_the_skills_with_the_row(lib, monkeypatch):
    bank, scorer, r = lib
    made = capture_task_router(monkeypatch)
    skills = params_of(bank, r.module_names)
    src = {t: source_logits(bank, scorer, r, t) for t in SOURCES}
    ctx = context(bank, scorer, r)
    res = get_method("poly").run(ctx)
    (row,) = made
    assert row.module_names == [f"{ctx.module_name}.skill{i}" for i in range(3)]  # copies, dropped after
    assert bank.names == [*r.module_names, ctx.module_name]
    per_skill = sum(p.numel() for p in bank.module_parameters("sk-0").values())
    assert res.trainable == row.logits.numel() + 3 * per_skill == 24 + 3 * 1024
    assert all(torch.equal(p, skills[(n, k)]) for n in r.module_names for k, p in bank.module_parameters(n).items())
    for t in SOURCES:
        assert torch.equal(source_logits(bank, scorer, r, t), src[t])
    # the skills trained too: the row over the bank's (untrained) skills gives another module
    orig = task_router(r, "target")
    with torch.no_grad():
        orig.logits.copy_(row.logits)
    compose_task(bank, orig, "target", "row-only")
    ids = [bank.index(ctx.module_name), bank.index("row-only")]
    assert (out(bank, Routing.one_hot([ids[0]] * 3)) - out(bank, Routing.one_hot([ids[1]] * 3))).abs().max() > 1e-4


def test_mhr_mu_starts_from_the_skills_mean_and_fine_tunes_it(lib, monkeypatch):
    bank, scorer, r = lib
    start = {}
    real = mhr_mu.fit_module

    def spy(ctx, name, **kw):
        start.update({k: p.detach().clone() for k, p in ctx.bank.module_parameters(name).items()})
        return real(ctx, name, **kw)

    monkeypatch.setattr(mhr_mu, "fit_module", spy)
    skills = params_of(bank, r.module_names)
    ctx = context(bank, scorer, r)
    res = get_method("mhr-mu").run(ctx)
    for k, p in start.items():
        torch.testing.assert_close(p, sum(skills[(n, k)] for n in r.module_names) / 3, atol=1e-7, rtol=0)
    trained = bank.module_parameters(ctx.module_name)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # then fine-tuned
    assert res.trainable == sum(p.numel() for p in trained.values()) == 1024
    assert all(torch.equal(p, skills[(n, k)]) for n in r.module_names for k, p in bank.module_parameters(n).items())


# ---- the run loop and the CLI -----------------------------------------------------------------------------
def test_run_adapt_runs_the_skills_methods_and_leaves_the_bank_as_it_was(lib, tmp_path):
    bank, scorer, r = lib
    before = params_of(bank, bank.names)
    logits = r.logits.detach().clone()
    target = synthetic_task("target", n=64, seed=5)
    rep = run_adapt(bank, scorer, target, [2, 4], [*METHODS, "scratch"], [0, 1], QUICK, skills=r, out=tmp_path)
    assert rep["complete"] and rep["experts"] == [] and bank.names == r.module_names
    assert all(torch.equal(p, before[(n, k)]) for n in bank.names for k, p in bank.module_parameters(n).items())
    assert torch.equal(r.logits, logits) and r.tasks == SOURCES
    trainable = {x["method"]: x["trainable"] for x in rep["summary"]}
    assert trainable == {"poly": 24 + 3 * 1024, "mhr-z": 24, "mhr-mu": 1024, "scratch": 2048}
    assert {(x["method"], x["shots"], x["n"]) for x in rep["summary"]} == {
        (m, k, 2) for m in [*METHODS, "scratch"] for k in (2, 4)}
    assert rep["key"]["skills"] == r.module_names and rep["key"]["budget"]["router_lr"] == 0.1
    w = next(x for x in rep["runs"] if x["method"] == "mhr-z")["info"]["skill_weights"]
    assert len(w) == 3 and abs(sum(w) - 1) < 1e-3
    # resumes; changing the skills' learning rate is another run
    again = run_adapt(bank, scorer, target, [2, 4], [*METHODS, "scratch"], [0, 1], QUICK, skills=r, out=tmp_path)
    assert again["runs"] == rep["runs"]
    with pytest.raises(MtpeftError, match="other settings"):
        run_adapt(bank, scorer, target, [2], ["mhr-z"], [0], Budget(steps=4, batch_size=8, lr=2e-2, router_lr=0.5),
                  skills=r, out=tmp_path)


def test_a_report_without_skills_methods_keys_as_before(tmp_path):
    from mtpeft.adapt.run import _key

    task = synthetic_task("t", n=8)
    key = _key(task, ["e"], ["scratch"], [2], [0], Budget(), None)
    assert "router_lr" not in key["budget"] and "skills" not in key  # adapt reports written before still resume


def test_skills_methods_refuse_a_bank_without_skills_naming_the_fix(lib):
    from mtpeft.api import new_bank

    bare, scorer = new_bank("tiny-bert")
    bare.add("e", "lora", {"r": 4}, task="other")
    target = synthetic_task("target", n=16, seed=5)
    for m in METHODS:
        with pytest.raises(MtpeftError, match=r"has none; train a skill inventory .*`mtpeft train --router poly\|mhr "
                                              r"--skills N --multitask"):
            run_adapt(bare, scorer, target, [2], [m], [0], QUICK)
    bank, scorer, r = lib
    with pytest.raises(MtpeftError, match="load_skills"):  # skills in the bank, but no routing given
        run_adapt(bank, scorer, target, [2], ["mhr-z"], [0], QUICK)
    with pytest.raises(MtpeftError, match="trained on the target task 'src'"):
        run_adapt(bank, scorer, synthetic_task("src", n=16), [2], ["poly"], [0], QUICK, skills=r)
    with pytest.raises(MtpeftError, match="router_lr must be > 0"):
        Budget(router_lr=0.0)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    o, e = capsys.readouterr()
    return rc, o, e


def test_cli_adapts_a_saved_skills_bank(capsys, tmp_path):
    from conftest import task_csv

    from mtpeft.bank import read_manifest

    bank, _, r = make_skills()
    path = tmp_path / "bank"
    bank.save(path)
    save_skills(r, path, "sk", heatmap=False)
    target = task_csv(tmp_path / "target.csv", synthetic_task("target", n=64, seed=5))
    manifest = (path / "manifest.json").read_bytes()
    routing = {f.name: f.read_bytes() for f in (path / "routers" / "sk").iterdir()}
    rc, o, e = run(capsys, "adapt", "--bank", path, "--task-file", f"target={target}", "--shots", "2", "--methods",
                   ",".join(METHODS), "--max-steps", "2", "--router-lr", "0.05", "--json")
    assert rc == 0, e
    rep = json.loads(o)
    assert {x["method"]: x["trainable"] for x in rep["summary"]} == {"poly": 24 + 3 * 1024, "mhr-z": 24, "mhr-mu": 1024}
    assert rep["budget"]["router_lr"] == 0.05 and all(x["info"]["steps"] <= 2 for x in rep["runs"])
    assert (path / "manifest.json").read_bytes() == manifest
    rc, o, e = run(capsys, "adapt", "--bank", path, "--task-file", f"target={target}", "--shots", "2", "--methods",
                   "mhr-z", "--max-steps", "2", "--keep", "--skills-name", "sk", "--json")
    assert rc == 0, e
    kept = {m["name"]: m for m in read_manifest(path)["modules"]}["target.adapt.k2.s0.mhr-z"]
    assert kept["task"] == "target" and kept["type"] == "lora" and kept["metadata"]["adapt"] == "mhr-z"
    assert {f.name: f.read_bytes() for f in (path / "routers" / "sk").iterdir()} == routing  # the stored routing
    rc, _, e = run(capsys, "adapt", "--bank", path, "--task-file", f"target={target}", "--shots", "2", "--methods",
                   "mhr-z", "--skills-name", "nope")
    assert rc == 2 and "no skills router 'nope'" in e


def test_cli_refuses_a_bank_without_skills(capsys, tmp_path):
    from conftest import task_csv

    from mtpeft.api import new_bank

    bank, _ = new_bank("tiny-bert")
    bank.add("e", "lora", {"r": 4}, task="other")
    bank.save(tmp_path / "bank")
    target = task_csv(tmp_path / "target.csv", synthetic_task("target", n=16, seed=5))
    rc, _, e = run(capsys, "adapt", "--bank", tmp_path / "bank", "--task-file", f"target={target}", "--shots", "2",
                   "--methods", "scratch,mhr-mu")
    assert rc == 2 and "mtpeft train --router poly|mhr --skills N --multitask" in e
