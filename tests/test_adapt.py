"""Few-shot transfer (`mtpeft adapt`): shot sampling, Fisher embeddings and similarity, LoraHub's search and
composition, pi-Tuning's interpolation, the run loop (resume, plug-in methods) and the CLI, on tiny models."""
import json

import numpy as np
import pytest
import torch
from conftest import perturb, synthetic_task, task_csv

from mtpeft.adapt import Budget, fisher_embedding, run_adapt, sample_shots, similarity_matrix, store_fisher
from mtpeft.adapt.fisher import ARTIFACT, fisher_sizes
from mtpeft.adapt.methods import AdaptMethod, AdaptResult, method_names, register_method
from mtpeft.adapt.shots import check_shots, shot_indices
from mtpeft.cli import main
from mtpeft.errors import MtpeftError
from mtpeft.routing import Routing
from mtpeft.skills.lorahub import few_shot_loss, optimise_weights

QUICK = Budget(steps=4, batch_size=8, lorahub_evals=6, interp_steps=2, probe_steps=2, fisher_batches=2, lr=2e-2)


@pytest.fixture(scope="module")
def library():
    """A tiny-bert bank with a solver of the synthetic task, an expert of its flipped labels and a noise expert."""
    from mtpeft.api import new_bank
    from mtpeft.train import TrainConfig, fit_expert

    bank, scorer = new_bank("tiny-bert")
    cfg = TrainConfig(lr=3e-2, batch_size=16, max_epochs=100, max_steps=60, patience=100, progress=False)
    src, flip = synthetic_task("src", n=64, seed=1), synthetic_task("flip", n=64, seed=2, labels=("blue", "red"))
    fit_expert(bank, scorer, src, "solver", "lora", {"r": 4}, cfg)
    fit_expert(bank, scorer, flip, "flipped", "lora", {"r": 4}, cfg)
    bank.add("noise", "lora", {"r": 4}, task="noise", seed=3)
    perturb(bank, "noise", std=0.5, seed=3)
    bank.freeze()
    tasks = {"src": src, "flip": flip, "noise": synthetic_task("noise", n=32, seed=4)}
    return bank, scorer, tasks


def logits_of(bank, scorer, task, routing):
    with torch.no_grad():
        return scorer.logits(bank, task.splits["test"]["text"], task, routing)


# ---- shots -------------------------------------------------------------------------------------------
def test_shots_k_per_class_seeded_and_short_classes_get_all():
    labels = np.array([0] * 20 + [1] * 7 + [2] * 3)
    idx, info = shot_indices(labels, 3, 5, seed=0)
    assert np.bincount(labels[idx], minlength=3).tolist() == [5, 5, 3]
    assert info["short"] == {2: 3} and info["per_class"] == [5, 5, 3]
    again, _ = shot_indices(labels, 3, 5, seed=0)
    other, _ = shot_indices(labels, 3, 5, seed=1)
    assert idx.tolist() == again.tolist() and idx.tolist() != other.tolist()


def test_sample_shots_trains_and_validates_on_the_shots_and_tests_on_everything():
    task = synthetic_task("t", n=40)
    few, info = sample_shots(task, 4, seed=3)
    assert len(few.splits["train"]) == 8 and few.splits["validation"]["text"] == few.splits["train"]["text"]
    assert few.splits["test"]["text"] == task.splits["test"]["text"]
    assert sorted(few.splits["train"]["label"]) == [0] * 4 + [1] * 4 and info["short"] == {}
    _, info = sample_shots(task, 30, seed=3)  # 20 per class in the train split
    assert info["short"] == {"red": 20, "blue": 20}


@pytest.mark.parametrize("bad, message", [(0, "not a positive integer"), ("16,-1", "not a positive integer"),
                                          ("16,x", "must be integers"), ("16,16", "given twice"), ("", "empty item")])
def test_bad_shots_are_refused(bad, message):
    with pytest.raises(MtpeftError, match=message):
        check_shots(bad if isinstance(bad, str) else [bad])


