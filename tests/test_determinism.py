"""Same seed, same results: on CPU, with the same seed and thread count, `mtpeft train` gives bit-identical
module weights (the sha256 of each weights file in the bank) and identical accuracies, with dropout on and
with multitask sampling; a module's weights depend on the run's seed, its name, its task's data and its
config only, not on what the run trained before it. Across processes (a resumed run in a fresh process
against an uninterrupted one) the same holds: see test_crash_resume.py.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from test_cli import write_csv

from mtpeft.bank import read_manifest
from mtpeft.cli import main
from mtpeft.train import default_threads

TASKS = ("ta", "tb", "tc")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return {t: write_csv(d / f"{t}.csv", t, seed=i) for i, t in enumerate(TASKS)}


@pytest.fixture(scope="module")
def train(files, tmp_path_factory):
    """``train(tasks, *flags) -> ({module: sha256}, results without timings)``, each run into a new bank."""

    def run(tasks, *flags):
        bank = tmp_path_factory.mktemp("bank") / "b"
        argv = ["train", "--backbone", "tiny-bert", *[x for t in tasks for x in ("--task-file", f"{t}={files[t]}")],
                "--max-steps", "3", "--batch-size", "8", "--max-examples", "24", "--option", "r=2",
                "--option", "dropout=0.1", "--out", str(bank), "--json", *map(str, flags)]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0
        rows = [{k: v for k, v in r.items() if k != "train_seconds"} for r in json.loads(out.getvalue())["results"]]
        return {e["name"]: e["sha256"] for e in read_manifest(bank)["modules"]}, rows

    return run


@pytest.fixture(scope="module")
def experts(train):
    return train(TASKS, "--seed", 5)


def test_same_seed_bit_identical_experts(train, experts):
    assert train(TASKS, "--seed", 5) == experts


def test_another_seed_other_weights(train, experts):
    """The check above is not blind: the seed reaches every module."""
    sums, _ = train(TASKS, "--seed", 6)
    assert all(sums[n] != experts[0][n] for n in sums)


def test_a_module_does_not_depend_on_what_trained_before(train, experts):
    """tb alone, or after tc, gives the bits it gets after ta in the full run (dropout on: each fit trains in
    train mode whatever the evaluation before it left)."""
    alone, rows_alone = train(["tb"], "--seed", 5)
    after_tc, _ = train(["tc", "tb"], "--seed", 5)
    assert alone["tb-lora"] == after_tc["tb-lora"] == experts[0]["tb-lora"]
    assert after_tc["tc-lora"] == experts[0]["tc-lora"]
    assert rows_alone == [r for r in experts[1] if r["module"] == "tb-lora"]


def test_same_seed_bit_identical_multitask(train):
    first = train(TASKS, "--seed", 5, "--multitask", "--sampling", "temperature")
    assert train(TASKS, "--seed", 5, "--multitask", "--sampling", "temperature") == first


def test_default_threads_keeps_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        default_threads()
        assert torch.get_num_threads() == 1  # the user's count is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        default_threads()
        assert torch.get_num_threads() == 2  # unset: every core
    finally:
        torch.set_num_threads(before)
