"""ConPET (static and dynamic) and MbPA++ local adaptation on tiny-bert and synthetic tasks: the k-means
memory, the fixed batch budget, the selector's growth, the expert cache, top-k with teacher forcing, the
masked class-IL logits, local adaptation leaving the stored module as it was, and the CLI end to end."""
import json

import pytest
import torch
import torch.nn.functional as F
from continual_util import tiny_config

from mtpeft.errors import MtpeftError
from mtpeft.memory import ReplayMemory
from mtpeft.memory.policies import kmeans_pick


def clusters(n_clusters, per, d=24, seed=0, spread=0.01):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, d, generator=g), dim=-1) * 4
    which = torch.arange(n_clusters).repeat_interleave(per)
    x = centres[which] + spread * torch.randn(len(which), d, generator=g)
    return F.normalize(x, dim=-1), which


# ---- the k-means memory --------------------------------------------------------------------------------
def test_kmeans_pick_takes_one_example_per_cluster():
    x, which = clusters(6, 10)
    picked = kmeans_pick(x, 6, seed=0)
    assert len(picked) == 6 and sorted(which[picked].tolist()) == list(range(6))  # one per true cluster
    assert len(kmeans_pick(x, 3, seed=0)) <= 3
    assert kmeans_pick(x[:4], 9, seed=0).tolist() == [0, 1, 2, 3]  # budget above the examples: all kept


def test_kmeans_policy_keeps_the_budget_and_one_example_per_cluster():
    mem = ReplayMemory(24, 12, "kmeans", seed=0)
    xa, wa = clusters(12, 5, seed=1)
    ids_a = mem.add(xa, [f"a{i}" for i in range(60)], [0] * 60, "a")
    kept = (ids_a >= 0).nonzero().flatten()
    assert len(mem) == 12 and sorted(wa[kept].tolist()) == list(range(12))  # share 12: every cluster once
    xb, wb = clusters(6, 10, seed=2)
    ids_b = mem.add(xb, [f"b{i}" for i in range(60)], [0] * 60, "b")
    assert len(mem) <= 12 and mem.counts() == {"a": 6, "b": 6}  # a shrunk to its new share by k-means
    kept_b = (ids_b >= 0).nonzero().flatten()
    assert sorted(wb[kept_b].tolist()) == list(range(6))
    a_left = [int(e.text[1:]) for e in mem.get(mem.ids) if e.task == "a"]
    assert len({int(wa[i]) for i in a_left}) == 6  # at most one per cluster after the shrink too
    xc, _ = clusters(4, 10, seed=3)
    mem.add(xc, [f"c{i}" for i in range(40)], [0] * 40, "c")
    assert len(mem) <= 12 and mem.counts() == {"a": 4, "b": 4, "c": 4}


def test_kmeans_memory_saves_and_reloads_its_policy(tmp_path):
    mem = ReplayMemory(24, 8, "kmeans", seed=0)
    x, _ = clusters(8, 4)
    mem.add(x, [str(i) for i in range(32)], [0] * 32, "a")
    mem.save(tmp_path / "m")
    again = ReplayMemory.load(tmp_path / "m")
    assert again.policy.name == "kmeans" and again.ids.tolist() == mem.ids.tolist()


# ---- the fixed budget ----------------------------------------------------------------------------------
def test_budget_batches_are_fixed_whatever_the_sizes():
    from mtpeft.continual.replay_data import BudgetBatches

    for n_rows in (3, 10, 100):
        s = BudgetBatches(n_rows, 4, 7, lambda new, g: torch.arange(2), seed=0)
        batches = list(s)
        assert len(s) == len(batches) == 7
        assert all(len(b) == 6 and sum(i >= n_rows for i in b) == 2 for b in batches)


def _context(tmp_path, scenario="class-il", name="conpet-dynamic", **opts):
    """A strategy on a fresh tiny-bert bank with its run's stream and memory (as the runner builds them)."""
    from mtpeft.continual.runner import ContinualRun, _train_config
    from mtpeft.continual.strategies import STRATEGIES, Context

    conf = tiny_config(tmp_path / "tasks", scenario, max_steps=12)
    run = ContinualRun(conf, tmp_path / "out", progress=False)
    stream = run.stream(0)
    bank, scorer = run._fresh()
    memory = run._memory(bank, 0, None)
    ctx = Context(bank, scorer, stream, conf["module"], dict(conf["options"]), _train_config(conf, 0, None), 0,
                  memory, tmp_path / "out", False)
    return STRATEGIES.get(name)(ctx, **opts)


def _learn(strategy, upto):
    fits = []
    for step in range(upto + 1):
        task = strategy.ctx.stream.tasks[step]
        strategy.before_task(step, task)
        fits.append(strategy.train_task(step, task))
        strategy.after_task(step, task)
    return fits