# ---- Fisher embeddings and similarity ---------------------------------------------------------------
def test_fisher_embedding_is_non_negative_sized_and_leaves_the_module_frozen(library):
    bank, scorer, tasks = library
    emb = fisher_embedding(bank, scorer, tasks["src"], "solver", batch_size=8, max_batches=3)
    assert emb.shape == (sum(fisher_sizes(bank, "solver")),) and bool((emb >= 0).all()) and float(emb.sum()) > 0
    assert not any(p.requires_grad for p in bank.module_parameters("solver").values())
    again = fisher_embedding(bank, scorer, tasks["src"], "solver", batch_size=8, max_batches=3)
    torch.testing.assert_close(emb, again)  # no dropout, same batches: the same embedding


def test_probe_fisher_is_a_property_of_the_task_not_of_the_expert(library):
    """Every task's embedding comes from one probe initialisation: two experts of one configuration give the same
    embedding of a task (their own weights do not enter), two tasks give different ones, and the bank is left as it
    was (no probe, the same trainability)."""
    from mtpeft.adapt import probe_fisher

    bank, scorer, tasks = library
    names = list(bank.names)
    kw = {"steps": 3, "lr": 1e-2, "batch_size": 8, "max_batches": 2, "seed": 0}
    via_solver = probe_fisher(bank, scorer, tasks["src"], "solver", **kw)
    via_noise = probe_fisher(bank, scorer, tasks["src"], "noise", **kw)
    torch.testing.assert_close(via_solver, via_noise)
    other = probe_fisher(bank, scorer, tasks["flip"], "solver", **kw)
    assert via_solver.shape == other.shape == (sum(fisher_sizes(bank, "solver")),) and bool((other >= 0).all())
    assert not torch.allclose(via_solver, other)
    assert bank.names == names and not any(p.requires_grad for n in names for p in bank.module_parameters(n).values())
    bank.add("fisher-probe", "lora", {"r": 4})
    try:
        with pytest.raises(MtpeftError, match="the name the Fisher probe takes"):
            probe_fisher(bank, scorer, tasks["src"], "solver", **kw)
    finally:
        bank.remove("fisher-probe")


def test_similarity_matrix_is_symmetric_with_ones_on_the_diagonal():
    g = torch.Generator().manual_seed(0)
    E = torch.rand(5, 12, generator=g)
    E[3] = 0.0  # an all-zero embedding still matches itself
    S = similarity_matrix(E, [4, 8])
    torch.testing.assert_close(S, S.T)
    assert torch.equal(S.diagonal(), torch.ones(5)) and bool((S <= 1 + 1e-6).all())
    assert bool((S >= 0).all())
    # each tensor's part is normalised on its own: scaling one part of one task changes nothing
    E2 = E.clone()
    E2[1, :4] *= 1000.0
    torch.testing.assert_close(similarity_matrix(E2, [4, 8]), S)
    assert not torch.allclose(similarity_matrix(E2), similarity_matrix(E))  # one part: the big entries dominate
    # the reference's (Task2Vec's) normalisation, by hand for one pair and one part: cos(a / (a + b), b / (a + b))
    a, b = E[0, 4:] / E[0, 4:].mean(), E[2, 4:] / E[2, 4:].mean()
    want = torch.nn.functional.cosine_similarity(a / (a + b), b / (a + b), dim=0)
    torch.testing.assert_close(similarity_matrix(E[:, 4:])[0, 2], want)
    # every parameter counts alike: one huge shared entry does not make two tasks alike (a plain cosine would)
    x, y = torch.rand(2, 50, generator=g)
    x[0] = y[0] = 1e6
    assert float(similarity_matrix(torch.stack([x, y]))[0, 1]) < 0.9
    assert float(torch.nn.functional.cosine_similarity(x, y, dim=0)) > 0.99
    with pytest.raises(MtpeftError, match="sum to"):
        similarity_matrix(E, [4, 4])


