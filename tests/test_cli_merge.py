"""`mtpeft merge`: a merge saved into the bank, its report, and the error paths (exit 2, a message naming the fix)."""
import json

import pytest
import torch
from conftest import perturb

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank, read_manifest
from mtpeft.cli import main


@pytest.fixture
def saved_bank(tmp_path):
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    bank.add("a", "lora", {"r": 2}, seed=1)
    bank.add("b", "lora", {"r": 4, "alpha": 4.0}, seed=2)
    for i, n in enumerate(bank.names):
        perturb(bank, n, seed=i)
    bank.save(tmp_path / "bank")
    return tmp_path / "bank", bank


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_merge_saves_a_new_module_and_reports(capsys, saved_bank):
    path, bank = saved_bank
    rc, out, _ = run(capsys, "merge", "--bank", path, "--modules", "a,b", "--name", "ab", "--method", "weighted",
                     "--weights", "0.25,0.75", "--json")
    assert rc == 0
    rep = json.loads(out)
    assert rep["exact"] and rep["rank"] == 6 and rep["weights"] == [0.25, 0.75] and rep["name"] == "ab"
    assert [e["name"] for e in read_manifest(path)["modules"]] == ["a", "b", "ab"]
    loaded = ModuleBank.load(path, load_backbone("tiny-bert", seed=0))
    for s, d in loaded.delta_weight("ab").items():
        want = 0.25 * bank.delta_weight("a")[s] + 0.75 * bank.delta_weight("b")[s]
        torch.testing.assert_close(d, want, atol=1e-6, rtol=1e-5)
    rc, out, _ = run(capsys, "merge", "--bank", path, "--modules", "a,b", "--name", "t", "--method", "ties",
                     "--density", "0.5", "--rank", "3")
    assert rc == 0 and "SVD-truncated, relative error" in out and "'t'" in out
    assert loaded.record("ab").metadata["merged_from"] == ["a", "b"]


@pytest.mark.parametrize("argv, message", [
    (["--modules", "a,b", "--name", "a"], "already has a module named 'a'"),
    (["--modules", "a,zz", "--name", "x"], "no module 'zz'"),
    (["--modules", "a,,b", "--name", "x"], "empty item"),
    (["--modules", "a,b", "--name", "x", "--method", "weighted"], "needs one weight per module"),
    (["--modules", "a,b", "--name", "x", "--method", "weighted", "--weights", "1,x"], "must be a number"),
    (["--modules", "a,b", "--name", "x", "--method", "weighted", "--weights", "1"], "one weight per module"),
    (["--modules", "a,b", "--name", "x", "--method", "ties", "--density", "1.5"], "density"),
    (["--modules", "a,b", "--name", "x", "--rank", "0"], "rank must be a positive integer"),
])
def test_merge_errors_exit_2_and_leave_the_bank_alone(capsys, saved_bank, argv, message):
    path, _ = saved_bank
    before = (path / "manifest.json").read_bytes()
    rc, _, err = run(capsys, "merge", "--bank", path, *argv)
    assert rc == 2 and err.startswith("mtpeft: error:") and message in err
    assert (path / "manifest.json").read_bytes() == before


def test_merge_refuses_a_missing_bank(capsys, tmp_path):
    rc, _, err = run(capsys, "merge", "--bank", tmp_path / "nope", "--modules", "a,b", "--name", "x")
    assert rc == 2 and "mtpeft: error:" in err
    assert not (tmp_path / "nope").exists()  # no directory made by a refused merge
