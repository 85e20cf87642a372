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


def test_mpt_table_means_over_seeds(report):
    """The MPT table: per task mean ± std over the seeds' runs, the baselines beside, the goals said."""
    def run(seed, teacher, student):
        src = [{"task": "a", "teacher": teacher, "student": student, "prompt_eq": 0.5, "zero_shot": 0.2, "majority": 0.4}]
        tgt = [{"task": "h", "mpt": 0.7, "prompt_scratch": 0.6, "zero_shot": 0.1, "majority": 0.3}]
        summ = {"teacher_mean": teacher, "student_mean": student, "prompt_eq_mean": 0.5, "zero_shot_mean": 0.2,
                "majority_mean": 0.4, "target_mpt_mean": 0.7, "target_prompt_mean": 0.6, "target_zero_shot_mean": 0.1,
                "target_majority_mean": 0.3, "student_over_teacher": student / teacher}
        return {"backbone": "minilm", "seed": seed, "max_examples": 400, "sources": src, "targets": tgt,
                "summary": summ}
    params = {"teacher_per_task": 7680, "student_per_task": 404, "student_over_teacher": 0.0526, "shared_prompt": 7680}
    runs = [run(0, 0.8, 0.78), run(1, 0.8, 0.80), run(2, 0.8, 0.82)]
    by = {"minilm": {"parameters": params, "student_over_teacher": {"mean": 1.0},
                     "goals": {"student/teacher accuracy >= 0.97": True, "target MPT > prompt tuning from scratch": False}}}
    cfg = {"n_tokens": 20, "rank": 1, "teacher": {"max_steps": 150}, "student": {"max_steps": 300, "batch_size": 16},
           "target": {"max_steps": 100, "init": "average"}}
    (report.RESULTS / "mpt.json").write_text(json.dumps({"config": cfg, "command": "python benchmarks/bench_mpt.py",
                                                         "complete": False, "by_backbone": by, "runs": runs}))
    text = report.render()
    assert "| `a` | 80.0 ± 0.0 | 80.0 ± 2.0 | 50.0 ± 0.0 | 20.0 ± 0.0 | 40.0 ± 0.0 |" in text
    assert "| `h` | 70.0 ± 0.0 | 60.0 ± 0.0 | 10.0 ± 0.0 | 30.0 ± 0.0 |" in text
    assert "seeds 0, 1, 2" in text and "PARTIAL" in text
    assert "student/teacher accuracy >= 0.97: met" in text and "target MPT > prompt tuning from scratch: missed" in text
    assert "capped" not in text and "the teacher's recipe" not in text
    # a capped run whose equal-steps baseline is the teacher: both said in its section
    for r in runs:
        r["max_steps_cap"] = 40
        r["sources"][0].update(prompt_eq_steps=40, prompt_eq_is_teacher=True)
    (report.RESULTS / "mpt.json").write_text(json.dumps({"config": cfg, "command": "python benchmarks/bench_mpt.py",
                                                         "complete": True, "by_backbone": by, "runs": runs}))
    text = report.render()
    assert "capped: every per-task fit ≤40 steps, the student ≤40 per source)" in text
    assert "prompt tuning at equal steps (40 steps: the teacher's recipe)" in text


def test_ddp_line_gives_each_configuration_against_one_process(report):
    rows = [{"config": "1proc_1thread", "processes": 1, "threads_per_process": 1, "steps_per_s": 0.5},
            {"config": "2proc_1thread", "processes": 2, "threads_per_process": 1, "steps_per_s": 0.9}]
    d = {"config": {"backbone": "minilm", "global_batch": 16, "strategy": "ddp (gloo)", "cores": 2, "repeats": 3},
         "rows": rows}
    (report.RESULTS / "ddp.json").write_text(json.dumps(d))
    text = report.render()
    assert "1 process x 1 thread 0.50 steps/s (1.00x)" in text
    assert "2 processes x 1 thread 0.90 steps/s (1.80x)" in text


def test_skills_table_means_over_seeds_with_the_baselines(report):
    """The skills table: per contender the mean over tasks and each task, mean ± std over seeds; baselines beside."""
    stat = lambda m, sd: {"mean": m, "std": sd, "n": 3}
    by = {"poly": {"mean_accuracy": stat(0.75, 0.02), "per_task": {"a": stat(0.8, 0.01), "b": stat(0.7, 0.03)},
                   "trainable_parameters": 590688, "steps": 540},
          "experts": {"mean_accuracy": stat(0.76, 0.0), "per_task": {"a": stat(0.81, 0.0), "b": stat(0.71, 0.0)},
                      "trainable_parameters": 663552, "steps": 540}}
    base = {"majority": {"mean_accuracy": stat(0.4, 0.0), "per_task": {"a": stat(0.5, 0.0), "b": stat(0.3, 0.0)}}}
    d = {"settings": {"backbone": "minilm", "options": {"r": 8}, "skills": 8, "max_steps": 540, "max_examples": 400},
         "mhr_splits": 4, "reproduce": "python benchmarks/bench_skills.py", "by_contender": by, "baselines": base,
         "runs": [{"seed": s} for s in (0, 1, 2)]}
    (report.RESULTS / "skills.json").write_text(json.dumps(d))
    text = report.render()
    assert "| poly | 590,688 | 75.0 ± 2.0 | 80.0 ± 1.0 | 70.0 ± 3.0 |" in text
    assert "| majority | 0 | 40.0 ± 0.0 | 50.0 ± 0.0 | 30.0 ± 0.0 |" in text
    assert "seeds 0, 1, 2" in text and "540 // 2 per expert" in text