# ---- interpolation (pi-Tuning) and composition (LoraHub) --------------------------------------------
def test_interpolating_one_expert_equals_that_expert(library):
    from mtpeft.adapt.methods.pi_tuning import interpolate
    from mtpeft.routers import InterpolationRouter

    bank, scorer, tasks = library
    task = tasks["src"]
    want = logits_of(bank, scorer, task, Routing.one_hot([bank.index("solver")] * 16))
    interpolate(bank, ["solver"], [1.0], "one")
    try:
        got = logits_of(bank, scorer, task, Routing.one_hot([bank.index("one")] * 16))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for s, d in bank.delta_weight("one").items():
            torch.testing.assert_close(d, bank.delta_weight("solver")[s], atol=1e-6, rtol=1e-5)
    finally:
        bank.remove("one")
    router = InterpolationRouter(["solver"])
    with torch.no_grad():
        via_router = scorer.logits(bank, task.splits["test"]["text"], task, router)
    torch.testing.assert_close(via_router, want, atol=1e-5, rtol=1e-5)


def test_pi_tuning_interpolates_weight_deltas_not_factors(library):
    """The interpolation router mixes the experts' outputs (sum_i w_i B_i A_i x) by default: no cross terms
    B_i A_j between experts that started from different initialisations; the composed module is the SVD of the
    weighted delta at the experts' rank."""
    from mtpeft.adapt.methods.pi_tuning import interpolate
    from mtpeft.routers import InterpolationRouter

    bank, scorer, tasks = library
    task, names = tasks["src"], ["solver", "noise"]
    router = InterpolationRouter(names)
    with torch.no_grad():
        router.logits.copy_(torch.tensor([0.4, -0.3]))
        w = router.weights()
        got = scorer.logits(bank, task.splits["test"]["text"], task, router)
    ids = bank.ids(names)[None].expand(16, -1)
    torch.testing.assert_close(got, logits_of(bank, scorer, task, Routing(w[None].expand(16, -1), ids, "output")))
    assert not torch.allclose(got, logits_of(bank, scorer, task, Routing(w[None].expand(16, -1), ids, "params")),
                              atol=1e-4)
    rep = interpolate(bank, names, w.tolist(), "interp")
    try:
        assert rep["rank"] == 4 and 0 <= rep["relative_error"] < 1
        for s, d in bank.delta_weight("interp").items():
            want = sum(float(wi) * bank.delta_weight(n)[s] for wi, n in zip(w, names))
            U, S, Vh = torch.linalg.svd(want.double(), full_matrices=False)
            torch.testing.assert_close(d.double(), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)
    finally:
        bank.remove("interp")
    with pytest.raises(MtpeftError, match="mix must be one of"):
        InterpolationRouter(names, mix="sum")


def test_composed_factors_match_parameter_mixing_and_differ_from_a_delta_merge(library):
    from mtpeft.merge import compose_factors

    bank, scorer, tasks = library
    task, names, w = tasks["src"], ["solver", "flipped", "noise"], [0.7, -0.4, 0.2]
    ids = bank.ids(names)
    mixed = logits_of(bank, scorer, task, Routing(torch.tensor(w)[None].expand(16, -1), ids[None].expand(16, -1),
                                                  "params"))
    compose_factors(bank, names, w, "mix")
    try:
        got = logits_of(bank, scorer, task, Routing.one_hot([bank.index("mix")] * 16))
        torch.testing.assert_close(got, mixed, atol=1e-5, rtol=1e-4)
        site = next(iter(bank.delta_weight("mix")))
        delta_sum = sum(wi * bank.delta_weight(n)[site] for wi, n in zip(w, names))
        assert not torch.allclose(bank.delta_weight("mix")[site], delta_sum, atol=1e-6)  # the cross terms
    finally:
        bank.remove("mix")


def test_lorahub_finds_the_solver_among_real_experts(library):
    bank, scorer, _ = library
    few, _ = sample_shots(synthetic_task("target", n=64, seed=5), 8, seed=0)
    names = ["solver", "flipped", "noise"]
    loss = few_shot_loss(bank, scorer, few, names)
    zero = loss([0.0] * 3)
    w, v = optimise_weights(loss, 3, budget=40, seed=0)
    w = np.asarray(w)
    assert names[int(np.abs(w).argmax())] == "solver" and v < zero and bool((np.abs(w) <= 1.5).all())


