"""The MPT benchmark runs (--quick, tiny backbone, synthetic task files) and aggregates over seeds."""
import json
from pathlib import Path

from conftest import synthetic_task
from test_mpt_distil import write_task

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_mpt

    specs = [write_task(tmp_path, synthetic_task(n, n=24, seed=i)) for i, n in enumerate(("s1", "s2", "t1"))]
    out = tmp_path / "mpt.json"
    bench_mpt.main(["--quick", "--sources", *specs[:2], "--targets", specs[2], "--work", str(tmp_path / "work"),
                    "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["benchmark"] == "mpt" and d["quick"] and [r["backbone"] for r in d["runs"]] == ["tiny-bert"]
    (run,) = d["runs"]
    assert [r["task"] for r in run["sources"]] == ["s1", "s2"] and [r["task"] for r in run["targets"]] == ["t1"]
    agg = d["by_backbone"]["tiny-bert"]
    assert agg["student_mean"]["mean"] == run["summary"]["student_mean"] and agg["student_mean"]["n"] == 1
    assert agg["goals"]["student/teacher parameters per task <= 0.1"] is (
        run["parameters"]["student_over_teacher"] <= 0.1)
    assert (tmp_path / "work" / "tiny-bert" / "seed0" / "bank" / "manifest.json").is_file()
    assert d["complete"] is True
    # the baselines beside every row: the majority class of the same capped test split, and the bare backbone
    from mtpeft.suite import load_task

    for r, spec in zip(run["sources"], specs[:2]):
        assert r["majority"] == round(load_task(spec, max_examples=24, seed=0).majority_baseline("test"), 4)
        assert isinstance(r["zero_shot"], float)
    assert agg["majority_mean"]["mean"] == run["summary"]["majority_mean"]


def test_aggregate_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_mpt

    params = {"student_over_teacher": 0.05}
    runs = [{"backbone": "minilm", "parameters": params,
             "summary": {"teacher_mean": 0.8, "student_mean": s, "student_over_teacher": s / 0.8,
                         "target_mpt_mean": 0.6, "target_prompt_mean": 0.5}} for s in (0.78, 0.8, 0.82)]
    agg = bench_mpt.aggregate(runs)["minilm"]
    assert agg["student_mean"] == {"mean": 0.8, "std": 0.02, "n": 3}
    assert agg["goals"] == {"student/teacher accuracy >= 0.97": True,
                            "student/teacher parameters per task <= 0.1": True,
                            "target MPT > prompt tuning from scratch": True}
