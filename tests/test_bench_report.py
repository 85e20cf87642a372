"""The README's results block is rendered from the benchmark JSON (benchmarks/report.py)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def report(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    return mod


def _experts(rows):
    return {"config": {"max_train": 10, "max_steps": 5, "batch_size": 4, "lr": 0.01},
            "rows": rows, "expert_beats_zero_shot": "1/1"}


def test_tables_come_from_the_json(report):
    row = {"task": "t1", "n": 7, "labels": 3, "majority": 0.5, "zero_shot": 0.25, "expert": 0.875, "train_s": 3.0}
    (report.RESULTS / "experts_minilm_lora.json").write_text(json.dumps(_experts([row])))
    text = report.render()
    assert "| `t1` | 7 | 3 | 50.0 | 25.0 | **87.5** | 3 |" in text
    assert "Training step" not in text  # no train JSON, no table


def test_goals_say_met_or_missed(report):
    inf = {"goals": {"a/b <= 1.3": 1.4, "c/d < 1": 0.9}}
    lines = report.goals([], inf)
    assert "- `a/b <= 1.3`: 1.400 (missed)" in lines
    assert "- `c/d < 1`: 0.900 (met)" in lines


def test_readme_block_is_replaced_between_markers_only(report):
    readme = report.ROOT / "README.md"
    readme.write_text(f"head\n{report.START}\nold\n{report.END}\ntail\n")
    report.write_readme("new table")
    assert readme.read_text() == f"head\n{report.START}\nnew table\n{report.END}\ntail\n"


def test_readme_without_markers_is_refused_and_kept(report):
    readme = report.ROOT / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        report.write_readme("x")
    assert readme.read_text() == "no markers here\n"


def test_broken_json_names_the_file(report):
    (report.RESULTS / "inference.json").write_text("{not json")
    with pytest.raises(SystemExit, match="inference.json is not valid JSON"):
        report.render()


def test_route_table_mean_and_std_over_seeds(report):
    ms = lambda m, s: {"mean": m, "std": s, "runs": []}
    d = {"command": "python benchmarks/bench_route.py --config c.yaml", "seeds": [0, 1, 2],
         "config": {"backbone": "minilm", "options": {"r": 8}, "experts": ["e1"], "max_train": 10, "max_steps": 5,
                    "max_test": 7},
         "tasks": [{"task": "h1"}],
         "accuracy": {"arrow": {"h1": ms(0.5, 0.01), "average": ms(0.5, 0.01)},
                      "zero-shot": {"h1": ms(0.25, 0.0), "average": ms(0.25, 0.0)}},
         "tweet_share": {"arrow": {"h1": ms(0.9, 0.05)}}}
    (report.RESULTS / "route_heldout.json").write_text(json.dumps(d))
    text = report.render()
    assert "| zero-shot | 25.0 ± 0.0 | 25.0 ± 0.0 |" in text
    assert text.index("| zero-shot") < text.index("| arrow")  # the table's order, not the file's
    assert "arrow h1 90%" in text and "seeds 0, 1, 2" in text
