"""Bad input to `mtpeft train` and the task readers, found as a new user would (issue 14): each case gets a
clear ``mtpeft: error:`` (exit 2) that names the key or flag, the value and what to give, before anything
loads; a NaN loss stops that module's training and leaves the bank as it was."""
from __future__ import annotations

import json

import pytest
from test_cli import error_of, files, run_json  # noqa: F401  (files: a fixture)

from mtpeft.cli import load_run_config


def listing(d):
    """Every file under ``d`` with its bytes (lock files aside: they record their last holder)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".mtpeft.lock"}


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

    from mtpeft.cli.common import table

    shown = table([{"name": "a\x1b[2Jb\n", "tasks": ["t\x07"], "acc": 0.5}], ["name", "tasks", "acc"])
    assert "\x1b" not in shown and "\x07" not in shown and "a\\x1b[2Jb\\n" in shown and "t\\x07" in shown
    evil = "m\x1b[31mred\x1b[0m"  # a bank refuses such a name; the refusal shows it escaped
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                   "--out", tmp_path / "b", "--max-steps", 1, "--name", evil)
    assert "control character" in msg and "\x1b" not in msg and "m\\x1b[31mred" in msg, msg
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


# ---- item 4: task files ----------------------------------------------------------------------------

def write_jsonl(path, labels, text=lambda i: f"text {i}"):
    path.write_text("".join(json.dumps({"text": text(i), "label": y}) + "\n" for i, y in enumerate(labels)))
    return path


def all_labels(task):
    return {e["text"]: task.label_names[e["label"]] for ds in task.splits.values() for e in ds}


def test_sparse_integer_labels_are_their_distinct_values(tmp_path):
    """{0, 1, 10000000} is three classes (it made ten million); 0..K-1 keeps its indices."""
    from mtpeft.tasks import load_task_file

    labels = [0, 1, 10_000_000, -3] * 5
    t = load_task_file("x", write_jsonl(tmp_path / "d.jsonl", labels))
    assert t.label_names == ["-3", "0", "1", "10000000"]
    assert all_labels(t) == {f"text {i}": str(y) for i, y in enumerate(labels)}
    t = load_task_file("x", write_jsonl(tmp_path / "e.jsonl", [2, 0, 1] * 5))
    assert t.label_names == ["0", "1", "2"]
    assert all(t.label_names[e["label"]] == str(e["label"]) for e in t.splits["train"])


def test_label_count_is_bounded_with_a_flag_to_raise_it(capsys, tmp_path):
    from test_cli import error_of

    from mtpeft.errors import MtpeftError
    from mtpeft.tasks import load_task_file

    many = write_jsonl(tmp_path / "many.jsonl", [f"label {i}" for i in range(1500)] * 2)
    with pytest.raises(MtpeftError, match=r"1500 distinct labels, more than the bound of 1000 .*--max-labels 1500"):
        load_task_file("x", many)
    assert load_task_file("x", many, max_labels=1500).num_labels == 1500
    ints = write_jsonl(tmp_path / "ints.jsonl", list(range(100_000)) + [0] * 20)
    msg = error_of(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"x={ints}")
    assert "100000 distinct labels" in msg and "--max-labels 100000" in msg
    msg = error_of(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"x={many}", "--max-labels", 1200)
    assert "more than the bound of 1200" in msg
    with pytest.raises(MtpeftError, match="more than the bound of 2 labels"):
        load_task_file("x", write_jsonl(tmp_path / "three.jsonl", [0, 1, 2] * 3), label_names=["a", "b", "c"],
                       max_labels=2)


def test_many_labels_never_copy_the_label_embeddings_per_example(tmp_path):
    """A batch of 64 over two tasks of 12000 labels: the logits cost [64, 12000], not a [64, 12000, H] copy of
    the label embeddings (peak memory measured in a fresh process; the copy alone is 98 MB on tiny-bert)."""
    import subprocess
    import sys

    prog = """
import resource, sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import synthetic_task
from mtpeft.api import new_bank
torch.set_num_threads(1)
bank, scorer = new_bank("tiny-bert")
tasks = [synthetic_task(f"t{{k}}", n=4, labels=[f"label {{k}} {{i}}" for i in range(12000)]) for k in range(2)]
for t in tasks:
    scorer.label_embeddings(bank, t)
