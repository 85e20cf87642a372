"""MPT's stages: the distillation objective, the source stage (``distil``), the target stage (``adapt``), the
config and ``mtpeft distil`` end to end, on the tiny backbones and synthetic tasks."""
import json

import pytest
import torch
from conftest import synthetic_task, task_csv

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.lightning import Distillation, PhaseModule
from mtpeft.lightning.distil import kl_teacher_student
from mtpeft.modules.mpt import mpt_stack, shared_prompt
from mtpeft.mpt.config import parse_distil_config
from mtpeft.mpt.stages import adapt, distil, init_factors, most_similar
from mtpeft.routers import TaskIdRouter
from mtpeft.routing import Routing
from mtpeft.scorer import make_scorer

TINY = ["tiny-bert", "tiny-llama"]


def tasks2():
    return [synthetic_task("a", n=32, seed=0), synthetic_task("b", n=32, seed=1, labels=("warm", "cold"))]


def bank_with_teachers(name, tasks, n_tokens=4, seed=7):
    """Random (untrained) teacher prompts: distinct, input-dependent predictions to distil."""
    bb = load_backbone(name, seed=0)
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    for i, t in enumerate(tasks):
        bank.add(f"{t.name}-teacher", "prompt", {"n_tokens": n_tokens}, task=t.name)
        with torch.no_grad():
            bank.module_parameters(f"{t.name}-teacher")["<input>.prompt"].normal_(
                generator=torch.Generator().manual_seed(seed + i))
    bank.freeze()
    return bank, scorer


