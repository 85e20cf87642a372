"""Skills shared across tasks (Poly, MHR): the routing, the batched per-task mixing, MHR-z and MHR-mu, training,
saving with the bank and the CLI. Tiny random backbones throughout."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, make_backbone, perturb, synthetic_task

from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.routers import PolyRouter, Router
from mtpeft.routing import RouteContext, Routing
from mtpeft.skills import add_skills, add_task_row, average_skills, check_kind, load_skills, save_skills

TASKS = ["a", "b", "c"]


def skills_bank(n_skills=3, n_splits=1, shared=False, family="encoder", seed=0, mtype="lora"):
    """A tiny bank with ``n_skills`` perturbed skills (LoRA r=2 on query and value by default) and their router."""
    bank = ModuleBank(make_backbone(family))
    cfg = {"r": 2} if mtype == "lora" else {}
    r = add_skills(bank, "sk", n_skills, TASKS, mtype, cfg, n_splits=n_splits, shared_routing=shared)
    for i, n in enumerate(r.module_names):
        perturb(bank, n, seed=seed + i)
    bank.freeze()
    with torch.no_grad():  # logits far from their near-zero init: tasks get clearly different mixtures
        r.logits.copy_(torch.randn(r.logits.shape, generator=torch.Generator().manual_seed(7)) * 2)
    return bank, r.eval()


def out(bank, routing, ctx=None, B=3):
    ids, mask = batch(B=B)
    with torch.no_grad():
        return bank(ids, mask, routing=routing, ctx=ctx).output


def test_poly_with_one_skill_equals_a_plain_lora():
    bank, r = skills_bank(n_skills=1)
    ctx = RouteContext.for_tasks(["a", "b", "a"])
    plain = out(bank, Routing.one_hot([0, 0, 0]))
    torch.testing.assert_close(out(bank, r, ctx), plain, atol=1e-6, rtol=0)
    # and through the per-task kernel itself (the one-skill shortcut bypassed)
    _, stack = next(iter(bank.stacks_of("sk-0")))
    x = torch.randn(3, 5, stack.d_in)
    got = stack.per_task(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.tensor([0, 1, 0]))
    torch.testing.assert_close(got, stack.single(x, 0), atol=1e-5, rtol=1e-5)
    assert out(bank, r, ctx).sub(out(bank, None)).abs().max() > 1e-3  # the skill does act


def test_eval_weights_are_the_normalised_sigmoid_and_training_samples_relaxed_bernoulli():
    _, r = skills_bank(n_skills=4)
    site = r.sites[1]
    rows = torch.tensor([2, 0])
    z = r.logits.detach()[1][rows]  # [2, 1, 4]
    want = torch.sigmoid(z) / torch.sigmoid(z).sum(-1, keepdim=True)
    torch.testing.assert_close(r.weights(rows, site), want)
    r.train()
    torch.manual_seed(0)
    a, b = r.weights(rows, site), r.weights(rows, site)
    assert not torch.allclose(a, b) and not torch.allclose(a, want)  # sampled, not the sigmoid
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 1))
    # the Gumbel-sigmoid draw is RelaxedBernoulli(T=1): its sample mean matches torch's distribution's
    torch.manual_seed(1)
    u = torch.rand(20000, 4).clamp(1e-6, 1 - 1e-6)
    draws = torch.sigmoid(z[0] + torch.log(u) - torch.log1p(-u))
    ref = torch.distributions.RelaxedBernoulli(torch.tensor(1.0), logits=z[0].expand(20000, 4)).sample()
    torch.testing.assert_close(draws.mean(0), ref.mean(0), atol=0.02, rtol=0)


def test_routing_logits_init_and_per_layer_or_shared():
    bank = ModuleBank(make_backbone("encoder"))
    r = add_skills(bank, "sk", 5, TASKS, "lora", {"r": 2})
    assert r.logits.shape == (4, 3, 1, 5)  # query and value in 2 layers
    assert 0 < float(r.logits.detach().abs().max()) <= 1e-3
    bank2 = ModuleBank(make_backbone("encoder"))
    assert add_skills(bank2, "sk", 5, TASKS, "lora", {"r": 2}, shared_routing=True).logits.shape == (1, 3, 1, 5)


def test_different_layers_use_their_own_logits():
    bank, r = skills_bank(n_skills=3)
    ctx = RouteContext.for_tasks(["a", "b", "c"])
    before = out(bank, r, ctx)
    with torch.no_grad():
        r.logits[0] += 3.0 * torch.randn(r.logits[0].shape)  # only the first site's matrix
    after = out(bank, r, ctx)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize(("family", "mtype"), [("encoder", "lora"), ("causal", "lora"), ("encoder", "parallel")])
@pytest.mark.parametrize("n_splits", [1, 4])
def test_mixing_per_distinct_task_equals_mixing_per_example(n_splits, family, mtype):
    bank, r = skills_bank(n_skills=3, n_splits=n_splits, shared=True, family=family, mtype=mtype)
    task_of = ["c", "a", "c", "b", "a"]
    ctx = RouteContext.for_tasks(task_of)
    got = out(bank, r, ctx, B=5)
    w = r.weights(r.task_rows(ctx.task_names))  # [G, n, S]
    per_ex = w[ctx.task_ids]  # [B, n, S]: one row per example
    ids = r.module_ids()
    if n_splits == 1:  # the existing per-example parameter mix
        want = out(bank, Routing(per_ex[:, 0], ids.expand(5, -1), "params"), B=5)
    else:  # one row per example, rows = arange(B)
        want = out(bank, Routing(per_ex, ids.expand(5, n_splits, -1), "params", torch.arange(5)), B=5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # each example alone gives its row of the batch
    for i in (0, 3):
        one = out(bank, r, RouteContext.for_tasks([task_of[i]] * 5), B=5)
        torch.testing.assert_close(one[i], got[i], atol=1e-5, rtol=0)


def test_mhr_with_equal_mixtures_per_split_equals_poly_and_splits_act_on_blocks():
    bank, mhr = skills_bank(n_skills=3, n_splits=4, shared=True)
    poly = PolyRouter(mhr.module_names, TASKS, None, n_splits=1).eval()
    with torch.no_grad():
        poly.logits.copy_(mhr.logits[:, :, :1])
        mhr.logits.copy_(mhr.logits[:, :, :1].expand_as(mhr.logits))
    ctx = RouteContext.for_tasks(["a", "b", "c"])
    torch.testing.assert_close(out(bank, mhr, ctx), out(bank, poly, RouteContext.for_tasks(["a", "b", "c"])),
                               atol=1e-6, rtol=0)
    # the split kernel against a reference built block by block
    _, stack = next(iter(bank.stacks_of("sk-0")))
    g = torch.Generator().manual_seed(3)
    w = torch.rand(2, 4, 3, generator=g)
    idx = torch.arange(3).expand(2, 4, 3)
    x = torch.randn(3, 5, stack.d_in, generator=g)
    rows = torch.tensor([1, 0, 1])
    A = stack.stacked("lora_A")  # [S, r, d_in]
    B = stack.stacked("lora_B")  # [S, d_out, r]
    bi, bo = stack.d_in // 4, stack.d_out // 4
    want = []
    for e in range(3):
        t = int(rows[e])
        A_t = torch.cat([sum(w[t, j, s] * A[s][:, j * bi:(j + 1) * bi] for s in range(3)) for j in range(4)], 1)
        B_t = torch.cat([sum(w[t, j, s] * B[s][j * bo:(j + 1) * bo] for s in range(3)) for j in range(4)], 0)
        want.append(x[e] @ A_t.t() @ (stack.scale * B_t).t())
    torch.testing.assert_close(stack.per_task(x, idx, w, rows), torch.stack(want), atol=1e-5, rtol=0)


def test_splits_must_divide_the_widths_and_kinds_are_checked():
    bank = ModuleBank(make_backbone("encoder"))
    with pytest.raises(MtpeftError, match="splits do not divide"):
        add_skills(bank, "sk", 2, TASKS, "lora", {"r": 2}, n_splits=3)
    assert bank.names == []  # nothing left behind
    with pytest.raises(MtpeftError, match="--router mhr"):
        check_kind("poly", 4)
    with pytest.raises(MtpeftError, match="at least 2"):
        check_kind("mhr", 1)
    assert check_kind("mhr", None) == 4
    with pytest.raises(MtpeftError, match="cannot mix"):
        add_skills(ModuleBank(make_backbone("encoder")), "sk", 2, TASKS, "ia3", {})


def test_unknown_task_and_missing_task_ids_are_refused():
    bank, r = skills_bank()
    with pytest.raises(MtpeftError, match="no routing for task"):
        out(bank, r, RouteContext.for_tasks(["a", "zzz", "a"]))
    with pytest.raises(MtpeftError, match="task_ids"):
        out(bank, r, RouteContext())


def test_mhr_mu_average_is_the_skills_mean():
    bank, r = skills_bank(n_skills=3, n_splits=2)
    average_skills(bank, r, "mu", task="new")
    params = [bank.module_parameters(n) for n in r.module_names]
    for k, p in bank.module_parameters("mu").items():
        torch.testing.assert_close(p.detach(), sum(q[k] for q in params).detach() / 3)
        assert p.requires_grad
    assert bank.record("mu").type == "lora" and bank.record("mu").task == "new"


def test_mhr_z_adds_a_row_and_only_it_trains():
    bank, r = skills_bank(n_skills=3)
    old = r.logits.detach().clone()
    skills_before = {k: p.detach().clone() for k, p in bank.module_parameters("sk-0").items()}
    row = add_task_row(bank, r, "d")
    assert row == 3 and r.tasks == [*TASKS, "d"] and r.logits.shape[1] == 4
    opt = torch.optim.SGD([r.logits], lr=1.0)
    r.train()
    ids, mask = batch()
    bank(ids, mask, routing=r, ctx=RouteContext.for_tasks(["d", "a", "d"])).output.pow(2).sum().backward()
    opt.step()
    torch.testing.assert_close(r.logits.detach()[:, :3], old)  # the other tasks' rows did not move
    assert (r.logits.detach()[:, 3] - r.logits.detach()[:, 3].mean()).abs().sum() > 0
    assert all(not p.requires_grad for p in bank.module_parameters("sk-0").values())
    for k, p in bank.module_parameters("sk-0").items():
        torch.testing.assert_close(p.detach(), skills_before[k])


def test_router_saves_with_the_bank_and_routes_the_same_after_loading(tmp_path):
    from mtpeft.backbone import load_backbone

    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    r = add_skills(bank, "sk", 3, TASKS, "lora", {"r": 2}, n_splits=2)
    for i, n in enumerate(r.module_names):
        perturb(bank, n, seed=i)
    r.eval()
    bank.save(tmp_path / "bank")
    files = save_skills(r, tmp_path / "bank", "sk")
    assert (tmp_path / "bank" / "sk-routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(files[0].read_text())["config"]["tasks"] == TASKS
    back_bank = ModuleBank.load(tmp_path / "bank", load_backbone("tiny-bert", seed=0))
    back = load_skills(back_bank, tmp_path / "bank", "sk")
    torch.testing.assert_close(back.logits, r.logits)
    ctx = lambda: RouteContext.for_tasks(["b", "a", "c"])
    torch.testing.assert_close(out(back_bank, back, ctx()), out(bank, r, ctx()), atol=0, rtol=0)
    back_bank.remove("sk-1")
    with pytest.raises(MtpeftError, match="no longer holds"):
        out(back_bank, back, ctx())
    assert isinstance(Router.load(tmp_path / "bank" / "routers" / "sk"), PolyRouter)


def test_fit_skills_trains_skills_and_routing_with_their_own_learning_rates():
    from mtpeft.backbone import load_backbone
    from mtpeft.lightning import PhaseModule
    from mtpeft.scorer import make_scorer
    from mtpeft.skills import fit_skills
    from mtpeft.train import TrainConfig

    bb = load_backbone("tiny-bert", seed=0)
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    tasks = [synthetic_task("t1", seed=0), synthetic_task("t2", seed=1, labels=("warm", "cold"))]
    # the optimiser groups: skills at lr, routing logits at router_lr
    r0 = add_skills(bank, "probe", 2, ["t1", "t2"], "lora", {"r": 2})
    groups = PhaseModule(bank, scorer, tasks, r0, lr=1e-3, router_lr=0.1).param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("bank", 1e-3), ("router", 0.1)]
    assert groups[1]["params"] == [r0.logits]
    for n in r0.module_names:
        bank.remove(n)
    cfg = TrainConfig(lr=5e-2, batch_size=16, max_epochs=1, max_steps=3, patience=5, progress=False)
    router, m = fit_skills(bank, scorer, tasks, "mhr", 3, 2, "lora", {"r": 2}, cfg, router_lr=0.1, name="sk")
    assert m["steps"] == 3 and bank.names == ["sk-0", "sk-1", "sk-2"]
    assert float(router.logits.detach().abs().max()) > 1e-3  # moved off U(-1e-3, 1e-3) at lr 0.1
    assert not router.training and not router.logits.requires_grad
    assert all(not p.requires_grad for p in bank.parameters())
    assert any(float(p.abs().max()) > 0 for k, p in bank.module_parameters("sk-0").items() if "lora_B" in k)


def test_cli_trains_poly_skills_and_eval_routes_through_the_matrix(tmp_path, capsys):
    from test_cli import run_json, write_csv, write_jsonl

    a, b = write_csv(tmp_path / "a.csv"), write_jsonl(tmp_path / "b.jsonl")
    bank = tmp_path / "bank"
    got = run_json(capsys, "train", "--backbone", "tiny-bert", "--router", "poly", "--skills", 3, "--multitask",
                   "--task-file", f"ta={a}", "--task-file", f"tb={b}", "--option", "r=2", "--out", bank,
                   "--max-steps", 2, "--router-lr", 0.2)
    assert [r["task"] for r in got["results"]] == ["ta", "tb"]
    assert (bank / "skills-routing.png").is_file() and (bank / "routers" / "skills" / "router.json").is_file()
    ev = run_json(capsys, "eval", "--bank", bank, "--task-file", f"ta={a}", "--task-file", f"tb={b}")
    assert [(r["module"], r["accuracy"]) for r in ev["results"]] == \
        [("skills", r["accuracy"]) for r in got["results"]]
    named = run_json(capsys, "eval", "--bank", bank, "--task-file", f"ta={a}", "--router", "skills")
    assert named["results"][0]["accuracy"] == got["results"][0]["accuracy"]
    from test_cli import error_of

    assert "add --multitask" in error_of(capsys, "train", "--backbone", "tiny-bert", "--router", "mhr",
                                         "--task-file", f"ta={a}", "--out", tmp_path / "x")
    assert "--router" in error_of(capsys, "train", "--backbone", "tiny-bert", "--splits", 2, "--multitask",
                                  "--task-file", f"ta={a}", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- LoraHub -------------------------------------------------------------------------------------------------

def test_lorahub_optimiser_stays_in_bounds_and_finds_the_minimum():
    from mtpeft.skills.lorahub import optimise_weights

    calls = []

    def loss(w):
        calls.append(list(w))
        return sum((a - b) ** 2 for a, b in zip(w, [0.0, 1.0, -1.0]))

    w, obj = optimise_weights(loss, 3, budget=40, seed=0)
    assert len(calls) == 40 and calls[0] == [0.0] * 3  # the search starts at w = 0, as the reference
    assert max(abs(a - b) for a, b in zip(w, [0.0, 1.0, -1.0])) < 0.15, w
    assert obj == pytest.approx(loss(w) + 0.05 * sum(map(abs, w)) / 3)
    far = []  # a minimum far outside the box: every evaluation and the result stay in [-1.5, 1.5]
    w, _ = optimise_weights(lambda v: far.append(v) or sum((x - 3.0) ** 2 for x in v), 2, budget=40, seed=1)
    assert all(-1.5 <= x <= 1.5 for v in far for x in v) and min(w) > 1.3
    with pytest.raises(MtpeftError, match="budget"):
        optimise_weights(loss, 3, budget=0)


def lora_library(names=("n1", "good", "n2", "n3")):
    from mtpeft.backbone import load_backbone
    from mtpeft.scorer import make_scorer

    bb = load_backbone("tiny-bert", seed=0)
    bank = ModuleBank(bb)
    for i, n in enumerate(names):
        bank.add(n, "lora", {"r": 4}, seed=i)
        perturb(bank, n, std=1.0, seed=10 + i)
    bank.freeze()
    return bank, make_scorer(bb)


def test_lorahub_recovers_the_expert_that_solves_a_synthetic_task():
    """The synthetic task: reproduce one library expert's weight update. LoraHub's composition (A and B mixed
    separately, so Delta W = B'A' has cross terms) and search find that expert alone (up to the sign both
    factors can take), within the bounds, in 40 evaluations."""
    from mtpeft.skills.lorahub import optimise_weights

    names = ["n1", "good", "n2", "n3"]
    bank, _ = lora_library(names)
    params = [bank.module_parameters(n) for n in names]
    sites = sorted({k.rsplit(".", 1)[0] for k in params[0]})
    target = {s: params[1][s + ".lora_B"] @ params[1][s + ".lora_A"] for s in sites}
    norm = sum(float(t.pow(2).sum()) for t in target.values())

    @torch.no_grad()
    def loss(w):
        err = 0.0
        for s in sites:
            A = sum(wi * p[s + ".lora_A"] for wi, p in zip(w, params))
            B = sum(wi * p[s + ".lora_B"] for wi, p in zip(w, params))
            err += float((B @ A - target[s]).pow(2).sum())
        return err / norm

    w, _ = optimise_weights(loss, len(names), seed=0)
    assert abs(abs(w[1]) - 1.0) < 0.15 and max(abs(w[i]) for i in (0, 2, 3)) < 0.15, w
    assert all(-1.5 <= x <= 1.5 for x in w)


def test_lorahub_end_to_end_adds_the_composed_module():
    from mtpeft.skills.lorahub import few_shot_loss, lorahub

    bank, scorer = lora_library()
    task = synthetic_task("toy", n=32, seed=0)
    at_zero = few_shot_loss(bank, scorer, task, ["n1", "good", "n2", "n3"], max_examples=16)([0.0] * 4)
    res = lorahub(bank, scorer, task, max_examples=16, budget=12, seed=0)
    w = res["weights"]
    assert list(w) == ["n1", "good", "n2", "n3"] and all(-1.5 <= v <= 1.5 for v in w.values())
    assert res["objective"] <= at_zero  # the start (w = 0) is evaluated: the result is never worse
    rec = bank.record("toy-lorahub")
    assert rec.task == "toy" and rec.metadata["lorahub"] == {k: round(v, 6) for k, v in w.items()}
    # the composed module is the factors mixed apart: Delta W = (sum_i w_i s_i B_i)(sum_i w_i A_i), s = alpha / r
    mixed = bank.delta_weight("toy-lorahub")
    ps = {n: bank.module_parameters(n) for n in w}
    cfg = bank.record("n1").config
    scale = cfg["alpha"] / cfg["r"]
    for site, d in mixed.items():
        A = sum(v * ps[n][site + ".lora_A"] for n, v in w.items())
        B = sum(v * scale * ps[n][site + ".lora_B"] for n, v in w.items())
        torch.testing.assert_close(d.detach(), (B @ A).detach(), atol=1e-5, rtol=1e-5)
    assert len(mixed) == len({k.rsplit(".", 1)[0] for k in ps["n1"]})
    with pytest.raises(MtpeftError, match="already has a module"):
        lorahub(bank, scorer, task, ["n1", "good"], max_examples=4, budget=2)
    with pytest.raises(MtpeftError, match="one group"):
        bank.add("other", "lora", {"r": 2})
        lorahub(bank, scorer, task, ["n1", "other"], name="x", max_examples=4, budget=2)
