"""The continual report (mtpeft/continual/report.py, report_md.py, plots.py, cli/forgetting.py) on run
directories written by hand, with metrics computed by hand from the matrices below."""
import json
import math
import re

import pytest

from mtpeft.cli import main
from mtpeft.continual.plots import plot_report
from mtpeft.continual.report import build_report, recompute, render_markdown, summary_table, write_report
from mtpeft.errors import MtpeftError

TASKS = ["a", "b", "c"]
B01, B2 = [0.3, 0.2, 0.1], [0.4, 0.2, 0.1]
SEQFT = {0: [[0.8, 0.3, 0.2], [0.6, 0.9, 0.4], [0.5, 0.7, 0.95]],
         1: [[0.7, 0.2, 0.2], [0.5, 0.8, 0.3], [0.4, 0.6, 0.9]],
         2: [[0.9, 0.4, 0.2], [0.9, 0.9, 0.2], [0.6, 0.9, 0.9]]}
REPLAY = {0: [[0.9, 0.3, 0.2], [0.85, 0.9, 0.3], [0.8, 0.85, 0.9]],
          1: [[0.8, 0.2, 0.2], [0.8, 0.8, 0.3], [0.8, 0.8, 0.8]],
          2: [[0.99, 0.5, 0.5]]}  # partial: one task done; 0.99 would show in any mean it leaked into
JOINT = {0: {"a": 0.9, "b": 0.9, "c": 0.9}, 1: {"a": 0.8, "b": 0.8, "c": 0.8}, 2: {}}  # seed 2 unfinished
COMMAND = "mtpeft continual --config configs/continual/tweets.yaml --out OUT"


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _timings(k, n):
    return [{"task": t, "train_s": 10.0 * (k + 1), "eval_s": 1.0, "memory_s": 0.0, "steps": 5, "best_val_acc": 0.8}
            for t in TASKS[:n]]


def _state(strategy, k, rows, untrained, scenario="domain-il", tasks=TASKS):
    n = len(tasks)
    return {"format": "mtpeft-continual-state", "version": 1, "strategy": strategy, "seed": k, "scenario": scenario,
            "tasks": tasks, "done": len(rows), "finished": len(rows) == n,
            "matrix": {"format": "mtpeft-acc-matrix", "version": 1, "tasks": tasks, "steps": tasks, "R": rows,
                       "untrained": untrained, "joint": None},
            "timings": _timings(k, len(rows)), "state": {"anything": [1, 2]}}


def make_run(d, strategies=("seqft", "joint", "replay"), seeds=(0, 1, 2)):
    _write(d / "run.json", {"format": "mtpeft-continual-run", "version": 1,
                            "stream": {"name": "tweets", "scenario": "domain-il", "tasks": TASKS},
                            "strategies": list(strategies), "seeds": list(seeds), "config": {"lr": 1e-3},
                            "command": COMMAND, "baselines": {"majority": {"a": 0.5, "b": 0.25, "c": 0.34}}})
    for k in seeds:
        b = B2 if k == 2 else B01
        if "seqft" in strategies:
            _write(d / f"runs/seqft/seed{k}/state.json", _state("seqft", k, SEQFT[k], b))
        if "replay" in strategies:
            _write(d / f"runs/replay/seed{k}/state.json", _state("replay", k, REPLAY[k], b))
        if "joint" in strategies:
            done = len(TASKS) if JOINT[k] else 0
            _write(d / f"runs/joint/seed{k}/state.json", {
                "format": "mtpeft-continual-state", "version": 1, "strategy": "joint", "seed": k,
                "scenario": "domain-il", "tasks": TASKS, "done": done, "finished": bool(JOINT[k]), "matrix": None,
                "accuracies": JOINT[k], "timings": [{"task": "joint", "train_s": 50.0, "eval_s": 2.0,
                                                     "memory_s": 0.0, "steps": 9, "best_val_acc": None}]})
    return d


def sample_std(xs):  # by hand, ddof=1
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_seed_metrics_hand_computed(tmp_path):
    r = build_report(make_run(tmp_path))
    s = r["strategies"]["seqft"]["seeds"]
    assert s["0"]["metrics"] == pytest.approx({"acc": 2.15 / 3, "bwt": -0.25, "fwt": 0.2, "forgetting": 0.25,
                                               "intransigence": (0.1 + 0.0 - 0.05) / 3})
    assert s["1"]["metrics"] == pytest.approx({"acc": 1.9 / 3, "bwt": -0.25, "fwt": 0.1, "forgetting": 0.25,
                                               "intransigence": 0.0}, abs=1e-12)
    # seed 2: joint did not finish, so no intransigence (None, not 0)
    assert s["2"]["metrics"]["intransigence"] is None
    assert s["2"]["metrics"] == pytest.approx({"acc": 0.8, "bwt": -0.15, "fwt": 0.15, "forgetting": 0.15,
                                               "intransigence": None})
    assert s["0"]["acc_curve"] == pytest.approx([0.8, 0.75, 2.15 / 3])
    assert s["0"]["matrix"]["joint"] == [0.9, 0.9, 0.9] and s["2"]["matrix"]["joint"] is None