texts = ["some text %d" % i for i in range(64)]
batch_tasks = [tasks[i % 2] for i in range(64)]
with torch.no_grad():
    scorer.logits(bank, texts[:2], batch_tasks[:2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = scorer.logits(bank, texts, batch_tasks)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
x = scorer.encode(bank, [t.format_input(s) for t, s in zip(batch_tasks, texts)])
ref = torch.stack([x[i] @ scorer.label_embeddings(bank, batch_tasks[i]).t() for i in range(64)]) / scorer.temperature
assert tuple(out.shape) == (64, 12000) and torch.allclose(out, ref, atol=1e-4)
print(grown // 1024)
"""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", prog.format(root=str(root), tests=str(root / "tests"))],
                       capture_output=True, text=True, timeout=600, check=False,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    grown_mb = int(p.stdout.split()[-1])
    assert grown_mb < 40, grown_mb


def parser_flags(cmd):
    from mtpeft.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices[cmd]
    return {s for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("content, extra, problem", [
    ("sentence,lbl\na,x\nb,y\nc,x\n", (), "or name yours: --text-column NAME --label-column NAME"),
    ("text,label\na,x\nb,x\nc,x\n", (), "--label-names A,B"),
    ("text,label\na,x\nb,y\nc,z\n", ("--label-names", "x,y"), "add it to --label-names"),
    ("text,label\na,x\nb,y\nc,x\n", ("--val-frac", "0.6", "--test-frac", "0.5"), "--val-frac 0.1 --test-frac 0.2"),
    ("text,label\na,0\nb,5\n", ("--label-names", "x,y"), "give a name for every index (--label-names"),
    ("text,label\na,x\nb,y\n", ("--val-frac", "0.4", "--test-frac", "0.4"), "change --val-frac/--test-frac"),
], ids=["columns", "one-label", "unknown-label", "fractions", "index", "empty-split"])
def test_hints_name_real_flags_that_work(capsys, tmp_path, content, extra, problem):
    import re

    from test_cli import error_of

    (tmp_path / "d.csv").write_text(content)
    msg = error_of(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"x={tmp_path / 'd.csv'}", *extra)
    assert problem in msg, msg
    named = set(re.findall(r"--[a-z][a-z-]+", msg))
    assert named and named <= parser_flags("zero-shot") and named <= parser_flags("train"), named
    assert "text_column=/" not in msg and not re.search(r"(?<![-\w])(val_frac|label_names)(?![=\w])", msg), msg


def test_column_and_label_flags_read_the_file(capsys, tmp_path):
    from test_cli import run_json

    (tmp_path / "d.csv").write_text("sentence,y\n" + "".join(f"s{i},{i % 2}\n" for i in range(30)))
    got = run_json(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"x={tmp_path / 'd.csv'}",
                   "--text-column", "sentence", "--label-column", "y", "--label-names", "neg,pos",
                   "--val-frac", "0.2", "--test-frac", "0.5", "--split", "test")
    assert got["results"][0]["n"] == 15


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_unicode_files_with_a_byte_order_mark_are_read(tmp_path, encoding):
    import codecs

    from mtpeft.tasks import load_task_file

    text = "text,label\n" + "".join(f"caf\u00e9 \u2603 {i},{'ab'[i % 2]}\n" for i in range(10))
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    (tmp_path / "d.csv").write_bytes(data)
    t = load_task_file("x", tmp_path / "d.csv")
    assert t.label_names == ["a", "b"] and "caf\u00e9 \u2603 3" in all_labels(t)


def test_non_utf8_files_are_told_the_right_fix(tmp_path):
    from mtpeft.errors import MtpeftError
    from mtpeft.tasks import load_task_file

    (tmp_path / "d.csv").write_bytes("text,label\na,x\nb,y\nc,x\n".encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(MtpeftError, match=r"looks like UTF-16 without a byte-order mark.*iconv -f utf-16le"):
        load_task_file("x", tmp_path / "d.csv")
    (tmp_path / "e.csv").write_bytes("text,label\ncaf\u00e9,x\nb,y\nc,x\n".encode("cp1252"))
    with pytest.raises(MtpeftError, match=r"not valid UTF-8 .*line 2.*iconv -f cp1252") as e:
        load_task_file("x", tmp_path / "e.csv")
    assert "latin1" not in str(e.value)


def test_long_csv_fields_are_read_and_a_long_prompt_is_truncated(capsys, tmp_path):
    """A 100,000-word text (past the csv module's 131072-character field limit) loads, and is truncated to the
    scorer's max length when scored: zero-shot and training run."""
    from test_cli import run_json

    from mtpeft.tasks import load_task_file

    long = "red apple " * 100_000
    (tmp_path / "d.csv").write_text("text,label\n" + f'"{long}",red\n' + "".join(
        f"s{i},{'red' if i % 2 else 'blue'}\n" for i in range(30)))
    t = load_task_file("x", tmp_path / "d.csv")
    assert long in all_labels(t)
    spec = f"x={tmp_path / 'd.csv'}"
    got = run_json(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", spec, "--split", "train")
    assert got["results"][0]["n"] == len(t.splits["train"])
    run_json(capsys, "train", "--backbone", "tiny-bert", "--module", "prompt", "--task-file", spec,
             "--out", tmp_path / "b", "--max-steps", 2)


def test_too_many_virtual_tokens_are_refused_before_training(capsys, tmp_path, files):  # noqa: F811
    from test_cli import run

    rc, _, err = run(capsys, "train", "--backbone", "tiny-bert", "--module", "prompt", "--option",
                       "n_tokens=100000", "--task-file", f"toy={files['csv']}", "--out", tmp_path / "b")
    assert rc == 2 and "epoch" not in err, err
    assert "n_tokens=100000 of prompt" in err and "exceed the 512 positions" in err
    assert "give --option n_tokens=384 or fewer" in err
    assert not (tmp_path / "b").exists()


def test_backbone_mismatch_says_what_differs():
    from mtpeft.backbone import Backbone, load_backbone

    a, c = load_backbone("tiny-bert"), load_backbone("tiny-bert", seed=3)
    msg = Backbone.describe_mismatch(a.fingerprint(), c.fingerprint())
    assert "but got 'tiny-bert'" not in msg
    assert "is not the one of that name the bank was built on: the weights differ" in msg
    assert f"weights hash {a.fingerprint()['weights_hash'][:12]} expected, {c.fingerprint()['weights_hash'][:12]} now" in msg


def test_a_failed_run_does_not_block_the_next_one(capsys, tmp_path, files):  # noqa: F811
    """A NaN loss ends the run with a clear error; the next run (a lower lr) needs no --resume."""
    bank = tmp_path / "b"
    run_json(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}", "--out", bank,
             "--max-steps", 2)
    error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy2={files['jsonl']}",
             "--out", bank, "--max-steps", 6, "--lr", "1e30")
    got = run_json(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy2={files['jsonl']}",
                   "--out", bank, "--max-steps", 2)
    assert [r["module"] for r in got["results"]] == ["toy2-lora"]
