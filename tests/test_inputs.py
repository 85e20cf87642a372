"""Bad input to `mtpeft train` and the task readers, found as a new user would (issue 14): each case gets a
clear ``mtpeft: error:`` (exit 2) that names the key or flag, the value and what to give, before anything
loads; a NaN loss stops that module's training and leaves the bank as it was."""
from __future__ import annotations

import json

import pytest
from test_cli import error_of, files, run_json  # noqa: F401  (files: a fixture)

from mtpeft.cli import load_run_config


def listing(d):
    """Every file under ``d`` with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- item 1: run files are typed like the flags --------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    ('{"lr": "fast"}', "'lr' must be a number, not 'fast'; give a positive learning rate, e.g. lr: 1e-3"),
    ("sampling: bogus\n", "'sampling' = 'bogus' is not accepted; give one of proportional, temperature, uniform"),
    ('multitask: "no"\n', "'multitask' must be true or false, not 'no'"),
    ('{"multitask": 1}', "'multitask' must be true or false, not 1"),
    ('{"max_steps": 2.5}', "'max_steps' must be an integer, not 2.5; give a positive integer, or -1"),
    ('{"max_steps": true}', "'max_steps' must be an integer, not True"),
    ('{"batch_size": "16"}', "'batch_size' must be an integer, not '16'"),
    ('{"batch_size": 0}', "'batch_size' = 0 is out of range; give a positive integer, e.g. batch_size: 16"),
    ("lr: .nan\n", "'lr' = nan is not a finite number"),
    ("lr: .inf\n", "'lr' = inf is not a finite number"),
    ('{"lr": -1}', "'lr' = -1 is out of range"),
    ('{"seed": "zero"}', "'seed' must be an integer, not 'zero'"),
    ('{"module": 3}', "'module' must be a module type, not 3"),
    ('{"max_examples": 0}', "'max_examples' = 0 is out of range"),
    ('{"options": {"alpha": NaN}}', "options.alpha = nan is not a finite number; give a finite value"),
    ("options: {alpha: [1, .inf]}\n", "options.alpha = [1, inf] is not a finite number"),
    ('{"patience": -2}', "'patience' = -2 is out of range; give an integer >= 0, e.g. patience: 2"),
], ids=["lr-str", "sampling", "multitask-str", "multitask-int", "max-steps-float", "max-steps-bool",
        "batch-str", "batch-zero", "lr-nan", "lr-inf", "lr-negative", "seed-str", "module-int", "max-examples",
        "option-nan", "option-inf", "patience"])
def test_run_file_values_are_typed(capsys, tmp_path, files, content, problem):  # noqa: F811
    conf = tmp_path / ("run.json" if content.startswith("{") else "run.yaml")
    conf.write_text(content)
    msg = error_of(capsys, "train", "--config", conf, "--backbone", "tiny-bert", "--task-file",
                   f"toy={files['csv']}", "--out", tmp_path / "b")
    assert problem in msg, msg
    assert str(conf) in msg
    assert not (tmp_path / "b").exists()


def test_run_file_numbers_as_yaml_writes_them(tmp_path):
    """PyYAML reads `lr: 1e-3` as a string: it is the number the user wrote. Ints are floats where floats go."""
    (tmp_path / "run.yaml").write_text("lr: 1e-3\nbatch_size: 8\nmultitask: false\nrun_dir: logs\n")
    conf = load_run_config(tmp_path / "run.yaml")
    assert conf["lr"] == 0.001 and isinstance(conf["lr"], float)
    assert conf["batch_size"] == 8 and conf["multitask"] is False and str(conf["run_dir"]) == "logs"
    (tmp_path / "run.json").write_text('{"lr": 1}')
    assert load_run_config(tmp_path / "run.json")["lr"] == 1.0


def test_config_help_says_yaml_or_json(capsys):
    from mtpeft.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "YAML (.yaml/.yml) or JSON" in " ".join(capsys.readouterr().out.split())


# ---- item 2: non-finite values ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, problem", [
    (("--lr", "inf"), "--lr inf is not a finite number; give a positive learning rate, e.g. --lr 1e-3"),
    (("--lr=-inf",), "--lr -inf is not a finite number"),
    (("--lr", "nan"), "--lr nan is not a finite number"),
    (("--option", "alpha=NaN"), "option 'alpha=NaN' of lora: NaN is not a finite number"),
    (("--option", "alpha=Infinity"), "Infinity is not a finite number; give a finite value"),
    (("--option", "dropout=-Infinity"), "-Infinity is not a finite number"),
])
def test_non_finite_flags_are_refused_before_anything_loads(capsys, tmp_path, files, extra, problem):  # noqa: F811
    msg = error_of(capsys, "train", "--backbone", "no-such-backbone", "--task-file", f"toy={files['csv']}",
                   "--out", tmp_path / "b", "--max-steps", 2, *extra)
    assert problem in msg, msg  # before the (unknown) backbone is even looked up
    assert not (tmp_path / "b").exists()


def test_nan_loss_stops_the_module_and_keeps_the_bank(capsys, tmp_path, files):  # noqa: F811
    bank = tmp_path / "b"
    run_json(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}", "--out", bank,
             "--max-steps", 2)
    before = listing(bank)
    # an lr of 1e30 makes the LoRA product overflow after one step: the loss of step 2 is NaN
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy2={files['jsonl']}",
                   "--out", bank, "--max-steps", 6, "--lr", "1e30")
    assert "training of 'toy2-lora' stopped at step 2" in msg and "not a finite number" in msg, msg
    assert "Lower the learning rate (--lr" in msg
    assert listing(bank) == before
    assert [e["name"] for e in json.loads((bank / "manifest.json").read_text())["modules"]] == ["toy-lora"]


def test_forced_nan_loss_names_step_and_module_and_removes_it():
    import torch
    from conftest import synthetic_task

    from mtpeft.api import new_bank
    from mtpeft.errors import MtpeftError
    from mtpeft.train import TrainConfig, fit_expert

    bank, scorer = new_bank("tiny-bert")
    task = synthetic_task()
    fit_expert(bank, scorer, task, "first", "lora", cfg=TrainConfig(max_steps=1, progress=False))
    first = {k: v.clone() for k, v in bank.module_parameters("first").items()}
    real = scorer.logits
    calls = []

    def poisoned(*a, **k):  # the third training forward (validation runs without grad) returns NaN logits
        out = real(*a, **k)
        calls.append(torch.is_grad_enabled())
        return out * float("nan") if sum(calls) == 3 and calls[-1] else out

    scorer.logits = poisoned
    with pytest.raises(MtpeftError, match=r"training of 'second' stopped at step 3: the loss is nan"):
        fit_expert(bank, scorer, task, "second", "lora", cfg=TrainConfig(max_steps=5, progress=False))
    assert bank.names == ["first"]
    assert all(torch.equal(first[k], v) for k, v in bank.module_parameters("first").items())


# ---- item 3: a bad --out fails before training --------------------------------------------------------

def test_bad_out_fails_before_anything_loads(capsys, tmp_path, files):  # noqa: F811
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    # the unknown backbone is looked up after the --out check: its error would mean the check came too late
    argv = ["train", "--backbone", "no-such-backbone", "--task-file", f"toy={files['csv']}", "--max-steps", 1]
    for out, problem in [(tmp_path / "afile" / "sub", "lies under"), (tmp_path / "afile" / "a" / "b", "lies under"),
                         (tmp_path / "afile", "exists and is not a directory; choose a new --out"),
                         (tmp_path / "gone" / "bank", "is a broken symbolic link"),
                         ("/proc/mtpeft-bank", "a file cannot be created there")]:
        msg = error_of(capsys, *argv, "--out", out)
        assert problem in msg and str(out) in msg, msg
    msg = error_of(capsys, *argv, "--out", tmp_path / "ok", "--run-dir", tmp_path / "afile" / "logs")
    assert "--run-dir" in msg and "lies under" in msg
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "ok").exists()


def test_unwritable_out_is_named(capsys, tmp_path, files, monkeypatch):  # noqa: F811
    """A folder without write permission (for root, which writes anyway, os.access is what says no)."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(locked) else real(p, mode, **k))
    msg = error_of(capsys, "train", "--backbone", "no-such-backbone", "--task-file", f"toy={files['csv']}",
                   "--out", locked / "bank")
    assert f"--out {locked / 'bank'} (its nearest existing folder {locked}) is not writable" in msg, msg
    locked.chmod(0o700)


