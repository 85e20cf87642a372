"""One writer at a time per bank, and saves that apply only their own changes: two trains into one bank, `bank rm`
during a train, two bank objects loaded from one directory, conflicts, and incremental writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_cli import error_of, run_json, write_csv

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank, locked, remove_saved_module
from mtpeft.errors import MtpeftError


def names_on_disk(d):
    return [e["name"] for e in json.loads((d / "manifest.json").read_text())["modules"]]


def _bank(d, *names):
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    for i, n in enumerate(names):
        bank.add(n, "lora", {"r": 2}, seed=i)
    bank.save(d)
    return bank


def _load(d):
    return ModuleBank.load(d, load_backbone("tiny-bert", seed=0))


def _nudge(bank, name, v=0.5):
    with torch.no_grad():
        for p in bank.module_parameters(name).values():
            p.add_(v)
    for _, s in bank.stacks_of(name):
        s.invalidate()


# ---- two bank objects on one directory -----------------------------------------------------------

def test_two_banks_loaded_from_one_dir_each_adding_a_module_keep_both(tmp_path):
    d = tmp_path / "b"
    _bank(d, "m0")
    x, y = _load(d), _load(d)
    x.add("mx", "lora", {"r": 2})
    y.add("my", "ia3")
    x.save(d)
    y.save(d)
    assert names_on_disk(d) == ["m0", "mx", "my"]
    z = _load(d)
    assert z.names == ["m0", "mx", "my"]
    for n, src in (("mx", x), ("my", y)):  # each module's weights are those its writer saved
        got, want = z.module_parameters(n), src.module_parameters(n)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_module_removed_elsewhere_stays_removed_and_changes_elsewhere_are_kept(tmp_path):
    d = tmp_path / "b"
    _bank(d, "m0", "m1", "m2")
    mine, other = _load(d), _load(d)
    other.remove("m0")
    _nudge(other, "m1")
    other.save(d)
    mine.add("m3", "lora", {"r": 2})
    mine.save(d)  # mine left m0 and m1 as loaded: the other writer's removal and change stand
    assert names_on_disk(d) == ["m1", "m2", "m3"]
    got = _load(d).module_parameters("m1")
    assert all(torch.equal(got[k], v) for k, v in other.module_parameters("m1").items())


def test_my_removal_is_applied_and_my_change_wins_where_nobody_else_changed(tmp_path):
    d = tmp_path / "b"
    _bank(d, "m0", "m1")
    mine, other = _load(d), _load(d)
    other.add("o", "lora", {"r": 2})
    other.save(d)
    mine.remove("m0")
    _nudge(mine, "m1")
    mine.record("m1").metrics["acc"] = 0.9
    mine.save(d)
    assert names_on_disk(d) == ["m1", "o"]
    m1 = next(e for e in json.loads((d / "manifest.json").read_text())["modules"] if e["name"] == "m1")
    assert m1["metrics"] == {"acc": 0.9}


@pytest.mark.parametrize("case", ["both changed", "changed here, removed there", "removed here, changed there",
                                  "added on both sides"])
def test_a_real_conflict_is_refused_and_nothing_is_saved(case, tmp_path):
    d = tmp_path / "b"
    _bank(d, "m0")
    mine, other = _load(d), _load(d)
    if case == "added on both sides":
        other.add("new", "lora", {"r": 2}, seed=1)
        mine.add("new", "lora", {"r": 2}, seed=2)
    else:
        other.remove("m0") if "removed there" in case else _nudge(other, "m0", 1.0)
        mine.remove("m0") if "removed here" in case else _nudge(mine, "m0", 2.0)
    other.save(d)
    before = (d / "manifest.json").read_bytes()
    with pytest.raises(MtpeftError, match=r"by another writer and (changed|removed) here .*nothing was saved.*"
                                          r"Load the bank again"):
        mine.save(d)
    assert (d / "manifest.json").read_bytes() == before


def test_saving_a_fresh_bank_into_an_existing_bank_keeps_its_modules(tmp_path):
    d = tmp_path / "b"
    _bank(d, "theirs")
    fresh = ModuleBank(load_backbone("tiny-bert", seed=0))
    fresh.add("ours", "ia3")
    fresh.save(d)  # this used to replace the bank: 'theirs' was gone, its file deleted
    assert names_on_disk(d) == ["theirs", "ours"]
    clash = ModuleBank(load_backbone("tiny-bert", seed=0))
    clash.add("theirs", "lora", {"r": 2}, seed=5)
    with pytest.raises(MtpeftError, match="module 'theirs' was added by another writer"):
        clash.save(d)


def test_unchanged_modules_are_not_rewritten(tmp_path, monkeypatch):
    d = tmp_path / "b"
    bank = _bank(d, "m0", "m1")
    again = _load(d)
    again.add("m2", "lora", {"r": 2})
    from mtpeft import io

    written = []
    real = io._atomic
    monkeypatch.setattr(io, "_atomic", lambda path, write: (written.append(path.name), real(path, write)))
    again.save(d)
    assert len(written) == 2 and written[-1] == "manifest.json" and written[0].startswith("m2.")
    written.clear()
    bank.save(d)  # a bank object that saved before: same content, same bytes, nothing but the manifest
    assert written == ["manifest.json"]


# ---- the lock ------------------------------------------------------------------------------------

HOLD = """
import sys, time
from mtpeft.bank import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(d):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=os.getcwd())
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_every_writer_is_refused_while_another_process_holds_the_bank(tmp_path, holder, capsys):
    d = tmp_path / "b"
    bank = _bank(d, "m0", "m1")
    before = (d / "manifest.json").read_bytes()
    p = holder(d)
    with pytest.raises(MtpeftError, match=rf"bank {d} is in use by process {p.pid}"):
        bank.save(d)
    with pytest.raises(MtpeftError, match=f"in use by process {p.pid}"):
        remove_saved_module(d, "m0")
    assert f"in use by process {p.pid}" in error_of(capsys, "bank", "rm", d, "m1")
    assert (d / "manifest.json").read_bytes() == before
    p.kill()
    p.wait()
    remove_saved_module(d, "m0")  # the holder died: the lock is recovered
    assert names_on_disk(d) == ["m1"]


