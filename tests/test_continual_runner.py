"""Whole continual runs on tiny-bert and synthetic tasks: every strategy in every scenario, what each strategy
promises (frozen experts do not forget, seqft does, replay keeps more), resume, and the CLI."""
import json

import pytest
from continual_util import tiny_config

from mtpeft.continual.strategies import STRATEGIES
from mtpeft.errors import MtpeftError

SEQUENTIAL = ["seqft", "replay", "expert-oracle", "expert-router", "olora"]
CONPET = ["conpet-static", "conpet-static-mbpa", "conpet-dynamic"]  # tested in test_conpet.py


def _run(tmp_path, scenario, names, **over):
    from mtpeft.continual.runner import run_continual

    conf = tiny_config(tmp_path / "tasks", scenario, **over)
    return run_continual(conf, tmp_path / "out", names, conf["seeds"], progress=False)


def _matrix(report, name, seed="0"):
    return report["strategies"][name]["seeds"][seed]["matrix"]


@pytest.mark.parametrize("scenario", ["task-il", "domain-il", "class-il"])
def test_every_strategy_runs_in_every_scenario(tmp_path, scenario):
    rep = _run(tmp_path, scenario, [*SEQUENTIAL, "joint"])
    assert set(rep["strategies"]) == set(SEQUENTIAL) | {"joint"}
    untrained = _matrix(rep, "seqft")["untrained"]
    for name in SEQUENTIAL:
        m = _matrix(rep, name)
        assert len(m["R"]) == 3 and all(len(r) == 3 for r in m["R"])
        assert m["untrained"] == untrained  # one bare-backbone row per seed, shared
        diag = sum(m["R"][i][i] for i in range(3)) / 3
        assert diag > sum(untrained) / 3 + 0.15, (name, m)  # each task is learnt when it is trained
        assert rep["strategies"][name]["seeds"]["0"]["metrics"]["intransigence"] is not None  # joint ran
    joint = rep["strategies"]["joint"]["seeds"]["0"]
    assert joint["metrics"]["acc"] > sum(untrained) / 3 + 0.15


def test_frozen_experts_do_not_forget_and_seqft_does(tmp_path):
    rep = _run(tmp_path, "task-il", ["expert-oracle", "seqft", "replay"])
    oracle = _matrix(rep, "expert-oracle")
    for j in range(3):  # task j's expert is frozen after step j and picked by the task id: its cells stay put
        assert len({oracle["R"][i][j] for i in range(j, 3)}) == 1
    assert rep["strategies"]["expert-oracle"]["mean"]["bwt"] == 0.0
    assert rep["strategies"]["expert-oracle"]["mean"]["forgetting"] == 0.0


def test_class_il_seqft_forgets_and_replay_keeps_more(tmp_path):
    rep = _run(tmp_path, "class-il", ["seqft", "replay"])
    seq, rep_ = (rep["strategies"][s]["mean"] for s in ("seqft", "replay"))
    assert seq["forgetting"] > 0.3  # the last task's labels take over
    assert rep_["forgetting"] < seq["forgetting"] and rep_["acc"] > seq["acc"]


def test_memory_is_saved_with_the_run_and_balanced(tmp_path):
    from mtpeft.memory import ReplayMemory

    _run(tmp_path, "task-il", ["replay"])
    ck = tmp_path / "out" / "runs" / "replay" / "seed0" / "ckpt"
    assert [p.name for p in ck.iterdir()] == ["step3"]  # older checkpoints pruned
    mem = ReplayMemory.load(ck / "step3" / "memory")
    assert len(mem) == 24 and mem.counts("task") == {"colors": 8, "sizes": 8, "temps": 8}


def test_a_second_run_into_the_same_directory_is_refused_unless_resumed(tmp_path):
    from mtpeft.continual.runner import run_continual

    rep = _run(tmp_path, "task-il", ["seqft"])
    conf = tiny_config(tmp_path / "tasks", "task-il")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("a user's file")
    with pytest.raises(MtpeftError, match="not empty and holds no continual run"):
        run_continual(conf, tmp_path / "other", ["seqft"], [0], progress=False)
    assert [p.name for p in (tmp_path / "other").iterdir() if p.name != ".mtpeft.lock"] == ["notes.txt"]
    with pytest.raises(MtpeftError, match="--resume"):
        run_continual(conf, tmp_path / "out", ["seqft"], [0], progress=False)
    again = run_continual(conf, tmp_path / "out", ["seqft"], [0], resume=True, progress=False)
    assert _matrix(again, "seqft") == _matrix(rep, "seqft")  # finished: nothing re-run
    other = tiny_config(tmp_path / "tasks", "task-il", lr=0.01)
    with pytest.raises(MtpeftError, match=r"different config \(keys \['lr'\]"):
        run_continual(other, tmp_path / "out", ["seqft"], [0], resume=True, progress=False)
    more = tiny_config(tmp_path / "tasks", "task-il", seeds=[0, 1], max_steps=30)  # a seed added: only it runs
    grown = run_continual(more, tmp_path / "out", ["seqft"], [1], resume=True, progress=False)
    assert grown["seeds"] == [0, 1] and _matrix(grown, "seqft") == _matrix(rep, "seqft")
    assert grown["strategies"]["seqft"]["n_finished"] == 2