def test_means_and_stds_over_three_seeds(tmp_path):
    a = build_report(make_run(tmp_path))["strategies"]["seqft"]
    assert a["n_finished"] == 3
    assert a["mean"]["acc"] == pytest.approx((2.15 / 3 + 1.9 / 3 + 0.8) / 3)
    assert a["std"]["acc"] == pytest.approx(1 / 12)  # 0.7167, 0.6333, 0.8: deviations 0, -1/12, +1/12
    assert a["mean"]["bwt"] == pytest.approx(-0.65 / 3)
    assert a["std"]["bwt"] == pytest.approx(math.sqrt(1 / 300))
    assert a["mean"]["forgetting"] == pytest.approx(0.65 / 3)
    assert a["mean"]["intransigence"] == pytest.approx(0.05 / 6)  # over the 2 seeds where joint finished
    assert a["n"]["intransigence"] == 2
    assert a["std"]["intransigence"] == pytest.approx(0.05 / 3 / math.sqrt(2))
    assert a["acc_curve"]["mean"] == pytest.approx([0.8, (0.75 + 0.65 + 0.9) / 3, 2.15 / 3])
    assert a["acc_curve"]["std"][0] == pytest.approx(sample_std([0.8, 0.7, 0.9]))
    assert a["matrix_mean"]["R"][2] == pytest.approx([0.5, 2.2 / 3, 2.75 / 3])
    assert a["time"] == pytest.approx({"train_s": 180.0 / 3, "eval_s": 3.0, "memory_s": 0.0})


def test_partial_runs_reported_and_left_out_of_means(tmp_path):
    r = build_report(make_run(tmp_path))
    rp = r["strategies"]["replay"]
    assert rp["seeds"]["2"]["finished"] is False and rp["seeds"]["2"]["done"] == 1
    assert rp["n_finished"] == 2
    assert rp["mean"]["acc"] == pytest.approx((0.85 + 0.8) / 2)  # the partial 0.99 is not in it
    assert rp["std"]["acc"] == pytest.approx(sample_std([0.85, 0.8]))
    jt = r["strategies"]["joint"]
    assert jt["mean"]["acc"] == pytest.approx(0.85) and jt["std"]["acc"] == pytest.approx(sample_std([0.9, 0.8]))
    assert all(jt["mean"][k] is None for k in ("bwt", "fwt", "forgetting", "intransigence"))
    assert "acc_curve" not in jt
    assert {(p["strategy"], p["seed"], p["done"]) for p in r["partial"]} == {("replay", 2, 1), ("joint", 2, 0)}
    md = render_markdown(r)
    assert "replay seed 2 (1/3 tasks done, ACC so far 99.0)" in md and "joint seed 2 (0/3 tasks done)" in md


def test_not_started_run_is_partial(tmp_path):
    d = make_run(tmp_path)
    (d / "runs/replay/seed2/state.json").unlink()
    r = build_report(d)
    assert r["strategies"]["replay"]["seeds"]["2"] == (
        {"finished": False, "done": 0, "started": False, "metrics": dict.fromkeys(
            ["acc", "bwt", "fwt", "forgetting", "intransigence"]), "timings": [], "matrix": None, "acc_curve": []})
    assert "replay seed 2 (0/3 tasks done, not started)" in render_markdown(r)


def test_baselines(tmp_path):
    b = build_report(make_run(tmp_path))["baselines"]
    assert b["majority_acc"] == pytest.approx((0.5 + 0.25 + 0.34) / 3)
    assert b["zero_shot"] == pytest.approx({"a": 1.0 / 3, "b": 0.2, "c": 0.1})
    assert b["zero_shot_acc"] == pytest.approx((1.0 / 3 + 0.3) / 3)
    assert b["zero_shot_std"] == pytest.approx(sample_std([0.2, 0.2, 0.7 / 3]))


