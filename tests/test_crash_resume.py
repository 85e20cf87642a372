"""Crash trials: `mtpeft train` over three tiny tasks, SIGKILLed at random points, then `--resume`.

20 trials, each its own process killed with SIGKILL: 10 after a random delay (drawn from a seeded RNG over
the length of an uninterrupted run from its first write, the run state's, to its end, so kills land in
training, evaluation and saves alike) and 10 at a crash point (the first, before anything is on disk,
and 9 at random) (``MTPEFT_CRASH_AT=N``: the process kills itself just before or just after the rename
of its Nth atomic write: a module's weights, the bank's manifest, the run state). After each kill: the bank
loads, or is absent when nothing was committed; every module it holds is bit-identical to the one the
uninterrupted run saved; the run state loads; and `--resume` ends with the uninterrupted run's report
(its --json results, timings aside) and a bank whose modules are bit-identical to the uninterrupted run's.
A kill before the run state's first write leaves nothing to resume: `--resume` says so and a plain rerun
gives the same report.

Each run is a real process, forked from a server that has imported torch, Lightning and mtpeft once
(multiprocessing's forkserver): a fresh interpreter per trial would spend most of the test importing.
Where each kill landed is read from the trace the process appends to (``MTPEFT_TRACE``); the counts are
printed (``pytest -s``) and asserted only where they are deterministic (the crash points).
"""
from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing as mp
import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_cli import write_csv
from tqdm import tqdm

SEED = 1414
N_TIMED, N_POINTS = 10, 10
TASKS = ("ta", "tb", "tc")
PRELOAD = ["torch", "lightning", "transformers", "datasets", "mtpeft.cli", "mtpeft.cli.train", "mtpeft.api",
           "mtpeft.train", "mtpeft.lightning", "mtpeft.runstate", "mtpeft.bank", "mtpeft.suite", "mtpeft.scorer"]


def _child(argv, env, out):
    """The body of one run's process: ``mtpeft ARGV`` with stdout and stderr to files; exit with its code."""
    os.environ.update(env, OMP_NUM_THREADS="1")  # every run at one thread: the same count, and quick
    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock: a kill would leak its semaphore
    from mtpeft.cli import main

    with open(out + ".out", "w", encoding="utf-8") as o, open(out + ".err", "w", encoding="utf-8") as e, \
            contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(argv)
    sys.exit(rc)


def _nothing():
    pass


@pytest.fixture(scope="module")
def server():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    warm = ctx.Process(target=_nothing)  # start the server (its imports) before anything is timed
    warm.start()
    warm.join()
    return ctx


@pytest.fixture(scope="module")
def task_args(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    out = []
    for i, name in enumerate(TASKS):
        out += ["--task-file", f"{name}={write_csv(d / f'{name}.csv', name, seed=i)}"]
    return out


def train_argv(task_args, bank, *extra):
    return ["train", "--backbone", "tiny-bert", *task_args, "--max-steps", "2", "--batch-size", "8",
            "--max-examples", "24", "--option", "r=2", "--option", "dropout=0.1", "--seed", "7",
            "--out", str(bank), "--json", *extra]


class Proc:
    """One `mtpeft` process from the fork server (``kill_at``: crash point; ``trace``: where it writes)."""

    def __init__(self, server, argv, out: Path, kill_at: int | None = None):
        self.out, self.trace = str(out), str(out) + ".trace"
        env = {"MTPEFT_TRACE": self.trace}
        if kill_at is not None:
            env["MTPEFT_CRASH_AT"] = str(kill_at)
        self.p = server.Process(target=_child, args=(list(argv), env, self.out))
        self.t0 = time.perf_counter()
        self.p.start()

    def wait(self, timeout: float | None = None) -> int | None:
        self.p.join(timeout)
        return self.p.exitcode

    def started(self) -> float:
        """Wait until the run has written its first trace line (its run state); seconds since the start."""
        while not Path(self.trace).exists() and self.p.exitcode is None:
            time.sleep(0.005)
        return time.perf_counter() - self.t0

    def kill_after(self, delay: float) -> int:
        self.started()
        if self.wait(delay) is None:
            self.p.kill()  # SIGKILL
        return self.wait()

    def stdout(self) -> str:
        return Path(self.out + ".out").read_text(encoding="utf-8")

    def stderr(self) -> str:
        return Path(self.out + ".err").read_text(encoding="utf-8")

    def trace_lines(self) -> list[str]:
        p = Path(self.trace)
        return p.read_text(encoding="utf-8").splitlines() if p.exists() else []


def results(text: str) -> list[dict]:
    """The --json results without timings."""
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in json.loads(text)["results"]]