def test_resume_after_a_stop_between_tasks_gives_the_uninterrupted_report(tmp_path, monkeypatch):
    from mtpeft.continual import runner

    whole = _run(tmp_path / "a", "class-il", ["replay", "olora"])
    calls = {"n": 0}
    real = runner.ContinualRun._commit

    def stop_after_first_commits(self, *a, **kw):
        real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:  # replay has finished task 1 of 3 and saved; the process "dies" here
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.ContinualRun, "_commit", stop_after_first_commits)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", "class-il", ["replay", "olora"])
    monkeypatch.setattr(runner.ContinualRun, "_commit", real)
    state = json.loads((tmp_path / "b" / "out" / "runs" / "replay" / "seed0" / "state.json").read_text())
    assert state["done"] == 2 and not state["finished"]
    conf = tiny_config(tmp_path / "b" / "tasks", "class-il")
    resumed = runner.run_continual(conf, tmp_path / "b" / "out", ["replay", "olora"], [0], resume=True,
                                   progress=False)
    for s in ("replay", "olora"):
        assert _matrix(resumed, s)["R"] == _matrix(whole, s)["R"]


def test_cli_runs_compares_and_recomputes(tmp_path, capsys):
    from mtpeft.cli import main

    conf = tiny_config(tmp_path / "tasks", "task-il")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(conf))
    out = tmp_path / "out"
    assert main(["continual", "--config", str(cfg), "--out", str(out), "--compare", "seqft,expert-oracle",
                 "--seeds", "0,1", "--max-steps", "10"]) == 0
    text = capsys.readouterr().out
    assert "seqft" in text and "expert-oracle" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["seeds"] == [0, 1] and rep["strategies"]["seqft"]["n_finished"] == 2
    assert "--max-steps 10" in rep["command"] and "--compare seqft,expert-oracle" in rep["command"]
    assert (out / "report.md").exists() and any((out / "plots").glob("*.png"))
    assert main(["eval-forgetting", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["strategies"]["seqft"]["mean"] == rep["strategies"]["seqft"]["mean"]


def test_cli_errors(tmp_path, capsys):
    from mtpeft.cli import main

    assert main(["continual", "--out", str(tmp_path / "o"), "--strategy", "ewc"]) == 2
    assert "unknown strategy 'ewc'" in capsys.readouterr().err
    assert main(["continual", "--out", str(tmp_path / "o"), "--strategy", "seqft", "--compare", "a,b"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["continual", "--out", str(tmp_path / "o"), "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_every_registered_strategy_is_tested():
    assert set(STRATEGIES.names()) == {*SEQUENTIAL, "joint", *CONPET}


def test_expert_router_shares_the_oracles_experts(tmp_path):
    from mtpeft.io import read_tensors

    rep = _run(tmp_path, "domain-il", ["expert-oracle", "expert-router"])
    timings = rep["strategies"]["expert-router"]["seeds"]["0"]["timings"]
    assert all(t.get("reused") for t in timings)  # copied, not trained again
    base = tmp_path / "out" / "runs"
    files = {s: sorted((base / s / "seed0" / "ckpt" / "step3" / "bank" / "modules").glob("*.safetensors"))
             for s in ("expert-oracle", "expert-router")}
    assert len(files["expert-oracle"]) == 3
    for a, b in zip(files["expert-oracle"], files["expert-router"]):
        ta, tb = read_tensors(a), read_tensors(b)
        assert ta.keys() == tb.keys() and all(bool((ta[k] == tb[k]).all()) for k in ta)
    # the router picks among the same experts without the task id: the last row is close to the oracle's
    o, r = (_matrix(rep, s)["R"][-1] for s in ("expert-oracle", "expert-router"))
    assert sum(r) / 3 > sum(o) / 3 - 0.2


@pytest.mark.parametrize("module,options", [("prompt", {"n_tokens": 4}), ("ia3", {}), ("houlsby", {"r": 8})])
def test_strategies_work_with_other_module_types(tmp_path, module, options):
    rep = _run(tmp_path, "class-il", ["seqft", "replay", "expert-router", "joint"], module=module, options=options,
               max_steps=6)
    for s in ("seqft", "replay", "expert-router"):
        assert len(_matrix(rep, s)["R"]) == 3
    assert rep["strategies"]["joint"]["n_finished"] == 1


def test_nearest_to_batch_replay_also_keeps_more_than_seqft(tmp_path):
    rep = _run(tmp_path, "class-il", ["seqft", "replay"],
               strategies={"replay": {"retrieval": "nearest", "ratio": 1.0}})
    seq, near = (rep["strategies"][s]["mean"] for s in ("seqft", "replay"))
    assert near["acc"] > seq["acc"] and near["forgetting"] < seq["forgetting"]