# ---- the run loop ------------------------------------------------------------------------------------
@register_method("test-constant")
class _Constant(AdaptMethod):
    """A plug-in method defined outside the package: a copy of the first expert, untrained."""

    def run(self, ctx):
        tensors = {k: p.detach().clone() for k, p in ctx.bank.module_parameters(ctx.experts[0]).items()}
        ctx.bank.add_from(ctx.module_name, ctx.expert_type, ctx.expert_config, tensors, task=ctx.task.name)
        return AdaptResult(ctx.module_name, 0, {"copied": ctx.experts[0]})


def test_run_adapt_all_methods_report_and_bank_left_as_it_was(library, tmp_path):
    bank, scorer, tasks = library
    before = list(bank.names)
    weights = {n: {k: p.detach().clone() for k, p in bank.module_parameters(n).items()} for n in before}
    target = synthetic_task("target", n=64, seed=5)
    methods = ["scratch", "best-source", "lorahub", "pi-tuning", "test-constant"]
    rep = run_adapt(bank, scorer, target, [2, 4], methods, [0, 1], QUICK, source_tasks=tasks, out=tmp_path)
    assert bank.names == before and rep["complete"]
    for n in before:  # pi-tuning trains copies of the experts, best-source a copy: the experts are as they were
        for k, p in bank.module_parameters(n).items():
            assert torch.equal(p, weights[n][k]), (n, k)
    assert rep["runs"][3]["info"]["joint"] and rep["runs"][3]["info"]["interp_steps"] == 2
    assert {(r["method"], r["shots"]) for r in rep["summary"]} == {(m, k) for m in methods for k in (2, 4)}
    assert all(r["n"] == 2 for r in rep["summary"])
    by = {(r["method"], r["shots"], r["seed"]): r for r in rep["runs"]}
    assert by[("lorahub", 2, 0)]["trainable"] == 3 and by[("scratch", 2, 0)]["trainable"] == by[("pi-tuning", 2, 0)][
        "trainable"] - 3
    assert all(abs(x) <= 1.5 for x in by[("lorahub", 4, 1)]["info"]["weights"].values())
    assert len(by[("pi-tuning", 2, 0)]["info"]["experts"]) == 3  # top-k of the three experts
    const = by[("test-constant", 2, 0)]["accuracy"]  # an untrained copy of the solver scores as the solver does
    from mtpeft.train import evaluate

    assert const == evaluate(bank, scorer, target, "solver")["accuracy"]
    sim = rep["similarity"]["k2-seed0"]
    S = torch.tensor(sim["matrix"])
    torch.testing.assert_close(S, S.T)
    torch.testing.assert_close(S.diagonal(), torch.ones(4))
    assert (tmp_path / "similarity-k2-seed0.png").stat().st_size > 1000 and sim["plot"] == "similarity-k2-seed0.png"
    saved = json.loads((tmp_path / "adapt-report.json").read_text())
    assert saved["runs"] == rep["runs"]
    # a second run resumes: nothing is trained again, a new seed is added
    again = run_adapt(bank, scorer, target, [2, 4], methods, [0, 1, 2], QUICK, source_tasks=tasks, out=tmp_path)
    assert again["runs"][: len(rep["runs"])] == rep["runs"] and len(again["runs"]) == len(rep["runs"]) * 3 // 2
    with pytest.raises(MtpeftError, match="other settings"):
        run_adapt(bank, scorer, target, [2], ["scratch"], [0], Budget(steps=5), source_tasks=tasks, out=tmp_path)


def test_method_registry_lists_the_methods_and_refuses_unknown_ones(library):
    assert {"scratch", "best-source", "lorahub", "pi-tuning"} <= set(method_names())
    bank, scorer, tasks = library
    with pytest.raises(MtpeftError, match="unknown adapt method 'nope'"):
        run_adapt(bank, scorer, tasks["src"], [2], ["scratch", "nope"], [0], QUICK)


def test_experts_of_the_target_task_are_left_out(library):
    from mtpeft.adapt import source_experts

    bank, _, _ = library
    assert source_experts(bank, "src") == ["flipped", "noise"]
    with pytest.raises(MtpeftError, match="trained on the target task"):
        source_experts(bank, "src", ["solver"])