# ---- item 5: progress on stderr, stdout alone; --version; exact accuracies; escaped names -------------

def test_progress_goes_to_stderr_named_and_from_epoch_1(capsys, tmp_path, files):  # noqa: F811
    from test_cli import run

    argv = ["train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}", "--out", tmp_path / "b",
            "--max-steps", 2, "--max-epochs", 2]
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    assert json.loads(out)["results"][0]["module"] == "toy-lora"  # stdout is the JSON alone
    assert "toy-lora epoch 1/2" in err and "epoch 0" not in err and "Epoch" not in err
    rc, out, err = run(capsys, *argv, "--name", "second")
    assert rc == 0 and "second (toy) epoch 1/2" in err and "Training" not in err
    assert out.splitlines()[0] == f"trained into {tmp_path / 'b'}" and "epoch" not in out and "\r" not in out
    rc, out, err = run(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                       "--task-file", f"toy2={files['jsonl']}", "--multitask", "--out", tmp_path / "b",
                       "--max-steps", 1, "--json")
    assert rc == 0 and "multitask-lora (toy, toy2) epoch 1" in err
    json.loads(out)


def test_version(capsys):
    from importlib.metadata import version

    from mtpeft.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtpeft {version('mtpeft')}"


def test_accuracy_is_the_exact_ratio_of_counts():
    """17 test examples: k/17 as Python computes it, not a float32 rounding of it (0.4117647058823529 is
    the accuracy, 0.4117647111415863 was printed)."""
    from conftest import synthetic_task
    from datasets import DatasetDict

    from mtpeft.api import new_bank
    from mtpeft.train import evaluate, predict

    task = synthetic_task(n=48)
    test = task.splits["test"]
    task.splits = DatasetDict(train=task.splits["train"], validation=task.splits["validation"],
                              test=test.select([i % len(test) for i in range(17)]))
    bank, scorer = new_bank("tiny-bert")
    preds, labels = predict(bank, scorer, task)
    k = int((preds == labels).sum())
    assert 0 < k < 17  # a ratio float32 cannot hold exactly
    res = evaluate(bank, scorer, task)
    assert res["accuracy"] == k / 17 and repr(res["accuracy"]) == repr(k / 17)
    assert repr(task.majority_baseline()) == repr(int((labels == task.majority_label()).sum()) / 17)