def module_sums(bank: Path) -> dict[str, str]:
    from mtpeft.bank import read_manifest

    return {e["name"]: e["sha256"] for e in read_manifest(bank)["modules"]}


def landed(trace: list[str], rc) -> str:
    """Which phase of the run the kill hit, from the last line of its trace."""
    if rc == 0:
        return "finished before the kill"
    if not trace:
        return "startup (before the run state)"
    last = trace[-1].split()
    if last[0] == "point":
        return "saving run state" if last[3].startswith("runs/") else "saving bank"
    return {"train": "training", "evaluate": "evaluating", "save": "saving bank", "state": "saving run state",
            "done": "reporting"}[last[1]]


def test_crash_trials(server, task_args, tmp_path):
    from mtpeft.api import open_bank
    from mtpeft.runstate import RUNS, read_state

    ref = Proc(server, train_argv(task_args, tmp_path / "ref"), tmp_path / "ref")
    t_first = ref.started()
    assert ref.wait() == 0, ref.stderr()
    ref_wall = time.perf_counter() - ref.t0 - t_first  # from its first write (the run state) to its end
    want, want_sums = results(ref.stdout()), module_sums(tmp_path / "ref")
    assert [r["module"] for r in want] == [f"{t}-lora" for t in TASKS]
    n_points = sum(line.startswith("point ") for line in ref.trace_lines())
    assert n_points >= 20  # a weights file, the manifest and the run state per module, twice each

    rng = random.Random(SEED)
    plan = [("delay", rng.uniform(0.0, ref_wall)) for _ in range(N_TIMED)]
    # crash point 1 (before the first rename: nothing on disk yet) always, the others at random
    plan += [("point", n) for n in [1, *sorted(rng.sample(range(2, n_points + 1), N_POINTS - 1))]]
    phases, outcomes = collections.Counter(), collections.Counter()
    for i, (how, at) in enumerate(plan):
        bank = tmp_path / f"bank{i}"
        argv = train_argv(task_args, bank)
        run = Proc(server, argv, tmp_path / f"run{i}", kill_at=at if how == "point" else None)
        rc = run.kill_after(at) if how == "delay" else run.wait()
        if how == "point":
            assert rc == -9, (at, rc, run.stderr())  # every crash point is reached: the kill is certain
        assert rc in (0, -9), run.stderr()
        phase = landed(run.trace_lines(), rc)
        phases[phase] += 1

        # what survived the kill: a loadable bank (or none), holding only the reference's modules, bit for bit
        if (bank / "manifest.json").exists():
            sums = module_sums(bank)
            assert sums == {n: want_sums[n] for n in sums}, (i, phase)
            loaded, _ = open_bank(bank)
            assert loaded.names == list(sums)
            survived = f"bank with {len(sums)} module(s)"
        else:
            survived = "no bank yet"
        states = sorted((bank / RUNS).glob("*.json")) if (bank / RUNS).is_dir() else []
        for s in states:
            read_state(s)  # loads and validates
        outcomes[f"{survived}, {'a run state' if states else 'no run state'}"] += 1

        again = Proc(server, [*argv, "--resume"], tmp_path / f"resume{i}")
        rc2 = again.wait()
        if not states:  # killed before the run state's first write: nothing to resume, a plain run starts over
            assert rc2 == 2 and "no unfinished run to resume" in again.stderr(), again.stderr()
            again = Proc(server, argv, tmp_path / f"rerun{i}")
            rc2 = again.wait()
        assert rc2 == 0, (i, phase, again.stderr())
        assert results(again.stdout()) == want, (i, phase)
        assert module_sums(bank) == want_sums, (i, phase)
        (final,) = sorted((bank / RUNS).glob("*.json"))
        assert read_state(final)["status"] == "finished"

    # the crash points are deterministic: saves of the bank and of the run state are both hit
    assert phases["saving bank"] >= 1 and phases["saving run state"] >= 1, phases
    print(f"\ncrash trials: {len(plan)} ({N_TIMED} timed over the {ref_wall:.1f} s after the first write, {N_POINTS} at crash points of "
          f"{n_points}); phase hit: {dict(phases)}; left after the kill: {dict(outcomes)}; "
          f"all {len(plan)} resumed to the uninterrupted report")