TRAIN = """
import sys, time
from pathlib import Path
import mtpeft.train as T
real = T.fit_expert
def slow(*a, **k):
    print("training", flush=True)
    sys.stdin.readline()  # the test says when to go on
    return real(*a, **k)
T.fit_expert = slow
from mtpeft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_train_holds_the_bank_for_the_whole_run(tmp_path, capsys):
    csv = write_csv(tmp_path / "toy.csv")
    d = tmp_path / "bank"
    common = ["--backbone", "tiny-bert", "--task-file", f"toy={csv}", "--out", str(d), "--max-steps", "2"]
    run_json(capsys, "train", *common, "--name", "first")
    p = subprocess.Popen([sys.executable, "-c", TRAIN, "train", *common, "--name", "second"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert p.stdout.readline().strip() == "training"
        # a second train into the same bank is refused up front, naming the first
        msg = error_of(capsys, "train", *common, "--name", "third")
        assert f"bank {d} is in use by process {p.pid}" in msg and "running `" in msg and "wait for it" in msg
        assert "in use by process" in error_of(capsys, "bank", "rm", d, "first")  # so is `bank rm`
        p.stdin.write("\n")
        p.stdin.flush()
        _out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert names_on_disk(d) == ["first", "second"]
    run_json(capsys, "bank", "rm", d, "first")  # the run is over: the bank is free
    assert names_on_disk(d) == ["second"]


def test_train_into_an_unusable_out_fails_before_training(tmp_path, capsys):
    csv = write_csv(tmp_path / "toy.csv")
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={csv}", "--out", out,
                       "--max-steps", "1")
        assert str(out) in msg


def test_import_takes_the_lock(tmp_path, holder, capsys):
    d = tmp_path / "b"
    bank = _bank(d, "m0")
    from mtpeft.interop import export_peft

    export_peft(bank, "m0", tmp_path / "ad")
    p = holder(d)
    assert f"in use by process {p.pid}" in error_of(capsys, "bank", "import", d, tmp_path / "ad", "--name", "x")
    assert names_on_disk(d) == ["m0"]


def test_locked_is_reentrant_for_saves_inside_it(tmp_path):
    d = tmp_path / "b"
    bank = _bank(d, "m0")
    with locked(d):
        bank.add("m1", "lora", {"r": 2})
        bank.save(d)
        remove_saved_module(d, "m0")
    assert names_on_disk(d) == ["m1"]