def test_control_characters_in_names_are_escaped(capsys, tmp_path, files):  # noqa: F811
    from test_cli import run

    from mtpeft.cli.common import table

    shown = table([{"name": "a\x1b[2Jb\n", "tasks": ["t\x07"], "acc": 0.5}], ["name", "tasks", "acc"])
    assert "\x1b" not in shown and "\x07" not in shown and "a\\x1b[2Jb\\n" in shown and "t\\x07" in shown
    evil = "m\x1b[31mred\x1b[0m"
    rc, out, err = run(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                       "--out", tmp_path / "b", "--max-steps", 1, "--name", evil)
    assert rc == 0, err
    assert "\x1b" not in out and "\x1b[31m" not in err and "m\\x1b[31mred\\x1b[0m" in out  # tqdm moves its own cursor
    for argv in (("bank", "ls", tmp_path / "b"), ("bank", "show", tmp_path / "b", evil)):
        rc, out, err = run(capsys, *argv)
        assert rc == 0 and "\x1b" not in out and "m\\x1b[31mred" in out, (out, err)
    msg = error_of(capsys, "bank", "show", tmp_path / "b", "no\x1bsuch")
    assert "\x1b" not in msg


# ---- item 6: files and folders honour the umask ---------------------------------------------------

@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_saved_files_honour_the_umask(tmp_path, mask, file_mode, dir_mode):
    import os
    import stat

    from conftest import synthetic_task

    from mtpeft.api import new_bank
    from mtpeft.interop import export_peft
    from mtpeft.io import write_json

    bank, _ = new_bank("tiny-bert")
    bank.add("toy-lora", "lora", {"r": 2}, task=synthetic_task().name)
    old = os.umask(mask)
    try:
        bank.save(tmp_path / "bank")
        export_peft(bank, "toy-lora", tmp_path / "adapter")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    for root in (tmp_path / "bank", tmp_path / "adapter"):
        paths = [root, *root.rglob("*")]
        assert len(paths) >= 3
        for p in paths:
            if p.is_dir():
                assert mode(p) == dir_mode, p
            elif p.name != ".lock":  # the lock file is the lock's own business
                assert mode(p) == file_mode, (p, oct(mode(p)))
    # a file that already exists keeps its mode when rewritten
    (tmp_path / "bank" / "manifest.json").chmod(0o640)
    write_json(tmp_path / "bank" / "manifest.json", {"x": 1})
    assert mode(tmp_path / "bank" / "manifest.json") == 0o640
