"""The few-shot transfer benchmark runs end to end in --quick mode (tiny random BERT, synthetic tasks) and writes
its JSON: method x shots table, parameters, baselines, checks, the reproduce command."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_adapt as bench

    out = tmp_path / "adapt.json"
    d = bench.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["quick"] and saved["reproduce"].startswith("python benchmarks/bench_adapt.py")
    methods, shots = ["scratch", "best-source", "lorahub", "pi-tuning", "poly", "mhr-z", "mhr-mu"], [2, 4]
    assert set(saved["overall"]) == {f"{m}@{k}" for m in methods for k in shots}
    assert saved["overall"]["lorahub@2"]["trainable"] == {"quick_target": 2}  # one weight per expert
    # the skills (2 MHR skills, 2 splits, r 4 on 4 sites) live in the same bank: never source experts
    assert saved["per_target"]["quick_target"]["experts"] == ["quick_src-lora", "quick_flip-lora"]
    assert saved["overall"]["mhr-z@2"]["trainable"] == {"quick_target": 4 * 2 * 2}  # the routing row
    assert saved["overall"]["mhr-mu@2"]["trainable"] == {"quick_target": 1024}  # one r-4 LoRA
    assert saved["overall"]["poly@2"]["trainable"] == {"quick_target": 16 + 2 * 1024}
    assert (tmp_path / "work" / "quick" / "bank" / "routers" / "skills" / "router.json").is_file()
    assert saved["overall"]["scratch@4"]["n"] == 1
    assert set(saved["baselines"]) == {"zero_shot", "majority"}
    S = saved["per_target"]["quick_target"]["similarity"]["k2-seed0"]["matrix"]
    assert len(S) == 3 and all(abs(S[i][i] - 1.0) < 1e-6 for i in range(3))
    table = bench.markdown_table(d)
    assert table.splitlines()[0] == "| method | params | 2 shots | 4 shots |" and "| lorahub | 2 |" in table
    # a second run finds the bank, the embeddings and the runs: nothing is trained again
    again = bench.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert again["overall"] == d["overall"]


def test_report_renders_the_adapt_table(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_adapt as bench

    out = tmp_path / "adapt.json"
    bench.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)])
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    d = json.loads(out.read_text())
    lines = report.adapt_table(d)
    assert lines[2] == "| method | params | 2 shots (mean of 1 tasks) | 4 shots (mean of 1 tasks) |"
    o = d["overall"]["lorahub@2"]
    assert f"| lorahub | 2 | {100 * o['mean']:.1f} ± {100 * o['std']:.1f} |" in "\n".join(lines)
    assert any(line.startswith("| `quick_target` | pi-tuning |") for line in lines)
    assert "- pi-tuning > scratch at 16 shots (mean over targets)" not in "\n".join(lines)  # no 16-shot run here
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert "**Few-shot transfer**" in report.render()