def test_static_trains_the_same_number_of_batches_at_every_task(tmp_path):
    s = _context(tmp_path, name="conpet-static", budget=5)
    assert s.ctx.memory.policy.name == "kmeans"
    fits = _learn(s, 2)
    assert [f["steps"] for f in fits] == [5, 5, 5]  # the memory grows, the cost does not
    assert len(s.ctx.memory) == 24 and set(s.ctx.memory.counts()) == {"colors", "sizes", "temps"}


def test_static_options_are_checked(tmp_path):
    with pytest.raises(MtpeftError, match="old_ratio"):
        _context(tmp_path, name="conpet-static", old_ratio=1.5)
    with pytest.raises(MtpeftError, match="budget"):
        _context(tmp_path / "b", name="conpet-static", budget=0)


# ---- dynamic: top-k, the selector, the cache -----------------------------------------------------------
def test_topk_with_teacher_forcing():
    from mtpeft.continual.strategies.conpet_dynamic import select_topk

    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert select_topk(scores, 2).tolist() == [[0, 1], [3, 2]]
    # row 0 missed its true task 3: it replaces the last pick; row 1 had it: unchanged
    assert select_topk(scores, 2, torch.tensor([3, 2])).tolist() == [[0, 3], [3, 2]]
    assert select_topk(scores, 1, torch.tensor([2, 3])).tolist() == [[2], [3]]


def test_grow_head_keeps_the_old_rows():
    from mtpeft.continual.strategies.conpet_dynamic import grow_head

    w, b = torch.randn(2, 5), torch.randn(2)
    w3, b3 = grow_head(w, b, 3)
    x = torch.randn(4, 5)
    assert torch.equal((x @ w3.t() + b3)[:, :2], x @ w.t() + b)
    assert torch.equal(w3[2], torch.zeros(5)) and float(b3[2]) == 0.0
    with pytest.raises(MtpeftError, match="shrink"):
        grow_head(w3, b3, 2)


def test_selector_growth_keeps_its_old_outputs(tmp_path):
    s = _context(tmp_path)
    _learn(s, 1)
    texts = ["the red apple", "a tiny ant", "some hot fire"]
    with torch.no_grad():
        before = s.selector_logits(texts)
        s._grow(3)
        after = s.selector_logits(texts)
    assert before.shape == (3, 2) and after.shape == (3, 3)
    assert torch.allclose(after[:, :2], before, atol=1e-6) and torch.all(after[:, 2] == 0)
    assert not torch.allclose(before[:, 0], before[:, 1])  # it was trained: the tasks score differently


def test_old_experts_are_not_run_while_the_selector_trains(tmp_path, monkeypatch):
    s = _context(tmp_path, top_k=2)
    calls = []
    score = s.cache.score
    s.cache.score = lambda e, texts, tasks: calls.append((e, len(texts))) or score(e, texts, tasks)
    _learn(s, 1)
    first = sum(n for _, n in calls)
    assert first > 0
    fill = s.cache.fill

    def fill_then_forbid(*a, **k):  # after the cache is filled, any call of an expert fails the test
        n = fill(*a, **k)
        s.cache.score = lambda *_: pytest.fail("an expert ran while the selector trained")
        return n

    monkeypatch.setattr(s.cache, "fill", fill_then_forbid)
    task = s.ctx.stream.tasks[2]
    s.before_task(2, task)
    s.train_task(2, task)
    s.cache.score = lambda e, texts, tasks: calls.append((e, len(texts))) or score(e, texts, tasks)
    calls.clear()
    monkeypatch.setattr(s.cache, "fill", fill)
    s.train_selector(2, task)  # again at the same step: everything is cached
    assert calls == []


def test_dynamic_logits_live_in_the_full_space_with_the_others_negative(tmp_path):
    from mtpeft.continual.strategies.conpet_dynamic import NEG, select_topk

    s = _context(tmp_path)
    _learn(s, 2)
    stream, task = s.ctx.stream, s.ctx.stream.tasks[0]
    space = stream.eval_space(2, task)
    texts = list(task.splits["test"]["text"])[:8]
    with torch.no_grad():
        logits = s.eval_router(2, task).predict_logits(s.ctx.bank, s.ctx.scorer, texts, task, space)
        picks = select_topk(s.selector_logits(texts), 1)[:, 0]
    assert logits.shape == (8, len(space)) and len(space) == 6
    for row, p in zip(logits, picks.tolist()):
        own = space.ids_of(stream.tasks[p])
        others = torch.ones(len(space), dtype=torch.bool)
        others[own] = False
        assert torch.all(row[others] == NEG) and torch.all(row[own] > NEG)


def test_dynamic_needs_an_encoder(tmp_path):
    s = _context(tmp_path)
    from mtpeft.continual.strategies import STRATEGIES

    class NoEncode:
        pass

    s.ctx.scorer = NoEncode()
    with pytest.raises(MtpeftError, match="encoder"):
        STRATEGIES.get("conpet-dynamic")(s.ctx)