# ---- the CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_library(library, tmp_path_factory):
    bank, _, tasks = library
    d = tmp_path_factory.mktemp("lib")
    for n in bank.names:  # stored by earlier tests in memory: the saved bank starts without
        bank.delete_artifact(n, ARTIFACT)
    bank.save(d / "bank")
    files = {n: task_csv(d / f"{n}.csv", t) for n, t in tasks.items()}
    files["target"] = task_csv(d / "target.csv", synthetic_task("target", n=64, seed=5))
    return d / "bank", files


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_embed_then_adapt_json(capsys, saved_library, tmp_path):
    path, files = saved_library
    manifest = (path / "manifest.json").read_bytes()
    rc, out, err = run(capsys, "embed", "--bank", path, "--task-file", f"src={files['src']}", "--task-file",
                       f"flip={files['flip']}", "--task-file", f"noise={files['noise']}", "--batches", "2", "--json")
    assert rc == 0, err
    assert {r["module"]: r["status"] for r in json.loads(out)["results"]} == {
        "solver": "stored", "flipped": "stored", "noise": "stored"}
    from mtpeft.bank import read_manifest

    assert all(m.get("artifacts") for m in read_manifest(path)["modules"])  # each module's artifacts file
    after_embed = (path / "manifest.json").read_bytes()
    assert after_embed != manifest
    rc, out, err = run(capsys, "adapt", "--bank", path, "--task-file", f"target={files['target']}", "--shots", "2,3",
                       "--seeds", "0,1", "--methods", "scratch,lorahub,pi-tuning,best-source", "--max-steps", "3",
                       "--lorahub-evals", "5", "--json", "--out", tmp_path / "out")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["fisher_computed"] == []  # read from the bank, stored by embed
    assert {(r["method"], r["shots"], r["n"]) for r in rep["summary"]} == {
        (m, k, 2) for m in ("scratch", "lorahub", "pi-tuning", "best-source") for k in (2, 3)}
    assert all(r["info"].get("steps", 3) <= 3 for r in rep["runs"])
    assert (tmp_path / "out" / "adapt-report.json").exists() and (path / "manifest.json").read_bytes() == after_embed
    rc, out, err = run(capsys, "adapt", "--bank", path, "--task-file", f"target={files['target']}", "--shots", "2",
                       "--methods", "scratch", "--max-steps", "2")
    assert rc == 0 and "scratch" in out and "zero-shot" in out and "2 shots" in out
    rc, out, err = run(capsys, "adapt", "--bank", path, "--task-file", f"target={files['target']}", "--shots", "2",
                       "--methods", "pi-tuning", "--max-steps", "2", "--out", tmp_path / "text")
    assert rc == 0, err
    assert "Fisher similarity to the target (k2-seed0): " in out and "heatmaps: " in out


def test_cli_keep_saves_the_modules(capsys, saved_library, tmp_path):
    import shutil

    from mtpeft.bank import read_manifest

    path, files = saved_library
    bank = tmp_path / "bank"
    shutil.copytree(path, bank)
    rc, _, err = run(capsys, "adapt", "--bank", bank, "--task-file", f"target={files['target']}", "--shots", "2",
                     "--methods", "scratch,lorahub", "--max-steps", "2", "--lorahub-evals", "4", "--keep", "--json")
    assert rc == 0, err
    names = [m["name"] for m in read_manifest(bank)["modules"]]
    assert "target.adapt.k2.s0.scratch" in names and "target.adapt.k2.s0.lorahub" in names


@pytest.mark.parametrize("argv, message", [
    (["--methods", "scratch,nope"], "unknown adapt method 'nope'"),
    (["--shots", "0"], "not a positive integer"),
    (["--shots", "16,x"], "must be integers"),
    (["--seeds", "0,,1"], "empty item"),
    (["--max-steps", "0"], "out of range"),
])
def test_cli_refuses_bad_input(capsys, saved_library, argv, message):
    path, files = saved_library
    rc, _, err = run(capsys, "adapt", "--bank", path, "--task-file", f"target={files['target']}", *argv)
    assert rc == 2 and err.startswith("mtpeft: error:") and message in err


