"""A continual run on two processes (Lightning DDP, gloo on CPU) gives the report of one process: every fit
of every strategy on the same global batches (replay's too: new examples and replayed ones, each rank its
slice), the replay memory the same on every rank, the accuracy matrix sharded (each rank scores its share),
rank zero alone writing. These tests start
real processes (`python -m mtpeft continual --devices 2`)."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from continual_util import task_specs
from ddp_util import run_mtpeft

pytestmark = pytest.mark.processes

STRATEGIES = "seqft,expert-oracle,replay,joint"


def _config(tmp: Path) -> Path:
    conf = {"backbone": "tiny-bert", "tasks": task_specs(tmp)[:2], "scenario": "task-il", "max_steps": 12,
            "max_epochs": 10, "lr": 0.05, "batch_size": 8, "patience": 10, "max_train": None, "max_eval": None,
            "options": {"r": 4, "alpha": 8}, "seeds": [0]}
    path = tmp / "c.json"
    path.write_text(json.dumps(conf))
    return path


def _continual(tmp: Path, out: Path, *flags: str, env: dict | None = None, strategies: str = STRATEGIES
               ) -> subprocess.CompletedProcess:
    return run_mtpeft(["continual", "--config", _config(tmp), "--out", out, "--compare", strategies,
                       "--accelerator", "cpu", "--json", *flags], tmp, env, timeout=1800)


def _files(out: Path) -> list[str]:
    """The run directory's files, weight files without their content hash, logs left out."""
    return sorted(re.sub(r"\.[0-9a-f]{16}\.safetensors$", ".safetensors", str(p.relative_to(out)))
                  for p in out.rglob("*") if p.is_file() and "logs" not in p.parts)


def test_two_processes_give_the_report_of_one(tmp_path):
    one = _continual(tmp_path, tmp_path / "one")
    two = _continual(tmp_path, tmp_path / "two", "--devices", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # one report: rank zero's
    assert set(r1["strategies"]) == set(r2["strategies"]) == set(STRATEGIES.split(","))
    for s in r1["strategies"]:
        m1, m2 = r1["strategies"][s], r2["strategies"][s]
        for k, v in m1["mean"].items():  # accuracies over 16 test examples: at most one may flip
            assert (v is None) == (m2["mean"][k] is None), (s, k)
            if v is not None:
                assert abs(v - m2["mean"][k]) <= 1 / 16 + 1e-9, (s, k, v, m2["mean"][k])
    for s in ("seqft", "expert-oracle", "replay"):
        st1, st2 = (json.loads((tmp_path / d / "runs" / s / "seed0" / "state.json").read_text()) for d in ("one", "two"))
        assert [t["steps"] for t in st1["timings"]] == [t["steps"] for t in st2["timings"]] == [12, 12]
        # the evaluation is sharded, not repeated: rank zero scored half of what one process scored (16 test
        # examples a task, 8 each), and every cell was evaluated (seqft's change after every task)
        n1, n2 = ([t["eval_examples"] for t in st["timings"]] for st in (st1, st2))
        assert all(a > 0 and a == 2 * b for a, b in zip(n1, n2, strict=True)), (s, n1, n2)
        for a, b in zip(st1["matrix"]["R"], st2["matrix"]["R"], strict=True):
            assert all(abs(x - y) <= 1 / 16 + 1e-9 for x, y in zip(a, b, strict=True)), (s, a, b)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")  # rank zero wrote what one process writes


def test_conpet_strategies_on_two_processes_give_the_report_of_one(tmp_path):
    """ConPET's strategies: the experts and conpet-static's shared module train by DDP; the k-means memory and
    conpet-dynamic's selector (a short plain loop over the memory) are computed whole on every rank, the same
    seeded computation; the report is one process's."""
    strategies = "conpet-static,conpet-dynamic"
    one = _continual(tmp_path, tmp_path / "one", strategies=strategies)
    two = _continual(tmp_path, tmp_path / "two", "--devices", "2", strategies=strategies)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)
    assert set(r1["strategies"]) == set(r2["strategies"]) == set(strategies.split(","))
    for s in r1["strategies"]:
        st1, st2 = (json.loads((tmp_path / d / "runs" / s / "seed0" / "state.json").read_text()) for d in ("one", "two"))
        assert [t["steps"] for t in st1["timings"]] == [t["steps"] for t in st2["timings"]]
        for a, b in zip(st1["matrix"]["R"], st2["matrix"]["R"], strict=True):
            assert all(abs(x - y) <= 1 / 16 + 1e-9 for x, y in zip(a, b, strict=True)), (s, a, b)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_a_failing_rank_leaves_the_last_finished_task_for_resume(tmp_path):
    """Rank 1 fails in seqft's second task (its 18th step: 12 per task): the command fails naming it, the
    state holds the first task, finished; --resume on one process ends with the uninterrupted run's report."""
    out = tmp_path / "run"
    bad = _continual(tmp_path, out, "--devices", "2", strategies="seqft", env={"MTPEFT_FAIL_RANK": "1:18"})
    assert bad.returncode != 0
    assert "rank 1 of 2 stopped: InjectedFault" in bad.stderr, bad.stderr[-3000:]
    assert "--resume finishes the run" in bad.stderr
    state = json.loads((out / "runs" / "seqft" / "seed0" / "state.json").read_text())
    assert state["done"] == 1 and not state["finished"] and len(state["matrix"]["R"]) == 1
    good = _continual(tmp_path, out, "--resume", strategies="seqft")
    assert good.returncode == 0, good.stderr[-3000:]
    ref = _continual(tmp_path, tmp_path / "ref", strategies="seqft")
    r, want = (json.loads(p.stdout)["strategies"]["seqft"]["mean"] for p in (good, ref))
    for k, v in want.items():
        assert (v is None) == (r[k] is None) and (v is None or abs(v - r[k]) <= 1 / 16 + 1e-9), (k, v, r[k])


def test_the_global_batch_must_split_evenly(tmp_path, capsys):
    from mtpeft.cli import main

    out = tmp_path / "o"
    assert main(["continual", "--config", str(_config(tmp_path)), "--out", str(out), "--devices", "3"]) == 2
    assert "batch_size 8 is the global batch" in capsys.readouterr().err
    # the same from the config (devices: 3); a bad value there is named
    conf = json.loads(_config(tmp_path).read_text())
    (tmp_path / "c3.json").write_text(json.dumps({**conf, "devices": 3}))
    assert main(["continual", "--config", str(tmp_path / "c3.json"), "--out", str(out)]) == 2
    assert "with 3 processes" in capsys.readouterr().err
    (tmp_path / "c0.json").write_text(json.dumps({**conf, "devices": 0}))
    assert main(["continual", "--config", str(tmp_path / "c0.json"), "--out", str(out)]) == 2
    assert "'devices' is 0; give a positive integer" in capsys.readouterr().err
    assert not out.exists()