# ---- MbPA++ --------------------------------------------------------------------------------------------
def test_local_adaptation_leaves_the_stored_module_unchanged(tmp_path):
    s = _context(tmp_path, name="replay", local_adapt={"k": 4, "steps": 3, "lr": 0.5})
    _learn(s, 1)
    bank, task = s.ctx.bank, s.ctx.stream.tasks[0]
    params = bank.module_parameters(s.module_name())
    before = {k: p.detach().clone() for k, p in params.items()}
    grads = {k: p.requires_grad for k, p in params.items()}
    texts = list(task.splits["test"]["text"])[:6]
    space = s.ctx.stream.eval_space(1, task)
    with torch.no_grad():
        router = s.eval_router(1, task)
        adapted = router.predict_logits(bank, s.ctx.scorer, texts, task, space)
        from mtpeft.continual.strategies.base import only

        plain = s.ctx.scorer.logits(bank, texts, task, only(s.module_name()), labels=space)
    assert all(torch.equal(p, before[k]) for k, p in params.items())  # bit for bit
    assert {k: p.requires_grad for k, p in params.items()} == grads
    assert not torch.allclose(adapted, plain)  # the adaptation did act on the prediction
    assert router.stats["examples"] == 6 and 1 <= router.stats["adaptations"] <= 6


def test_final_only_adapts_after_the_last_task_alone(tmp_path):
    from mtpeft.continual.local_adapt import LocalAdapted
    from mtpeft.routers import FixedRouter

    s = _context(tmp_path, name="conpet-static-mbpa", budget=2, local_adapt={"final_only": True})
    assert s.local_adapt.final_only and s.local_adapt.k == 8  # the rest from the defaults
    _learn(s, 0)
    task = s.ctx.stream.tasks[0]
    assert isinstance(s.eval_router(0, task), FixedRouter)  # not the last task: the plain module
    _learn_from(s, 1, 2)
    assert isinstance(s.eval_router(2, task), LocalAdapted)


def _learn_from(strategy, first, last):
    for step in range(first, last + 1):
        task = strategy.ctx.stream.tasks[step]
        strategy.before_task(step, task)
        strategy.train_task(step, task)
        strategy.after_task(step, task)


def test_neighbour_groups_share_an_adaptation():
    from mtpeft.continual.local_adapt import neighbour_groups

    sets, group = neighbour_groups(torch.tensor([[3, 1], [1, 3], [2, 5], [5, 2], [1, 2]]))
    assert len(sets) == 3 and group[0] == group[1] and group[2] == group[3] and group[4] != group[0]


def test_local_adapt_is_refused_where_it_cannot_act(tmp_path):
    with pytest.raises(MtpeftError, match="does not take local_adapt"):
        _context(tmp_path, name="seqft", local_adapt=True)
    with pytest.raises(MtpeftError, match="local_adapt.k"):
        _context(tmp_path / "b", name="replay", local_adapt={"k": 0})
    with pytest.raises(MtpeftError, match="unknown key"):
        _context(tmp_path / "c", name="replay", local_adapt={"neighbours": 4})


# ---- whole runs and the CLI ----------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["task-il", "domain-il"])
def test_conpets_learn_in_the_other_scenarios(tmp_path, scenario):
    from mtpeft.continual.runner import run_continual

    conf = tiny_config(tmp_path / "tasks", scenario)
    names = ["conpet-static", "conpet-dynamic"]
    rep = run_continual(conf, tmp_path / "out", names, [0], progress=False)
    for name in names:
        m = rep["strategies"][name]["seeds"]["0"]["matrix"]
        diag = sum(m["R"][i][i] for i in range(3)) / 3
        assert diag > sum(m["untrained"]) / 3 + 0.15, (name, m)  # each task is learnt when it is trained



