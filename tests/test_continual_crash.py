"""Crash trials of a continual run: `mtpeft continual` (replay and olora on a class-incremental tiny stream)
SIGKILLed at random times and at crash points (the atomic writes of the run file, the untrained row, each
checkpoint's bank and memory files and each state, and the points before and after each task's training),
then `--resume`: every trial ends with the uninterrupted run's accuracy matrices, exactly.

The processes come from a fork server (see test_crash_resume.py, whose helpers this reuses)."""
from __future__ import annotations

import collections
import json
import random
import time

from continual_util import tiny_config
from test_crash_resume import Proc, server  # noqa: F401  (the fork-server fixture)

SEED = 2718
N_TIMED, N_POINTS = 4, 5


def argv(cfg, out, *extra):
    return ["continual", "--config", str(cfg), "--out", str(out), "--compare", "replay,olora", "--json", *extra]


def matrices(out) -> dict:
    rep = json.loads((out / "report.json").read_text())
    return {s: v["seeds"]["0"]["matrix"]["R"] for s, v in rep["strategies"].items()}


def where(trace: list[str], rc) -> str:
    if rc == 0:
        return "finished before the kill"
    if not trace:
        return "startup"
    last = trace[-1]
    if "before training" in last or "continual-train" in last:
        return "inside a task (training)"
    if "trained" in last:
        return "inside a task (after training)"
    if "state.json" in last:
        return "saving a state"
    if "continual-save" in last or any(k in last for k in ("bank/", "modules/", "memory/", "artifacts/")):
        return "saving a checkpoint"
    return "other writes (run file, untrained row, report)"


def test_continual_crash_trials(server, tmp_path):  # noqa: F811
    conf = tiny_config(tmp_path / "tasks", "class-il", max_steps=8, memory={"capacity": 12, "policy": "reservoir"},
                       options={"r": 2, "alpha": 4, "dropout": 0.1})
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(conf))
    ref = Proc(server, argv(cfg, tmp_path / "ref"), tmp_path / "ref")
    t_first = ref.started()
    assert ref.wait() == 0, ref.stderr()
    wall = time.perf_counter() - ref.t0 - t_first
    want = matrices(tmp_path / "ref")
    assert set(want) == {"replay", "olora"} and all(len(r) == 3 for r in want.values())
    n_points = sum(line.startswith("point ") for line in ref.trace_lines())
    assert n_points >= 20

    rng = random.Random(SEED)
    plan = [("delay", rng.uniform(0.0, wall)) for _ in range(N_TIMED)]
    training_points = [int(line.split()[1]) for line in ref.trace_lines()
                       if line.startswith("point ") and "before training" in line]
    plan += [("point", rng.choice(training_points)),  # a kill inside a task, certainly
             *[("point", n) for n in sorted(rng.sample(range(1, n_points + 1), N_POINTS - 1))]]
    landed = collections.Counter()
    for i, (how, at) in enumerate(plan):
        out = tmp_path / f"out{i}"
        run = Proc(server, argv(cfg, out), tmp_path / f"run{i}", kill_at=at if how == "point" else None)
        rc = run.kill_after(at) if how == "delay" else run.wait()
        if how == "point":
            assert rc == -9, (at, rc, run.stderr())
        assert rc in (0, -9), run.stderr()
        landed[where(run.trace_lines(), rc)] += 1
        again = Proc(server, argv(cfg, out, "--resume"), tmp_path / f"resume{i}")
        assert again.wait() == 0, (i, how, at, again.stderr())
        assert matrices(out) == want, (i, how, at)
    assert landed["inside a task (training)"] >= 1, landed
    print(f"\ncontinual crash trials: {len(plan)} ({N_TIMED} timed over {wall:.1f} s, {N_POINTS} at crash points of "
          f"{n_points}); landed: {dict(landed)}; all resumed to the uninterrupted matrices")
