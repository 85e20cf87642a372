"""The skills benchmark runs (--quick, tiny backbone, synthetic task files), resumes and aggregates over seeds."""
import json
from pathlib import Path

from conftest import synthetic_task
from test_mpt_distil import write_task

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_the_report_and_resumes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_skills

    specs = [write_task(tmp_path, synthetic_task(n, n=24, seed=i)) for i, n in enumerate(("s1", "s2"))]
    out = tmp_path / "skills.json"
    argv = ["--quick", "--tasks", *specs, "--splits", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    d = bench_skills.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(d))
    assert d["benchmark"] == "skills" and d["quick"] and d["reproduce"].startswith("python benchmarks/bench_skills.py")
    by = d["by_contender"]
    assert list(by) == ["poly", "mhr", "shared", "experts"]
    for c, agg in by.items():
        (run,) = [r for r in d["runs"] if r["contender"] == c]
        assert sorted(run["accuracy"]) == ["s1", "s2"] and agg["mean_accuracy"]["mean"] == run["mean_accuracy"]
    # equal total steps; parameters: 3 skills (+ logits) vs one module vs one per task
    one = by["shared"]["trainable_parameters"]
    assert by["experts"]["trainable_parameters"] == 2 * one
    assert by["poly"]["trainable_parameters"] == 3 * one + 4 * 2 * 3  # 4 sites x 2 tasks x 3 skills of logits
    assert by["mhr"]["trainable_parameters"] == 3 * one + 4 * 2 * 2 * 3
    assert by["poly"]["steps"] == by["shared"]["steps"] == by["experts"]["steps"] == 4
    # the baselines beside them: the majority class of each task as loaded for the seed, the bare backbone
    from mtpeft.api import load_bank_or_new
    from mtpeft.suite import load_task
    from mtpeft.train import evaluate

    (base,) = d["baseline_runs"]
    bank, scorer = load_bank_or_new("tiny-bert")
    for spec in specs:
        t = load_task(spec, max_examples=24, seed=0)
        assert base["majority"][t.name] == round(t.majority_baseline("test"), 4)
        assert base["zero_shot"][t.name] == round(evaluate(bank, scorer, t)["accuracy"], 4)
    assert d["baselines"]["majority"]["mean_accuracy"]["mean"] == round(sum(base["majority"].values()) / 2, 4)
    # a second call reuses the finished runs (no training: the same numbers, to the second)
    again = bench_skills.main(argv)
    assert again["runs"] == d["runs"] and again["baseline_runs"] == d["baseline_runs"]


def test_aggregate_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_skills

    runs = [{"contender": "poly", "seed": s, "accuracy": {"a": acc, "b": 0.5}, "mean_accuracy": (acc + 0.5) / 2,
             "trainable_parameters": 10, "steps": 4, "train_seconds": 1.0} for s, acc in enumerate((0.7, 0.8, 0.9))]
    agg = bench_skills.aggregate(runs)["poly"]
    assert agg["per_task"]["a"] == {"mean": 0.8, "std": 0.1, "n": 3}
    assert agg["mean_accuracy"] == {"mean": 0.65, "std": 0.05, "n": 3}