def test_cli_runs_both_conpets_and_local_adaptation(tmp_path, capsys):
    from mtpeft.cli import main

    conf = tiny_config(tmp_path / "tasks", "class-il")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(conf))
    out = tmp_path / "out"
    assert main(["continual", "--config", str(cfg), "--out", str(out), "--compare",
                 "seqft,conpet-static,conpet-dynamic", "--max-steps", "20"]) == 0
    rep = json.loads((out / "report.json").read_text())
    for s in ("conpet-static", "conpet-dynamic"):
        assert rep["strategies"][s]["n_finished"] == 1
        # each cuts seqft's forgetting (seqft forgets almost everything in class-IL)
        assert rep["strategies"][s]["mean"]["forgetting"] < rep["strategies"]["seqft"]["mean"]["forgetting"]
    steps = [t["steps"] for t in rep["strategies"]["conpet-static"]["seeds"]["0"]["timings"]]
    assert steps == [20, 20, 20] and rep["strategies"]["conpet-static"]["cost_per_task"]["steps"] == steps
    dyn = rep["strategies"]["conpet-dynamic"]["cost_per_task"]["steps"]
    assert dyn[0] == 20 and dyn[1] > 20  # an expert's steps, then the selector's too (none with one task)
    assert (out / "plots" / "cost_per_task.png").exists()
    out2 = tmp_path / "out2"
    assert main(["continual", "--config", str(cfg), "--out", str(out2), "--strategy", "conpet-static",
                 "--max-steps", "10", "--local-adapt"]) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    assert "--local-adapt" in rep2["command"]
    assert rep2["config"]["strategies"]["conpet-static"]["local_adapt"] is True
    timings = rep2["strategies"]["conpet-static"]["seeds"]["0"]["timings"]
    assert all(t["local_adapt_n"] == 48 for t in timings)  # 3 tasks x 16 test examples, every step
    assert rep2["strategies"]["conpet-static"]["local_adapt_ms_per_example"] > 0
    capsys.readouterr()
    assert main(["continual", "--config", str(cfg), "--out", str(tmp_path / "o3"), "--strategy", "seqft",
                 "--local-adapt"]) == 2
    assert "takes local adaptation" in capsys.readouterr().err


# ---- the benchmark: earlier baseline rows beside the new ones -------------------------------------------
def _bench(name):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(conf, strategies, **extra):
    stat = {"acc": 0.5, "bwt": -0.1, "fwt": 0.0, "forgetting": 0.1, "intransigence": None}
    return {"config": conf, "seeds": conf["seeds"], "stream": "tweets", "scenario": "domain-il", "tasks": ["a", "b"],
            "command": "c", "reproduce": "r", "baselines": {"majority_acc": 0.4, "zero_shot_acc": 0.3},
            "strategies": {s: {"mean": stat, "std": dict.fromkeys(stat), "n_finished": 3,
                               "time": {"train_s": 1.0, "eval_s": 1.0, "memory_s": 0.0}, **extra} for s in strategies},
            "time_split": {s: {"train_s": 1.0, "eval_s": 1.0, "memory_s": 0.0} for s in strategies}}


def test_baseline_rows_join_only_a_run_of_the_same_config(tmp_path):
    bench = _bench("bench_continual")
    conf = {"backbone": "minilm", "stream": "tweets", "max_steps": 40, "compare": ["seqft"], "strategies": {},
            "seeds": [0, 1, 2], "module": "lora", "options": {"r": 8}, "max_train": 400, "max_eval": 150,
            "batch_size": 16}
    base = _result(conf, ["seqft", "replay", "conpet-static"])
    mine = {**conf, "compare": ["conpet-static"], "strategies": {"conpet-static": {"budget": 10}}}
    bench.check_baseline(base, mine, [0, 1, 2], "base.json")  # what to run may differ
    with pytest.raises(SystemExit, match=r"\['max_steps'\].*max_steps: 40 there, 5 here"):
        bench.check_baseline(base, {**mine, "max_steps": 5}, [0, 1, 2], "base.json")
    with pytest.raises(SystemExit, match="seeds"):
        bench.check_baseline(base, mine, [0], "base.json")
    with pytest.raises(SystemExit, match="not a continual result"):
        bench.check_baseline({"rows": []}, mine, [0, 1, 2], "base.json")
    new = _result(mine, ["conpet-static"], cost_per_task={"steps": [10, 10], "train_s": [2.0, 2.1]})
    both = bench.combine(new, base, "base.json")
    assert list(both["strategies"]) == ["seqft", "replay", "conpet-static"]
    assert both["strategies"]["conpet-static"] == new["strategies"]["conpet-static"]  # this run's row wins
    assert both["strategies"]["seqft"]["from"] == "base.json" and "from" not in both["strategies"]["conpet-static"]
    report = _bench("report")
    text = "\n".join(report.continual_table({**both, "name": "x"}, "tweets-conpet"))
    assert "| conpet-static |" in text and "| seqft |" in text
    assert "- conpet-static: 10, 10 | 2, 2" in text and "Rows seqft, replay come from `base.json`" in text
    line = report.conpet_inference_line({
        "config": {"backbone": "minilm", "module": "lora", "experts": 5, "labels": 50, "batch": 64, "threads": 1,
                   "repeats": 5}, "reproduce": "python benchmarks/bench_conpet.py", "one_expert_ms": 100.0,
        "selector_ms": 90.0, "conpet_dynamic_top1_ms": 195.0, "conpet_dynamic_top2_ms": 290.0, "ratio_top1": 1.95,
        "ratio_top2": 2.9})[0]
    assert "one expert 100 ms" in line and "top-1 expert 195 ms (1.95x)" in line