def test_cli_refuses_a_bank_without_experts(capsys, tmp_path, saved_library):
    from mtpeft.api import new_bank

    _, files = saved_library
    bank, _ = new_bank("tiny-bert")
    bank.add("untasked", "lora", {"r": 4})
    bank.save(tmp_path / "bank")
    rc, _, err = run(capsys, "adapt", "--bank", tmp_path / "bank", "--task-file", f"target={files['target']}",
                     "--shots", "2", "--methods", "scratch,lorahub")
    assert rc == 2 and "no source experts" in err and "mtpeft train --module lora" in err
    # the baseline alone needs no experts: a new LoRA of the default configuration (a bank of skills, say)
    rc, out, err = run(capsys, "adapt", "--bank", tmp_path / "bank", "--task-file", f"target={files['target']}",
                       "--shots", "2", "--methods", "scratch", "--max-steps", "2", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["experts"] == [] and rep["runs"][0]["trainable"] == 2 * 2 * (8 * 32 + 32 * 8)  # r 8, 2 layers x q, v
    rc, _, err = run(capsys, "adapt", "--bank", tmp_path / "nobank", "--task-file", f"target={files['target']}")
    assert rc == 2 and "not a bank" in err


def test_fisher_missing_for_a_task_that_is_not_built_in_says_how_to_store_it(library):
    bank, scorer, _ = library
    for n in bank.names:
        bank.delete_artifact(n, ARTIFACT)
    with pytest.raises(MtpeftError, match="mtpeft embed"):
        run_adapt(bank, scorer, synthetic_task("target", n=32, seed=5), [2], ["pi-tuning"], [0], QUICK)
    store_fisher(bank, scorer, synthetic_task("src", n=32, seed=1), "solver", batch_size=8, max_batches=1)
    assert bank.artifact("solver", ARTIFACT).shape == (sum(fisher_sizes(bank, "solver")),)


def test_train_fisher_stores_the_embedding_and_embed_skips_or_recomputes(capsys, saved_library, tmp_path):
    from mtpeft.adapt.fisher import has_fisher
    from mtpeft.api import open_bank

    _, files = saved_library
    out = tmp_path / "bank"
    rc, _, err = run(capsys, "train", "--backbone", "tiny-bert", "--module", "lora", "--option", "r=4",
                     "--task-file", f"src={files['src']}", "--task-file", f"flip={files['flip']}", "--out", out,
                     "--max-steps", "2", "--fisher", "--json")
    assert rc == 0, err
    bank, _ = open_bank(out)
    assert all(has_fisher(bank, n) for n in bank.names) and bank.names == ["src-lora", "flip-lora"]
    before = bank.artifact("src-lora", ARTIFACT).clone()
    rc, out_, _ = run(capsys, "embed", "--bank", out, "--json")  # stored already; src is not built in either
    assert rc == 0 and {r["status"] for r in json.loads(out_)["results"]} == {"stored already (--again recomputes)"}
    rc, _, err = run(capsys, "embed", "--bank", out, "--module", "src-lora", "--again")
    assert rc == 2 and "--task-file src=PATH" in err
    rc, _, err = run(capsys, "embed", "--bank", out, "--module", "src-lora", "--again", "--task-file",
                     f"src={files['src']}", "--batches", "1", "--batch-size", "4")
    assert rc == 0, err
    again, _ = open_bank(out)
    assert not torch.equal(again.artifact("src-lora", ARTIFACT), before)  # 1 batch of 4, not 32 batches of 16


def test_adapt_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["adapt", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--bank", "--task", "--task-file", "--shots", "--methods", "--seeds", "--json", "--out",
                 "--max-examples", "--max-steps", "--keep"):
        assert flag in out


def test_budget_refuses_unknown_keys_and_bad_values():
    assert Budget.from_dict({"steps": 7}).steps == 7
    with pytest.raises(MtpeftError, match="unknown adapt budget key"):
        Budget.from_dict({"stepz": 7})
    for bad in ({"steps": 0}, {"top_k": 1.5}, {"lr": -1.0}, {"interp_steps": -1}, {"lorahub_l1": -0.1}):
        with pytest.raises(MtpeftError):
            Budget(**bad)