def test_markdown_table_and_command(tmp_path):
    r = build_report(make_run(tmp_path))
    md = render_markdown(r)
    assert COMMAND in md and "tweets" in md and "domain-il" in md
    table = summary_table(r)
    assert table in md
    assert "| seqft | 3/3 | 71.7 ± 8.3 | -21.7 ± 5.8 | 15.0 ± 5.0 | 21.7 ± 5.8 | 0.8 ± 1.2 | 63.0 |" in table
    assert "| joint | 2/3 | 85.0 ± 7.1 | — | — | — | — | 52.0 |" in table
    assert "| majority class | — | 36.3 | — | — | — | — | — |" in table
    assert "| zero-shot (untrained) | 3/3 | 21.1 ± 1.9 |" in table
    assert "| after b | 66.7 | 86.7 | 30.0 |" in md  # seqft's mean matrix, row 2
    assert "intransigence over 2 of 3 finished seeds" in md


def test_one_seed_one_task_undefined_metrics_are_dashes(tmp_path):
    _write(tmp_path / "run.json", {"format": "mtpeft-continual-run", "version": 1,
                                   "stream": {"name": "s", "scenario": "task-il", "tasks": ["a"]},
                                   "strategies": ["seqft"], "seeds": [0], "config": {}, "command": "mtpeft x",
                                   "baselines": {"majority": {}}})
    _write(tmp_path / "runs/seqft/seed0/state.json", _state("seqft", 0, [[0.7]], None, "task-il", ["a"]))
    r = build_report(tmp_path)
    a = r["strategies"]["seqft"]
    assert a["mean"] == {"acc": pytest.approx(0.7), "bwt": None, "fwt": None, "forgetting": None,
                         "intransigence": None}
    assert a["std"]["acc"] is None  # one seed: no sample std
    assert "| seqft | 1/1 | 70.0 | — | — | — | — |" in summary_table(r)
    assert "no ± with a single seed" in render_markdown(r)
    assert json.loads(json.dumps(r))["strategies"]["seqft"]["mean"]["bwt"] is None  # null in JSON, never 0


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "run.json").unlink(), "has no run.json"),
    (lambda d: (d / "runs/seqft/seed1/state.json").write_text("{not json"), r"seed1/state.json is not valid JSON"),
    (lambda d: _edit(d / "runs/seqft/seed1/state.json", format="something-else"), "not a continual state file"),
    (lambda d: _edit(d / "runs/seqft/seed1/state.json", version=2), "version 2; this mtpeft reads version 1"),
    (lambda d: _edit(d / "run.json", format="mtpeft-acc-matrix"), "run.json: not a continual run file"),
    (lambda d: _edit(d / "run.json", version=7), "run.json: continual run file version 7"),
    (lambda d: _edit(d / "run.json", strategies=["seqft", "../evil"]), "'../evil' is not allowed"),
    (lambda d: _edit(d / "runs/seqft/seed1/state.json", seed=2), "lies where 'seqft' seed 1 belongs"),
    (lambda d: _edit(d / "runs/seqft/seed1/state.json", done=2), "'finished' is True with 2 of 3 tasks done"),
    (lambda d: _edit(d / "runs/seqft/seed1/state.json", finished=False, done=1), "3 rows but 'done' is 1"),
    (lambda d: _edit(d / "runs/seqft/seed1/state.json", scenario="class-il"), "differ from run.json's"),
    (lambda d: _edit(d / "runs/seqft/seed1/state.json", timings=[{"task": "a", "train_s": -1}]), "train_s is -1"),
    (lambda d: _edit(d / "runs/replay/seed0/state.json", matrix={"R": []}), "its 'matrix' is unreadable"),
    (lambda d: _edit(d / "runs/joint/seed0/state.json", accuracies={"a": 1.5, "b": 0.1, "c": 0.1}), r"\[0, 1\]"),
])
def test_bad_files_give_clear_errors(tmp_path, damage, match):
    d = make_run(tmp_path)
    damage(d)
    with pytest.raises(MtpeftError, match=match) as e:
        build_report(d)
    assert str(d) in str(e.value)  # names the file (or the directory)


def _edit(path, **kw):
    obj = json.loads(path.read_text())
    obj.update(kw)
    path.write_text(json.dumps(obj))