def cfg_for(tasks, **kw):
    conf = {"sources": [t.name for t in tasks], "n_tokens": 4, "rank": 1, "shared_init": "random", "baseline": False,
            "teacher": {"max_steps": 4, "batch_size": 8}, "student": {"max_steps": 6, "batch_size": 8},
            "target": {"max_steps": 4, "batch_size": 8}}
    for k, v in kw.items():
        conf[k] = {**conf.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_distil_config(conf)


def add_students(bank, tasks, rank=1):
    for t in tasks:
        bank.add(f"{t.name}-mpt", "mpt", {"n_tokens": 4, "rank": rank}, task=t.name)
    return [f"{t.name}-mpt" for t in tasks]


def step_batch(tasks, n=16):
    """One mixed batch of both tasks' training examples."""
    texts, labels, ids = [], [], []
    for k, t in enumerate(tasks):
        tr = t.splits["train"]
        texts += list(tr["text"][: n // 2])
        labels += list(tr["label"][: n // 2])
        ids += [k] * (n // 2)
    return {"text": texts, "label": torch.tensor(labels), "task": torch.tensor(ids), "target": torch.tensor(labels)}


def predictions(bank, scorer, tasks, batch, module_of):
    r = Routing.one_hot(bank.ids([module_of[tasks[i].name] for i in batch["task"].tolist()]))
    with torch.no_grad():
        return scorer.logits(bank, batch["text"], [tasks[i] for i in batch["task"].tolist()], r)


# ---- the objective -----------------------------------------------------------------------------------
def test_kl_is_zero_for_equal_and_ignores_missing_labels():
    s = torch.tensor([[1.0, 2.0, float("-inf")], [0.5, 0.1, 3.0]])
    assert kl_teacher_student(s, s.clone(), 2.0).abs() < 1e-7
    t = s.clone()
    t[0, 1] = -1.0
    kl = kl_teacher_student(s, t, 2.0)
    assert torch.isfinite(kl) and kl > 0
    ref = torch.nn.functional.kl_div((s[1] / 2).log_softmax(-1), (t[1] / 2).log_softmax(-1), log_target=True,
                                     reduction="sum")
    p0, q0 = (t[0, :2] / 2).softmax(-1), (s[0, :2] / 2).softmax(-1)
    torch.testing.assert_close(kl, (ref + (p0 * (p0 / q0).log()).sum()) / 2 * 4)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hidden", ["pooled", "tokens"])
def test_distillation_loss_falls_and_student_matches_teacher(name, hidden):
    """Adam steps on the distillation loss (KL + hidden MSE) of a mixed two-task batch: the loss and each
    term fall, and the student, from a random P*, comes to predict what its teachers predict."""
    tasks = tasks2()
    bank, scorer = bank_with_teachers(name, tasks)
    students = add_students(bank, tasks)
    P = shared_prompt(bank, students[0])
    P.requires_grad_(True)
    obj = Distillation({t.name: f"{t.name}-teacher" for t in tasks}, task=0.0, kl=1.0, mse=1.0, hidden=hidden,
                       temperature=0.05)
    module = PhaseModule(bank, scorer, tasks, TaskIdRouter({t.name: f"{t.name}-mpt" for t in tasks}), objective=obj)
    opt = torch.optim.Adam([p for g in module.param_groups() for p in g["params"]], lr=0.05)
    batch = step_batch(tasks)
    teacher = predictions(bank, scorer, tasks, batch, {t.name: f"{t.name}-teacher" for t in tasks})

    def gap(logits):  # the largest difference between student and teacher label probabilities (at T = 0.05)
        return float(((logits / 0.05).softmax(-1) - (teacher / 0.05).softmax(-1)).abs().max())

    def step(train=True):
        with obj.capture(module, batch):
            logits = module(batch["text"], batch["task"])
        loss, logs = obj(module, batch, logits)
        if train:
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item(), {k: float(v) for k, v in logs.items()}, logits.detach()

    loss0, logs0, logits0 = step(False)
    assert gap(logits0) > 0.01  # the student starts away from its teachers: the match is learnt
    for _ in range(60):
        step()
    loss1, logs1, logits1 = step(False)
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    assert logs1["kl"] < 0.3 * logs0["kl"] and logs1["mse"] < 0.5 * logs0["mse"], (logs0, logs1)
    assert gap(logits1) < 0.35 * gap(logits0), (gap(logits0), gap(logits1))
    assert float((logits1.argmax(-1) == teacher.argmax(-1)).float().mean()) >= 0.9
    assert P.grad is not None  # P* learnt alongside the factors


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("hidden", ["pooled", "tokens"])
def test_teacher_outputs_are_kept_and_repadded(name, hidden):
    """A teacher's answer is computed once per example: a batch of seen and unseen examples runs the teacher on
    the unseen only, and the kept rows (other widths: fewer labels, fewer tokens) give the loss of no cache."""
    tasks = [synthetic_task("a", n=32, seed=0), synthetic_task("b", n=32, seed=1, labels=("x", "y", "z", "w"))]
    bank, scorer = bank_with_teachers(name, tasks)
    students = add_students(bank, tasks)
    router = TaskIdRouter({t.name: s for t, s in zip(tasks, students)})
    kw = {"task": 0.5, "kl": 1.0, "mse": 1.0, "hidden": hidden, "temperature": 2.0}
    teachers = {t.name: f"{t.name}-teacher" for t in tasks}
    kept, fresh = Distillation(teachers, **kw), Distillation(teachers, cache_mb=0, **kw)
    module = PhaseModule(bank, scorer, tasks, router, objective=kept)
    full = step_batch(tasks)

    def sub(ix):  # a batch of some of full's examples
        return {k: ([v[i] for i in ix] if isinstance(v, list) else v[ix]) for k, v in full.items()}

    first, second = sub([0, 8]), sub([0, 1, 9, 8, 15])  # a: 2 labels, b: 4; second holds first's two again
    orig = kept._forward
    for batch, n_new in ((first, 2), (second, 3), (second, 0)):
        seen: list = []
        kept._forward = lambda m, texts, ts, seen=seen: (seen.append(len(texts)), orig(m, texts, ts))[1]
        losses = []
        for obj in (kept, fresh):
            with obj.capture(module, batch):
                logits = module(batch["text"], batch["task"])
            losses.append(obj(module, batch, logits))
        kept._forward = orig
        assert seen == ([n_new] if n_new else [])
        (l1, g1), (l2, g2) = losses
        torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
        for k in g2:
            torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-5)
    assert kept._cached_bytes > 0 and fresh._cached_bytes == 0 and not fresh._cache


def test_distillation_objective_refuses_bad_settings():
    for kw, msg in [({}, "teachers"), ({"teachers": {"a": "t"}, "kl": -1}, "kl"),
                    ({"teachers": {"a": "t"}, "task": 0, "kl": 0, "mse": 0}, "nothing would be learnt"),
                    ({"teachers": {"a": "t"}, "temperature": 0}, "temperature"),
                    ({"teachers": {"a": "t"}, "hidden": "first"}, "hidden"),
                    ({"teachers": {"a": "t"}, "cache_mb": -1}, "cache_mb")]:
        with pytest.raises(MtpeftError, match=msg):
            Distillation(**kw)


# ---- the source stage -----------------------------------------------------------------------------
def test_distil_trains_shared_prompt_and_factors_only():
    """distil: students added and trained (P* and every task's factors), teachers and everything else as they
    were, all frozen after; P* starts from the teachers' mean with shared_init teachers."""
    tasks = tasks2()
    bank, scorer = bank_with_teachers("tiny-bert", tasks)
    teach = {n: p.detach().clone() for n, p in bank.named_parameters() if "input_stacks" in n}
    cfg = cfg_for(tasks, shared_init="teachers", student={"max_steps": 1, "lr": 1e-9})
    out = distil(bank, scorer, tasks, {t.name: f"{t.name}-teacher" for t in tasks}, cfg, progress=False)
    assert out["modules"] == ["a-mpt", "b-mpt"] and out["steps"] == 1
    mean = torch.stack([teach[f"input_stacks.{bank.group_of('a-teacher').key}.experts.{i}.prompt"]
                        for i in range(2)]).mean(0)
    torch.testing.assert_close(shared_prompt(bank, "a-mpt").detach(), mean, atol=1e-6, rtol=0)
    for n, p in bank.named_parameters():
        assert not p.requires_grad, n
        if n in teach:
            assert torch.equal(p, teach[n]), n
    cfg = cfg_for(tasks, student={"max_steps": 6, "lr": 0.05})
    bank.remove("a-mpt")
    bank.remove("b-mpt")
    distil(bank, scorer, tasks, {t.name: f"{t.name}-teacher" for t in tasks}, cfg, progress=False)
    stack = mpt_stack(bank, "a-mpt")
    assert tuple(stack.shared.shape) == (4, 32)
    for e in stack.experts:
        assert not torch.equal(e.u, torch.ones_like(e.u))  # trained off their init
    with pytest.raises(MtpeftError, match="already has student"):
        distil(bank, scorer, tasks, {t.name: f"{t.name}-teacher" for t in tasks}, cfg, progress=False)


# ---- the target stage -----------------------------------------------------------------------------
def sources_bank(rank=2):
    tasks = tasks2()
    bank, scorer = bank_with_teachers("tiny-bert", tasks)
    students = add_students(bank, tasks, rank=rank)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in students:
            for p in bank.module_parameters(n).values():
                p.add_(torch.randn(p.shape, generator=g))
        shared_prompt(bank, students[0]).normal_(generator=g)
    bank.freeze()
    return bank, scorer, tasks, students


@pytest.mark.parametrize("how", ["random", "average", "similar", "shared"])
def test_target_inits(how):
    bank, _, _, students = sources_bank()
    bank.add("new", "mpt", {"n_tokens": 4, "rank": 2})
    init_factors(bank, "new", how, students, similar="b-mpt", seed=1)
    stack = mpt_stack(bank, "new")
    u, v = stack.experts[2].u, stack.experts[2].v
    src = [stack.experts[i] for i in range(2)]
    if how == "average":
        torch.testing.assert_close(u, (src[0].u + src[1].u) / 2)
        torch.testing.assert_close(v, (src[0].v + src[1].v) / 2)
    elif how == "similar":
        assert torch.equal(u, src[1].u) and torch.equal(v, src[1].v)
    elif how == "shared":
        torch.testing.assert_close(stack.prompt_of(2), shared_prompt(bank, "new").detach())
    else:
        assert all(not torch.allclose(u, e.u) for e in src) and u.std() > 0.5


def test_most_similar_source():
    bank, scorer, tasks, _ = sources_bank()
    twin = synthetic_task("twin", n=32, seed=1, labels=("warm", "cold"))  # b's texts, another name
    best, sims = most_similar(bank, scorer, twin, tasks)
    assert best == "b" and sims["b"] > sims["a"] and abs(sims["b"] - 1.0) < 1e-4


@pytest.mark.parametrize("tune_shared", [False, True])
def test_adapt_trains_the_target_factors(tune_shared):
    """The target's factors (and, with tune_shared, its own copy of P*) train; the sources are untouched."""
    bank, scorer, tasks, _ = sources_bank(rank=1)
    before = {n: p.detach().clone() for n, p in bank.named_parameters()}
    target = synthetic_task("c", n=32, seed=2)
    cfg = cfg_for(tasks, rank=1, target={"init": "average", "tune_shared": tune_shared, "max_steps": 4, "lr": 0.05})
    out = adapt(bank, scorer, target, tasks, cfg, progress=False)
    assert out["module"] == "c-mpt" and out["steps"] == 4 and bank.record("c-mpt").task == "c"
    for n, p in bank.named_parameters():
        assert not p.requires_grad
        if n in before:
            assert torch.equal(p, before[n]), f"{n} changed"
    own = shared_prompt(bank, "c-mpt")
    assert (own is not shared_prompt(bank, "a-mpt")) == tune_shared
    if tune_shared:
        assert not torch.equal(own, shared_prompt(bank, "a-mpt"))  # a copy of P*, trained
    with pytest.raises(MtpeftError, match="already has a module 'c-mpt'"):
        adapt(bank, scorer, target, tasks, cfg, progress=False)
    bank.remove("a-mpt")
    with pytest.raises(MtpeftError, match="lacks"):
        adapt(bank, scorer, synthetic_task("d", n=8), tasks, cfg, progress=False)


# ---- the config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("conf,msg", [
    ({}, "'sources' is missing"),
    ({"sources": "a"}, "sources = 'a' is not accepted"),
    ({"sources": ["a"], "rank": 0}, "rank = 0"),
    ({"sources": ["a"], "n_tokens": 2.5}, "n_tokens = 2.5"),
    ({"sources": ["a"], "colour": 1}, r"unknown key\(s\) \['colour'\]"),
    ({"sources": ["a"], "teacher": {"lr": -1}}, "teacher.lr = -1"),
    ({"sources": ["a"], "student": {"steps": 3}}, r"student.steps"),
    ({"sources": ["a"], "student": [1]}, "'student' must be a mapping"),
    ({"sources": ["a"], "target": {"init": "best"}}, "target.init = 'best'"),
    ({"sources": ["a"], "loss": {"temperature": 0}}, "loss.temperature = 0"),
    ({"sources": ["a"], "loss": {"task": 0, "kl": 0, "mse": 0}}, "every loss weight"),
    ({"sources": ["a"], "loss": {"hidden": "cls"}}, "loss.hidden"),
    ({"sources": ["a", "a"]}, "appear twice"),
    ({"sources": ["a"], "targets": ["a"]}, "appear twice"),
    ({"sources": ["a"], "teacher": {"max_epochs": -1, "max_steps": -1}}, "without end"),
    ({"sources": ["a"], "shared_init": "zeros"}, "shared_init"),
    ({"sources": ["a"], "devices": 0}, "devices = 0"),
    ({"sources": ["a"], "strategy": "fsdp"}, "strategy = 'fsdp'"),
    ([1], "must hold a mapping"),
])
def test_bad_configs_refused(conf, msg):
    with pytest.raises(MtpeftError, match=msg):
        parse_distil_config(conf)


def test_config_reads_yaml_floats_and_shipped_config():
    from mtpeft.mpt.config import load_distil_config
    from mtpeft.suite import builtin_names

    cfg = parse_distil_config({"sources": ["a"], "teacher": {"lr": "1e-3"}})
    assert cfg.teacher.lr == 1e-3 and cfg.student.max_steps == 300
    shipped = load_distil_config("configs/mpt-distil.yaml")
    assert set(shipped.sources + shipped.targets) <= set(builtin_names())
    assert shipped.rank == 1 and shipped.loss.kl > 0 and shipped.loss.mse > 0


# ---- the command ----------------------------------------------------------------------------------
def write_task(tmp_path, task):
    path = task_csv(tmp_path / f"{task.name}.csv", task)
    return f"{task.name}={path}"


def test_cli_distil_end_to_end(tmp_path, capsys):
    """`mtpeft distil` on tiny-bert: teachers, student, baselines, one target; the report; the bank reloads
    with P* and routes; a second run with --target reuses teachers and student."""
    import yaml

    from mtpeft.cli import main

    specs = [write_task(tmp_path, synthetic_task(n, n=24, seed=i)) for i, n in enumerate(("s1", "s2", "t1", "t2"))]
    conf = {"backbone": "tiny-bert", "sources": specs[:2], "targets": [specs[2]], "n_tokens": 4, "rank": 1,
            "teacher": {"max_steps": 3, "batch_size": 8}, "student": {"max_steps": 3, "batch_size": 8},
            "target": {"max_steps": 2, "batch_size": 8, "init": "similar"}, "loss": {"mse": 0.5}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    bank_dir = tmp_path / "bank"
    assert main(["distil", "--config", str(tmp_path / "c.yaml"), "--out", str(bank_dir), "--json",
                 "--max-steps", "2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rep["sources"]] == ["s1", "s2"] and [r["task"] for r in rep["targets"]] == ["t1"]
    for r in rep["sources"]:
        assert all(isinstance(r[k], float) for k in ("teacher", "student", "prompt_eq"))
        # --max-steps 2 caps each teacher at 2 and the student at 2 per source (3, its own budget): equal steps
        # is 2 per source, the teacher's own recipe, so the teacher is the baseline (not trained twice)
        assert r["prompt_eq_steps"] == 2 and r["prompt_eq_is_teacher"] and r["prompt_eq"] == r["teacher"]
    assert rep["student"]["steps"] == 3
    assert rep["targets"][0]["similar"] in ("s1", "s2") and isinstance(rep["targets"][0]["prompt_scratch"], float)
    p = rep["parameters"]
    assert p["teacher_per_task"] == 4 * 32 and p["student_per_task"] == 1 * (4 + 32)
    assert p["student_share"] == round(36 / p["backbone"], 8)
    assert rep["peft_task_order"] == ["s1-mpt", "s2-mpt"] and rep["student"]["trained"]
    assert json.loads((bank_dir / "distil-report.json").read_text())["sources"] == rep["sources"]

    from mtpeft.api import open_bank

    bank, _ = open_bank(bank_dir)
    assert {"s1-teacher", "s2-teacher", "s1-mpt", "s2-mpt", "t1-mpt", "t1-pt"} == set(bank.names)
    assert bank.record("s1-teacher").metadata["recipe"] == {"max_steps": 2, "lr": 0.01, "batch_size": 8,
                                                            "max_epochs": 10, "patience": 3}
    assert not torch.equal(shared_prompt(bank, "s1-mpt"), torch.zeros(4, 32))
    # the target stage alone, on the same bank: nothing of the source stage trained again
    assert main(["distil", "--config", str(tmp_path / "c.yaml"), "--out", str(bank_dir), "--json",
                 "--max-steps", "2", "--target", specs[3]]) == 0
    rep2 = json.loads(capsys.readouterr().out)
    assert not rep2["student"]["trained"] and not any(t["trained"] for t in rep2["teachers"].values())
    assert [r["task"] for r in rep2["targets"]] == ["t2"]
    assert [r["student"] for r in rep2["sources"]] == [r["student"] for r in rep["sources"]]
    # and again with the config's target: the adapted module is kept, its init read from the bank
    assert main(["distil", "--config", str(tmp_path / "c.yaml"), "--out", str(bank_dir), "--json"]) == 0
    rep3 = json.loads(capsys.readouterr().out)
    assert rep3["targets"] == rep["targets"]


@pytest.mark.parametrize("cap,n,own,want", [(None, 5, 750, None), (40, 5, 750, 200), (40, 5, 100, 100),
                                             (40, 5, -1, 200), (2, 1, 10, 2)])
def test_student_steps_under_a_cap(cap, n, own, want):
    from mtpeft.mpt.run import equal_steps
    from mtpeft.mpt.stages import student_steps

    cfg = parse_distil_config({"sources": ["a"], "student": {"max_steps": own}})
    assert student_steps(cfg, cap, n) == want
    if own != -1:
        assert equal_steps(cfg, cap, n) == -(-(own if want is None else want) // n)


def test_equal_steps_baseline_trained_when_the_recipe_differs(tmp_path, capsys):
    """A student with another learning rate: prompt tuning at equal steps is not the teacher's recipe, so
    ``<task>-pt`` is trained and scored on its own."""
    import yaml

    from mtpeft.cli import main

    specs = [write_task(tmp_path, synthetic_task(n, n=24, seed=i)) for i, n in enumerate(("s1", "s2"))]
    conf = {"backbone": "tiny-bert", "sources": specs, "targets": [], "n_tokens": 4,
            "teacher": {"max_steps": 2, "batch_size": 8}, "student": {"max_steps": 4, "batch_size": 8, "lr": 0.02}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    assert main(["distil", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "b"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [(r["prompt_eq_steps"], r["prompt_eq_is_teacher"]) for r in rep["sources"]] == [(2, False)] * 2
    from mtpeft.api import open_bank

    assert {"s1-pt", "s2-pt"} <= set(open_bank(tmp_path / "b")[0].names)


@pytest.mark.parametrize("taken,teacher_lr,want", [(2, 0.01, True), (1, 0.01, False), (2, 0.05, False)])
def test_a_teacher_without_a_recipe_is_the_baseline_only_at_the_same_settings(taken, teacher_lr, want):
    """A teacher with no recorded recipe (brought by the user, or trained before recipes were recorded) is the
    equal-steps baseline only when it took exactly that many steps under the student's settings; a recorded
    recipe decides on its own, also for a teacher that stopped early."""
    from mtpeft.mpt.run import _same_recipe
    from mtpeft.mpt.stages import recipe

    cfg = parse_distil_config({"sources": ["s1"], "n_tokens": 4, "teacher": {"max_steps": 2, "lr": teacher_lr},
                               "student": {"max_steps": 2}})
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    bank.add("s1-teacher", "prompt", {"n_tokens": 4}, task="s1")
    teacher = {"module": "s1-teacher", "steps": taken}
    assert _same_recipe(bank, "s1", cfg, 2, teacher) is want
    bank.record("s1-teacher").metadata["recipe"] = recipe(cfg.student.train_config(0, False, 2))
    assert _same_recipe(bank, "s1", cfg, 2, teacher)
    assert not _same_recipe(bank, "s1", cfg, 3, teacher)  # another budget is another recipe


def test_cli_distil_errors(tmp_path, capsys):
    from mtpeft.cli import main

    (tmp_path / "bad.yaml").write_text("sources: [a]\nrank: zero\n")
    assert main(["distil", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "b")]) == 2
    assert "rank = 'zero' is not accepted; give a positive integer" in capsys.readouterr().err
    assert main(["distil", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "b")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["distil", "--config", "configs/mpt-distil.yaml", "--out", str(tmp_path / "b"),
                 "--max-steps", "0"]) == 2
    assert "--max-steps 0" in capsys.readouterr().err
    assert main(["distil", "--config", "configs/mpt-distil.yaml", "--out", str(tmp_path / "b"),
                 "--target", "tweet_airline"]) == 2
    assert "also sources" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_stopped_run_keeps_its_finished_teachers(tmp_path, monkeypatch):
    """Each teacher is saved as soon as it is trained: a run that fails on the second keeps the first, and the
    same command goes on from there."""
    from mtpeft import train
    from mtpeft.api import open_bank
    from mtpeft.mpt import parse_distil_config, run_distil

    specs = [write_task(tmp_path, synthetic_task(n, n=24, seed=i)) for i, n in enumerate(("s1", "s2"))]
    cfg = parse_distil_config({"backbone": "tiny-bert", "sources": specs, "targets": [], "n_tokens": 4,
                               "baseline": False, "teacher": {"max_steps": 2, "batch_size": 8},
                               "student": {"max_steps": 2, "batch_size": 8}})
    real, calls = train.fit_expert, []

    def failing(bank, scorer, task, name, *a, **k):
        calls.append(name)
        if name == "s2-teacher":
            raise RuntimeError("stopped")
        return real(bank, scorer, task, name, *a, **k)

    monkeypatch.setattr(train, "fit_expert", failing)
    with pytest.raises(RuntimeError, match="stopped"):
        run_distil(cfg, tmp_path / "b", progress=False)
    assert calls == ["s1-teacher", "s2-teacher"] and open_bank(tmp_path / "b")[0].names == ["s1-teacher"]
    monkeypatch.setattr(train, "fit_expert", real)
    rep = run_distil(cfg, tmp_path / "b", progress=False)
    assert not rep["teachers"]["s1"]["trained"] and rep["teachers"]["s2"]["trained"]
