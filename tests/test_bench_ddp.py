"""The 1-vs-2-process training benchmark runs (--quick: tiny-bert) and writes its figures."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.processes
def test_quick_run_times_one_and_two_processes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    import bench_ddp as bench

    out = tmp_path / "ddp.json"
    bench.main(["--quick", "--configs", "1proc_1thread", "2proc_1thread", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["benchmark"] == "ddp" and d["config"]["backbone"] == "tiny-bert"
    assert d["config"]["cores"] >= 1 and d["config"]["global_batch"] == 16
    rows = {r["config"]: r for r in d["rows"]}
    assert set(rows) == {"1proc_1thread", "2proc_1thread"}
    assert rows["2proc_1thread"]["processes"] == 2
    for r in rows.values():  # both timed the same optimiser steps of the same global batch
        assert r["steps_timed"] == [d["config"]["steps"] - d["config"]["warmup"]]
        assert r["steps_per_s"] > 0
    assert set(d["speedups"]) == {"2proc_1thread/1proc_1thread"}