def test_write_report_files_and_pngs(tmp_path):
    d = make_run(tmp_path)
    r = write_report(d)
    assert json.loads((d / "report.json").read_text()) == json.loads(json.dumps(r))
    assert (d / "report.md").read_text() == render_markdown(r)
    names = {p.split("/")[-1] for p in r["plots"]}
    assert names == {"acc_curve.png", "metrics.png", "cost_per_task.png", "matrix_seqft.png", "task_curves_seqft.png",
                     "matrix_replay.png", "task_curves_replay.png"}
    for p in r["plots"]:
        data = (d / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert re.fullmatch(r"plots/[a-z0-9_-]+\.png", p) and f"]({p})" in (d / "report.md").read_text()
    assert not [f for f in (d / "plots").iterdir() if not f.name.endswith(".png")]  # no temporary left


def test_plots_refuse_unsafe_names(tmp_path):
    r = build_report(make_run(tmp_path))
    r["strategies"]["../x"] = r["strategies"].pop("replay")
    with pytest.raises(MtpeftError, match="not allowed"):
        plot_report(r, tmp_path / "plots")
    assert not (tmp_path / "x.png").exists() and not list(tmp_path.glob("matrix_*"))


def test_cli_eval_forgetting(tmp_path, capsys):
    d = make_run(tmp_path)
    assert main(["eval-forgetting", str(d)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"seqft\s+3/3\s+71\.7 ± 8\.3\s+-21\.7 ± 5\.8", out) and "replay seed 2" in out
    assert not (d / "report.json").exists()  # without --write nothing is written
    assert main(["eval-forgetting", str(d), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(recompute(d)))
    assert main(["eval-forgetting", str(d), "--write", "--no-plots"]) == 0
    assert (d / "report.md").is_file() and not (d / "plots").exists()
    capsys.readouterr()
    assert main(["eval-forgetting", str(tmp_path / "nowhere")]) == 2
    assert "mtpeft: error: run directory" in capsys.readouterr().err
    assert main(["eval-forgetting", str(d), "--no-plots"]) == 2


def test_nothing_finished_is_all_partial(tmp_path):
    d = tmp_path
    _write(d / "run.json", {"format": "mtpeft-continual-run", "version": 1,
                            "stream": {"name": "s|x", "scenario": "class-il", "tasks": ["t|1", "t2"]},
                            "strategies": ["seqft", "olora"], "seeds": [0], "config": {},
                            "command": "mtpeft continual --name '```'", "baselines": {"majority": {"t2": 0.5}}})
    _write(d / "runs/seqft/seed0/state.json", _state("seqft", 0, [[0.6, None]], None, "class-il", ["t|1", "t2"]))
    r = write_report(d)
    a = r["strategies"]["seqft"]
    assert a["n_finished"] == 0 and all(v is None for v in a["mean"].values()) and a["matrix_mean"] is None
    json.dumps(r, allow_nan=False)  # a cell never evaluated is null, not NaN (which is not JSON)
    assert a["seeds"]["0"]["acc_curve"] == [0.6] and a["seeds"]["0"]["metrics"]["acc"] == pytest.approx(0.6)
    assert r["baselines"]["zero_shot"] == {} and r["baselines"]["zero_shot_acc"] is None
    assert sorted(p.split("/")[-1] for p in r["plots"]) == ["acc_curve.png", "cost_per_task.png", "metrics.png"]
    md = (d / "report.md").read_text()
    assert "| seqft | 0/1 | — | — | — | — | — | — |" in md
    assert "seqft seed 0 (1/2 tasks done, ACC so far 60.0); olora seed 0 (0/2 tasks done, not started)" in md
    assert "t\\|1" in md and "| t|1 |" not in md  # a '|' in a task name cannot break the table
    assert "````sh\nmtpeft continual --name '```'\n````" in md  # the fence outgrows the command's backticks


def test_negative_zero_and_help(capsys):
    from mtpeft.continual.report_md import pp

    assert pp(-0.0001) == "0.0" and pp(-0.0123, 0.004) == "-1.2 ± 0.4" and pp(None, 0.1) == "—"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "eval-forgetting" in capsys.readouterr().out


def test_zero_shot_from_the_untrained_file_before_any_state(tmp_path):
    d = make_run(tmp_path, strategies=("seqft",), seeds=(0, 1))
    for k in (0, 1):
        (d / f"runs/seqft/seed{k}/state.json").unlink()
    _write(d / "untrained/seed0.json", {"tasks": TASKS, "accuracies": [0.3, 0.6, None]})
    b = build_report(d)["baselines"]
    assert b["zero_shot"] == pytest.approx({"a": 0.3, "b": 0.6, "c": None}) and b["zero_shot_seeds"] == 1
    assert b["zero_shot_acc"] == pytest.approx(0.45) and b["zero_shot_std"] is None
    json.dumps(b, allow_nan=False)
    _write(d / "untrained/seed1.json", {"tasks": ["a", "b"], "accuracies": [0.3, 0.6]})
    with pytest.raises(MtpeftError, match=r"seed1.json: not the untrained accuracies .* delete it"):
        build_report(d)


def test_command_not_recorded(tmp_path):
    d = make_run(tmp_path)
    _edit(d / "run.json", command="")
    md = render_markdown(build_report(d))
    assert "was not recorded" in md and "```" not in md
