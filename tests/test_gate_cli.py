"""`mtpeft gate` and `mtpeft train --gate`: gates and centroids written with the bank (imported experts too), the
experts' weights untouched, and the user errors (each `mtpeft: error: ...`, exit 2)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_cli import (
    error_of,
    load_weights,
    module_file,
    read_manifest_json,
    run,
    run_json,
    run_quiet,
    write_csv,
)

from mtpeft.cli import main
from mtpeft.io import MtpeftError


def loaded(bank_dir):
    from mtpeft.api import open_bank

    return open_bank(bank_dir)[0]


def gates_and_centroid(bank, name):
    from mtpeft.routers.phatgoose import gates_of
    from mtpeft.routers.retrieval import CENTROID

    arts = bank.artifacts(name)
    return gates_of(bank, name), arts.get(CENTROID)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("gate-tasks") / "toy.csv")


@pytest.fixture(scope="module")
def plain(tmp_path_factory, csv_file):
    """A tiny-bert bank with one LoRA trained on toy, no gates."""
    bank = tmp_path_factory.mktemp("plain") / "bank"
    run_quiet("train", "--backbone", "tiny-bert", "--module", "lora", "--option", "r=2", "--task-file",
              f"toy={csv_file}", "--out", bank, "--max-steps", 2)
    return bank


@pytest.fixture
def copy(plain, tmp_path):
    return shutil.copytree(plain, tmp_path / "bank")


def test_help(capsys):
    for argv, words in ((["gate", "--help"], ["--bank", "--module", "--task", "--steps", "--lr", "--json"]),
                        (["train", "--help"], ["--gate"]),
                        (["--help"], ["gate"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert all(w in out for w in words), (argv, out)


def test_train_gate_gates_each_new_expert(capsys, tmp_path, csv_file):
    bank_dir = tmp_path / "bank"
    got = run_json(capsys, "train", "--backbone", "tiny-bert", "--module", "lora", "--option", "r=2",
                   "--task-file", f"toy={csv_file}", "--out", bank_dir, "--max-steps", 2, "--gate")
    assert got["results"][0]["module"] == "toy-lora" and "gate_val_acc" in got["results"][0]
    entry = next(e for e in read_manifest_json(bank_dir)["modules"] if e["name"] == "toy-lora")
    assert entry.get("artifacts")  # saved beside the weights
    bank = loaded(bank_dir)
    gates, centroid = gates_and_centroid(bank, "toy-lora")
    assert set(gates) == set(bank.module_sites("toy-lora"))
    assert all(float(g.abs().max()) > 0 for g in gates.values())
    assert centroid is not None and centroid.shape == (32,)
    assert bank.record("toy-lora").metrics["phatgoose"]["steps"] == 100
    from mtpeft.routers import PhatgooseRouter, RetrievalRouter

    assert PhatgooseRouter.from_bank(bank).module_names == ["toy-lora"]
    assert RetrievalRouter.from_bank(bank).module_names == ["toy-lora"]


def test_gate_an_existing_expert_leaves_its_weights_alone(capsys, copy, csv_file):
    weights = load_weights(module_file(copy, "toy-lora"))
    got = run_json(capsys, "gate", "--bank", copy, "--task-file", f"toy={csv_file}", "--steps", 3,
                   "--centroid-examples", 10)
    (row,) = got["results"]
    assert row["module"] == "toy-lora" and row["task"] == "toy" and row["steps"] == 3 and row["centroid_n"] == 10
    after = load_weights(module_file(copy, "toy-lora"))
    assert set(after) == set(weights) and all(torch.equal(after[k], weights[k]) for k in weights)
    bank = loaded(copy)
    gates, centroid = gates_and_centroid(bank, "toy-lora")
    assert len(gates) == len(bank.module_sites("toy-lora")) and centroid is not None
    assert int(bank.artifact("toy-lora", "retrieval_count")) == 10


def test_gate_an_imported_expert_with_module(capsys, copy, csv_file, tmp_path):
    adapter = tmp_path / "adapter"
    assert run(capsys, "bank", "export", copy, "toy-lora", adapter)[0] == 0
    assert run(capsys, "bank", "import", copy, adapter, "--name", "imported")[0] == 0  # no task recorded
    rc, out, err = run(capsys, "gate", "--bank", copy, "--module", "imported", "--task-file", f"toy={csv_file}",
                       "--steps", 2)
    assert rc == 0, err
    assert "gated in" in out and "imported" in out  # the table
    bank = loaded(copy)
    assert gates_and_centroid(bank, "imported")[0] and gates_and_centroid(bank, "toy-lora") == ({}, None)


def test_routing_without_gates_names_the_command(copy):
    from mtpeft.routers import PhatgooseRouter, RetrievalRouter

    bank = loaded(copy)
    for cls in (PhatgooseRouter, RetrievalRouter):
        with pytest.raises(MtpeftError, match=r"mtpeft gate --bank BANK --module toy-lora --task toy"):
            cls.from_bank(bank, modules=["toy-lora"])


@pytest.mark.parametrize("argv, problem", [
    (["--module", "nope"], "no module 'nope'"),
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--lr", "-1"], "--lr -1.0 is out of range"),
])
def test_gate_errors(capsys, copy, csv_file, argv, problem):
    before = (copy / "manifest.json").read_bytes()
    msg = error_of(capsys, "gate", "--bank", copy, "--task-file", f"toy={csv_file}", *argv)
    assert problem in msg
    assert (copy / "manifest.json").read_bytes() == before


def test_gate_errors_on_tasks_and_banks(capsys, copy, csv_file, tmp_path):
    msg = error_of(capsys, "gate", "--bank", copy, "--task-file", f"other={csv_file}")
    assert "trained on task 'other'" in msg and "--module" in msg
    msg = error_of(capsys, "gate", "--bank", copy, "--module", "toy-lora", "--task-file", f"toy={csv_file}",
                   "--task-file", f"b={csv_file}")
    assert "--module names one module" in msg
    msg = error_of(capsys, "gate", "--bank", tmp_path / "nowhere", "--task-file", f"toy={csv_file}")
    assert "is not a bank" in msg
    msg = error_of(capsys, "gate", "--bank", copy)
    assert "--task" in msg


def test_train_gate_refuses_multitask(capsys, tmp_path, csv_file):
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--multitask", "--gate", "--task-file",
                   f"toy={csv_file}", "--out", tmp_path / "b")
    assert "--gate" in msg and "--multitask" in msg
    assert not (tmp_path / "b").exists()


def test_gate_json_is_one_object(capsys, copy, csv_file):
    rc, out, _ = run(capsys, "gate", "--bank", copy, "--task-file", f"toy={csv_file}", "--steps", 1, "--json")
    assert rc == 0
    obj = json.loads(out)
    assert obj["bank"] == str(copy) and len(obj["results"]) == 1
