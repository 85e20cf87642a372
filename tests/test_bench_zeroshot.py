"""The zero-shot routing speed benchmark runs (--quick, tiny backbone), and its Arrow is peft's Arrow."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_matches_peft_arrow_and_writes_json(tmp_path, monkeypatch):
    pytest.importorskip("peft.tuners.lora.arrow")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_zeroshot_routing as bench

    out = tmp_path / "z.json"
    bench.main(["--quick", "--backbone", "tiny-bert", "--experts", "4", "--batch", "2", "--seq", "8",
                "--threads", "1", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["benchmark"] == "zeroshot_routing" and [r["experts"] for r in d["rows"]] == [4]
    for r in d["rows"]:
        # with the same prototypes, the bank's Arrow top-2 and peft's Arrow give the same hidden states
        assert r["max_abs_diff_vs_peft"] < 1e-5
        assert r["arrow_ms"] > 0 and r["phatgoose_ms"] > 0 and r["peft_arrow_ms"] > 0
    assert {"single_lora", "arrow_E4", "phatgoose_E4", "peft_arrow_E4"} <= set(d["ms"])


def test_report_renders_the_zero_shot_table_and_goals(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    row = {"experts": 32, "arrow_ms": 700.0, "arrow/single": 1.1, "phatgoose_ms": 720.0, "phatgoose/single": 1.3,
           "peft_arrow_ms": 1400.0, "arrow/peft_arrow": 0.5, "max_abs_diff_vs_peft": 0.0}
    d = {"config": {"backbone": "minilm", "batch": 16, "seq": 128, "k": 2, "clock": "cpu", "threads": 1}, "ms": {"single_lora": 636.0},
         "rows": [row], "goals": {"arrow_E32/single <= 1.25": 1.1, "phatgoose_E32/single <= 1.25": 1.3}}
    (tmp_path / "zeroshot_routing.json").write_text(json.dumps(d))
    text = report.render()
    assert "CPU time, 1 thread(s)" in text
    assert "| 32 | 700 | 1.100 | 720 | 1.300 | 1400 | **0.500** | 0 |" in text
    assert "- `arrow_E32/single <= 1.25`: 1.100 (met)" in text
    assert "- `phatgoose_E32/single <= 1.25`: 1.300 (missed)" in text
