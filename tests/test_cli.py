"""The ``mtpeft`` command: every subcommand on the tiny random backbones and small task files, and the
user errors, each of which must come back as ``mtpeft: error: ...`` with return code 2 (never a traceback).

Training runs are capped to a few optimiser steps: these tests check what the command does with its
arguments and what it writes, not how well it learns.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil

import pytest
import torch
from conftest import synthetic_task

from mtpeft.cli import main

LORA_PARAMS_R4 = 2 * 2 * (4 * 32 + 32 * 4)  # query and value in each of 2 layers of width 32: A [4, 32] and B [32, 4]


# ---- helpers ---------------------------------------------------------------------------------------

def rows_of(task):
    out = []
    for split in ("train", "validation", "test"):
        ds = task.splits[split]
        out += list(zip(ds["text"], ds["label"]))
    return out


def write_csv(path, name="toy", seed=0):
    """80 rows of the learnable red/blue task, labels as names."""
    task = synthetic_task(name, seed=seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, task.label_names[y]) for t, y in rows_of(task))
    return path


def write_jsonl(path, name="toy2", seed=1):
    """The same kind of task as JSON lines, labels as integer indices."""
    task = synthetic_task(name, seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows_of(task))
    return path


def run(capsys, *argv):
    """(return code, stdout, stderr) of ``mtpeft ARGV``."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv):
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def run_quiet(*argv):
    """For module-scoped fixtures (no capsys there): the parsed JSON output of ``mtpeft ARGV --json``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv] + ["--json"])
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue())


def error_of(capsys, *argv) -> str:
    """Run a command that must fail with a user error; return the error message."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    assert "mtpeft: error: " in err, err
    return err.split("mtpeft: error: ", 1)[1].strip()


def read_manifest_json(bank_dir):
    return json.loads((bank_dir / "manifest.json").read_text())


def module_file(bank_dir, name):
    """The weights file of module ``name``, as the manifest names it (``modules/<name>.<sha16>.safetensors``)."""
    return bank_dir / next(e["file"] for e in read_manifest_json(bank_dir)["modules"] if e["name"] == name)


def load_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return {"csv": write_csv(d / "toy.csv"), "jsonl": write_jsonl(d / "toy2.jsonl")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, files):
    """A tiny-bert bank grown by two `train` calls: a LoRA (r=4) on toy, then an (IA)3 named my-ia3 on toy2.

    4 steps is one epoch of the 56 training examples at batch 16, so each fit validates once.
    """
    bank = tmp_path_factory.mktemp("bank") / "bank"
    first = run_quiet("train", "--backbone", "tiny-bert", "--module", "lora", "--option", "r=4",
                      "--task-file", f"toy={files['csv']}", "--out", bank, "--max-steps", 4)
    second = run_quiet("train", "--backbone", "tiny-bert", "--module", "ia3", "--name", "my-ia3",
                       "--task-file", f"toy2={files['jsonl']}", "--out", bank, "--max-steps", 4)
    return {"dir": bank, "first": first, "second": second}


@pytest.fixture
def bank_copy(trained, tmp_path):
    """A private copy of the trained bank, for tests that change it."""
    return shutil.copytree(trained["dir"], tmp_path / "bank")


@pytest.fixture(scope="module")
def task_cache(tmp_path_factory):
    """A fresh cache for the built-in tasks (the tests never depend on the user's cache)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("MTPEFT_CACHE", str(path))
        yield path


# ---- entry points --------------------------------------------------------------------------------

def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("tasks", "zero-shot", "train", "eval", "bank"):
        assert cmd in out
    with pytest.raises(SystemExit) as e:
        main(["bank", "--help"])
    assert e.value.code == 0
    assert "export" in capsys.readouterr().out


def test_argparse_errors_exit_two(capsys):
    with pytest.raises(SystemExit) as e:
        main([])  # a subcommand is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--task-file", "x=y.csv"])  # --out is required
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "mtpeft"]
    assert ep.value == "mtpeft.cli:main" and ep.load() is main


# ---- tasks, zero-shot ----------------------------------------------------------------------------

def test_tasks_lists_the_builtins(capsys, task_cache):
    from mtpeft.suite import BUILTIN_TASKS

    got = run_json(capsys, "tasks")
    rows = {r["name"]: r for r in got["tasks"]}
    assert list(rows) == list(BUILTIN_TASKS)
    for name, r in rows.items():
        assert all(isinstance(r[s], int) and r[s] > 0 for s in ("train", "validation", "test")), r
        assert r["train"] > r["validation"] and r["num_labels"] == len(r["labels"]) == len(BUILTIN_TASKS[name].label_names)
    assert rows["bbc_topic"]["labels"] == ["business", "entertainment", "politics", "sport", "tech"]
    assert rows["wordnet_noun"]["num_labels"] == 26
    # the table: a header and one line per task, with the same sizes
    rc, out, _ = run(capsys, "tasks")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:5] == ["name", "train", "validation", "test", "num_labels"]
    assert len(lines) == 2 + len(BUILTIN_TASKS)
    bbc = next(line for line in lines if line.startswith("bbc_topic"))
    assert bbc.split()[1:4] == [str(rows["bbc_topic"][s]) for s in ("train", "validation", "test")]


def test_zero_shot_json(capsys, files):
    got = run_json(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                   "--task-file", f"toy2={files['jsonl']}")
    assert got["backbone"] == "tiny-bert"
    assert [r["task"] for r in got["results"]] == ["toy", "toy2"]
    for r in got["results"]:
        assert r["split"] == "test" and r["n"] == 16  # 20% of 80 rows
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["majority"] == pytest.approx(0.5, abs=0.2)  # two alternating classes


def test_zero_shot_split_cap_and_table(capsys, files):
    got = run_json(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                   "--split", "validation", "--max-examples", 5)
    (r,) = got["results"]
    assert r["split"] == "validation" and r["n"] == 5
    rc, out, _ = run(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}")
    assert rc == 0
    assert "zero-shot accuracy of the bare tiny-bert backbone" in out
    assert any(line.split()[:3] == ["toy", "test", "16"] for line in out.splitlines())


def test_zero_shot_builtin_task(capsys, task_cache):
    got = run_json(capsys, "zero-shot", "--backbone", "tiny-bert", "--task", "tweet_coachella",
                   "--max-examples", 12)
    (r,) = got["results"]
    assert r["task"] == "tweet_coachella" and r["n"] == 12 and 0.0 <= r["accuracy"] <= 1.0


# ---- train, bank ls / show, eval --------------------------------------------------------------------

def test_train_creates_then_grows_the_bank(trained):
    d = trained["dir"]
    (first,) = trained["first"]["results"]
    (second,) = trained["second"]["results"]
    assert trained["first"]["bank"] == str(d)
    assert (first["module"], first["task"], first["steps"], first["n"]) == ("toy-lora", "toy", 4, 16)
    assert (second["module"], second["task"], second["steps"]) == ("my-ia3", "toy2", 4)
    assert 0.0 <= first["accuracy"] <= 1.0
    m = read_manifest_json(d)
    assert m["format"] == "mtpeft-bank" and m["backbone"]["name"] == "tiny-bert"
    assert [(e["name"], e["type"], e["task"]) for e in m["modules"]] == [("toy-lora", "lora", "toy"),
                                                                        ("my-ia3", "ia3", "toy2")]
    assert sorted(p.name for p in (d / "modules").iterdir()) == sorted(
        module_file(d, n).name for n in ("my-ia3", "toy-lora"))
    assert all(re.fullmatch(rf"modules/{e['name']}\.{e['sha256'][:16]}\.safetensors", e["file"]) for e in m["modules"])
    # the LoRA was trained: B starts at zero, and the steps moved it
    w = load_weights(module_file(d, "toy-lora"))
    bs = [v for k, v in w.items() if k.endswith("lora_B")]
    assert bs and any(bool((b != 0).any()) for b in bs)


def test_bank_ls(capsys, trained):
    got = run_json(capsys, "bank", "ls", trained["dir"])
    assert got["backbone"] == "tiny-bert"
    mods = {r["name"]: r for r in got["modules"]}
    assert list(mods) == ["toy-lora", "my-ia3"]
    assert (mods["toy-lora"]["type"], mods["toy-lora"]["task"]) == ("lora", "toy")
    assert (mods["my-ia3"]["type"], mods["my-ia3"]["task"]) == ("ia3", "toy2")
    assert mods["toy-lora"]["test_acc"] == trained["first"]["results"][0]["accuracy"]
    assert mods["toy-lora"]["merged"] is False
    rc, out, _ = run(capsys, "bank", "ls", trained["dir"])
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"bank {trained['dir']} on tiny-bert"
    assert lines[1].split() == ["name", "type", "task", "merged", "test_acc"]
    assert [line.split()[:3] for line in lines[3:]] == [["toy-lora", "lora", "toy"], ["my-ia3", "ia3", "toy2"]]


def test_bank_show_json_reports_the_options_and_sizes(capsys, trained):
    lora = run_json(capsys, "bank", "show", trained["dir"], "toy-lora")
    assert lora["config"]["r"] == 4  # --option r=4 reached the config (the default is 8)
    assert lora["num_parameters"] == LORA_PARAMS_R4 and lora["num_tensors"] == 8
    assert lora["metrics"]["steps"] == 4 and 0.0 <= lora["metrics"]["best_val_acc"] <= 1.0
    assert re.fullmatch(r"modules/toy-lora\.[0-9a-f]{16}\.safetensors", lora["file"])
    ia3 = run_json(capsys, "bank", "show", trained["dir"], "my-ia3")
    assert ia3["type"] == "ia3" and ia3["num_parameters"] > 0 and "r" not in ia3["config"]


def test_bank_show_table(capsys, trained):
    rc, out, _ = run(capsys, "bank", "show", trained["dir"], "toy-lora")
    assert rc == 0
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["name"] == "toy-lora" and fields["type"] == "lora" and fields["task"] == "toy"
    assert fields["num_parameters"] == str(LORA_PARAMS_R4)
    assert json.loads(fields["config"])["r"] == 4


def test_eval_routes_by_task_id(capsys, trained, files):
    got = run_json(capsys, "eval", "--bank", trained["dir"], "--task-file", f"toy={files['csv']}",
                   "--task-file", f"toy2={files['jsonl']}")
    assert got["bank"] == str(trained["dir"])
    assert [(r["task"], r["module"]) for r in got["results"]] == [("toy", "toy-lora"), ("toy2", "my-ia3")]
    # the reloaded bank scores what the in-memory bank scored right after training
    assert got["results"][0]["accuracy"] == trained["first"]["results"][0]["accuracy"]
    assert got["results"][1]["accuracy"] == trained["second"]["results"][0]["accuracy"]


def test_eval_module_override_and_split(capsys, trained, files):
    got = run_json(capsys, "eval", "--bank", trained["dir"], "--task-file", f"toy={files['csv']}",
                   "--module", "my-ia3", "--split", "validation")
    (r,) = got["results"]
    assert (r["task"], r["module"], r["split"], r["n"]) == ("toy", "my-ia3", "validation", 8)
    rc, out, _ = run(capsys, "eval", "--bank", trained["dir"], "--task-file", f"toy={files['csv']}")
    assert rc == 0
    assert any(line.split()[:4] == ["toy", "toy-lora", "test", "16"] for line in out.splitlines())


def test_train_name_clash_is_refused_before_training(capsys, bank_copy, files):
    before = (bank_copy / "manifest.json").read_bytes()
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--module", "lora", "--task-file",
                   f"toy={files['csv']}", "--out", bank_copy, "--max-steps", 2, "--json")
    assert "already has a module named 'toy-lora'" in msg and "--name" in msg
    assert (bank_copy / "manifest.json").read_bytes() == before


def test_multitask(capsys, tmp_path, files):
    """One shared module over both tasks; 2 steps end the fit before its first validation."""
    bank = tmp_path / "mt"
    got = run_json(capsys, "train", "--backbone", "tiny-bert", "--multitask", "--sampling", "temperature",
                   "--task-file", f"toy={files['csv']}", "--task-file", f"toy2={files['jsonl']}",
                   "--out", bank, "--max-steps", 2)
    assert [(r["module"], r["task"], r["steps"]) for r in got["results"]] == [
        ("multitask-lora", "toy", 2), ("multitask-lora", "toy2", 2)]
    (e,) = read_manifest_json(bank)["modules"]
    assert (e["name"], e["type"], e["task"]) == ("multitask-lora", "lora", None)
    assert e["metadata"] == {"tasks": ["toy", "toy2"], "sampling": "temperature"}
    assert 0.0 <= e["metrics"]["best_val_acc"] <= 1.0  # validated over both tasks' validation splits
    per_task = {r["task"]: r["accuracy"] for r in got["results"]}
    assert e["metrics"]["test_acc_per_task"] == per_task
    assert e["metrics"]["test_acc"] == pytest.approx(sum(per_task.values()) / 2)
    # task-id routing finds the shared module for either task
    got = run_json(capsys, "eval", "--bank", bank, "--task-file", f"toy2={files['jsonl']}")
    assert [(r["task"], r["module"]) for r in got["results"]] == [("toy2", "multitask-lora")]
    msg = error_of(capsys, "eval", "--bank", bank, "--task-file", f"other={files['csv']}")
    assert "no module in the bank was trained on task 'other'" in msg and "--module" in msg


def test_tiny_llama_prompt_module(capsys, tmp_path, files):
    """The causal family, an input-level module type, and a fit capped before its first validation."""
    bank = tmp_path / "llama"
    got = run_json(capsys, "train", "--backbone", "tiny-llama", "--module", "prompt", "--option", "n_tokens=3",
                   "--task-file", f"toy={files['csv']}", "--out", bank, "--max-steps", 2, "--batch-size", 8)
    (r,) = got["results"]
    assert (r["module"], r["steps"], r["n"]) == ("toy-prompt", 2, 16)
    show = run_json(capsys, "bank", "show", bank, "toy-prompt")
    assert show["config"]["n_tokens"] == 3 and show["num_parameters"] == 3 * 32
    got = run_json(capsys, "eval", "--bank", bank, "--task-file", f"toy={files['csv']}")
    assert got["results"][0]["module"] == "toy-prompt"
    assert got["results"][0]["accuracy"] == r["accuracy"]
    assert run_json(capsys, "bank", "ls", bank)["backbone"] == "tiny-llama"


# ---- bank export / import ------------------------------------------------------------------------

def test_export_loads_in_peft_with_the_banks_outputs(capsys, trained, tmp_path):
    peft = pytest.importorskip("peft")
    from mtpeft.api import open_bank
    from mtpeft.backbone import load_backbone
    from mtpeft.routing import Routing

    out = tmp_path / "adapter"
    got = run_json(capsys, "bank", "export", trained["dir"], "toy-lora", out)
    assert got == {"exported": "toy-lora", "dir": str(out)}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["task_type"] == "FEATURE_EXTRACTION"
    assert (out / "adapter_model.safetensors").is_file()

    bank, _ = open_bank(trained["dir"])
    enc = bank.backbone.tokenizer(["the big red apple", "a small sky"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pm = peft.PeftModel.from_pretrained(load_backbone("tiny-bert", seed=0).model, str(out)).eval()
    with torch.no_grad():
        h = bank(ids, mask, routing=Routing.one_hot([bank.index("toy-lora")] * 2)).output
        bare = bank(ids, mask).output
        ref = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (h - ref).abs().max().item() < 1e-5
    assert (h - bare).abs().max().item() > 1e-6  # the trained module changes the outputs: not a vacuous match


def test_export_table_output_and_import_back(capsys, trained, bank_copy, tmp_path, files):
    out = tmp_path / "adapter"
    rc, text, _ = run(capsys, "bank", "export", trained["dir"], "toy-lora", out)
    assert rc == 0 and text.strip() == f"wrote peft adapter {out}"
    got = run_json(capsys, "bank", "import", bank_copy, out, "--name", "back", "--task", "toy")
    assert got == {"imported": "back", "bank": str(bank_copy)}
    mods = run_json(capsys, "bank", "ls", bank_copy)["modules"]
    assert [(r["name"], r["type"], r["task"]) for r in mods][-1] == ("back", "lora", "toy")
    a = load_weights(module_file(bank_copy, "toy-lora"))
    b = load_weights(module_file(bank_copy, "back"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert run_json(capsys, "bank", "show", bank_copy, "back")["config"]["r"] == 4
    # task-id routing now picks the last module added for the task: the imported one
    got = run_json(capsys, "eval", "--bank", bank_copy, "--task-file", f"toy={files['csv']}")
    assert got["results"][0]["module"] == "back"
    # importing under a taken name is refused and leaves the bank as it was
    before = (bank_copy / "manifest.json").read_bytes()
    msg = error_of(capsys, "bank", "import", bank_copy, out, "--name", "back")
    assert "already has a module named 'back'" in msg and "pick another name" in msg
    assert (bank_copy / "manifest.json").read_bytes() == before


def test_export_refuses_types_peft_cannot_take(capsys, tmp_path):
    from mtpeft.api import new_bank

    bank, _ = new_bank("tiny-bert")
    bank.add("h", "houlsby")
    bank.save(tmp_path / "b")
    assert run_json(capsys, "bank", "show", tmp_path / "b", "h")["num_parameters"] > 0
    msg = error_of(capsys, "bank", "export", tmp_path / "b", "h", tmp_path / "out")
    assert "'houlsby'" in msg and "lora, ia3, prompt" in msg
    assert not (tmp_path / "out").exists()


def test_export_errors(capsys, trained, tmp_path):
    msg = error_of(capsys, "bank", "export", trained["dir"], "nosuch", tmp_path / "a")
    assert "no module 'nosuch'" in msg and "toy-lora" in msg
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    msg = error_of(capsys, "bank", "export", trained["dir"], "toy-lora", notes)
    assert "not a peft adapter directory" in msg and "new or empty directory" in msg
    assert [p.name for p in notes.iterdir()] == ["keep.txt"]
    msg = error_of(capsys, "bank", "import", trained["dir"], tmp_path / "nowhere")
    assert "peft adapter directory not found" in msg


# ---- user errors: task arguments and files ----------------------------------------------------------

@pytest.fixture
def bad_files(tmp_path):
    d = tmp_path
    (d / "nolabel.csv").write_text("text,lbl\nred apple,red\nblue sky,blue\nred ruby,red\n")
    (d / "notext.jsonl").write_text('{"sentence": "red apple", "label": 0}\n{"sentence": "sky", "label": 1}\n')
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("text,label\n")
    (d / "empty.jsonl").write_text("")
    (d / "onelabel.csv").write_text("text,label\na,x\nb,x\nc,x\nd,x\n")
    (d / "toy.txt").write_text("text,label\na,x\nb,y\n")
    (d / "latin1.csv").write_bytes("text,label\ncaf\xe9 rouge,red\nsky,blue\n".encode("latin-1"))
    return d


@pytest.mark.parametrize("spec,problem,fix", [
    ("x=nolabel.csv", "lacks the column(s) 'label'", "Rename them"),
    ("x=notext.jsonl", "lacks the column(s) 'text'", "Rename them"),
    ("x=empty.csv", "is empty", "header line with the columns text and label"),
    ("x=header.csv", "holds no examples", "add rows"),
    ("x=empty.jsonl", "holds no examples", "add rows"),
    ("x=onelabel.csv", "found 1 label(s)", "at least two labels"),
    ("x=toy.txt", "unsupported task file type '.txt'", "use .csv"),
    ("x=latin1.csv", "not valid UTF-8", "re-encode the file as UTF-8"),
    ("x=missing.csv", "task file for 'x' not found", "give the path of a CSV, JSONL or parquet file"),
    ("=toy.csv", "needs both a name and a path", "NAME=PATH"),
], ids=["no-label-column", "no-text-column", "empty-csv", "header-only", "empty-jsonl", "one-label",
        "extension", "not-utf8", "missing-file", "no-name"])
def test_bad_task_files(capsys, bad_files, spec, problem, fix):
    name, path = spec.split("=")
    msg = error_of(capsys, "zero-shot", "--backbone", "tiny-bert", "--json", "--task-file",
                   f"{name}={bad_files / path}")
    assert problem in msg and fix in msg, msg


def test_no_task_given(capsys, tmp_path):
    for argv in (["zero-shot", "--backbone", "tiny-bert"],
                 ["train", "--backbone", "tiny-bert", "--out", tmp_path / "b"],
                 ["eval", "--bank", tmp_path]):
        msg = error_of(capsys, *argv)
        assert "name at least one task" in msg and "--task-file NAME=PATH" in msg
    assert not (tmp_path / "b").exists()


def test_unknown_builtin_task(capsys):
    msg = error_of(capsys, "zero-shot", "--backbone", "tiny-bert", "--task", "no_such_task")
    assert "unknown task 'no_such_task'" in msg and "bbc_topic" in msg and "NAME=PATH" in msg


def test_task_name_given_twice(capsys, files, tmp_path):
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                   "--task-file", f"toy={files['jsonl']}", "--out", tmp_path / "b", "--max-steps", 2)
    assert "'toy' is given twice" in msg and "its own name" in msg
    assert not (tmp_path / "b").exists()


def test_bad_max_examples(capsys, files):
    msg = error_of(capsys, "zero-shot", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                   "--max-examples", 0)
    assert "max_examples must be a positive integer" in msg


def test_unknown_backbone(capsys, files):
    msg = error_of(capsys, "zero-shot", "--backbone", "no-such-model", "--task-file", f"toy={files['csv']}")
    assert "unknown backbone 'no-such-model'" in msg and "tiny-bert" in msg


# ---- user errors: train arguments ----------------------------------------------------------------

def train_args(files, out, *extra):
    return ["train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}", "--out", out,
            "--max-steps", 2, "--json", *extra]


def test_unknown_module_type(capsys, files, tmp_path):
    msg = error_of(capsys, *train_args(files, tmp_path / "b", "--module", "nosuch"))
    assert "unknown module type 'nosuch'" in msg and "lora" in msg and "houlsby" in msg
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("option,problem,fix", [
    ("zzz=4", "unknown option(s) ['zzz']", "known: ['alpha', 'dropout', 'r', 'target_modules']"),
    ("r", "option 'r' is not KEY=VALUE", "--option r=16"),
    ("r=abc", "r takes an integer, not 'abc'", "--option r=8"),
    ("r=4.5", "r takes an integer, not '4.5'", "--option r=8"),  # used to escape as a TypeError from torch
    ("r=true", "r takes an integer", "--option r=8"),
    ("r=-1", "r must be > 0", "-1"),
    ("dropout=2", "dropout must be in [0, 1)", "got 2"),
    ("alpha=big", "alpha takes a number", "--option alpha=0.5"),
    ("target_modules=query", "takes a JSON list of names", """--option target_modules='["query","value"]'"""),
    ('target_modules=["nope"]', "match no linear layer", "examples of layer names"),
], ids=["unknown-key", "no-equals", "not-a-number", "float-for-int", "bool-for-int", "negative", "range",
        "not-a-float", "list-as-string", "no-such-layer"])
def test_bad_options(capsys, files, tmp_path, option, problem, fix):
    msg = error_of(capsys, *train_args(files, tmp_path / "b", "--option", option))
    assert problem in msg and fix in msg, msg
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_options_are_typed(capsys, files, tmp_path):
    """JSON values where the field wants them: an integer alpha becomes a float, like the default."""
    run_json(capsys, *train_args(files, tmp_path / "b", "--option", "r=2", "--option", "alpha=8"))
    cfg = run_json(capsys, "bank", "show", tmp_path / "b", "toy-lora")["config"]
    assert cfg["r"] == 2 and cfg["alpha"] == 8.0 and isinstance(cfg["alpha"], float)


@pytest.mark.parametrize("flag,value,fix", [
    ("--batch-size", 0, "--batch-size 16"),  # used to escape as a ValueError from the DataLoader
    ("--lr", -1, "--lr 1e-3"),  # used to escape as a ValueError from the optimiser
    ("--max-steps", 0, "-1 for no cap"),
    ("--max-epochs", 0, "--max-epochs 3"),
    ("--patience", -1, "--patience 2"),
])
def test_bad_training_numbers(capsys, files, tmp_path, flag, value, fix):
    msg = error_of(capsys, *train_args(files, tmp_path / "b", flag, value))
    assert f"{flag} {float(value) if flag == '--lr' else value} is out of range" in msg and fix in msg
    assert not (tmp_path / "b").exists()


def test_out_must_be_a_bank_or_new(capsys, files, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    msg = error_of(capsys, *train_args(files, other))
    assert "is not empty and is not a bank" in msg and "new or empty directory" in msg
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    msg = error_of(capsys, *train_args(files, other / "notes.txt"))
    assert "not a directory" in msg and "choose a new --out" in msg


def test_train_on_a_bank_of_another_backbone(capsys, bank_copy, files):
    before = (bank_copy / "manifest.json").read_bytes()
    msg = error_of(capsys, "train", "--backbone", "tiny-llama", "--task-file", f"toy={files['csv']}",
                   "--out", bank_copy, "--name", "x", "--max-steps", 2)
    assert "built on backbone 'tiny-bert', not 'tiny-llama'" in msg and "pass --backbone tiny-bert" in msg
    assert (bank_copy / "manifest.json").read_bytes() == before


# ---- user errors: banks ----------------------------------------------------------------------------

def test_not_a_bank(capsys, tmp_path, files):
    (tmp_path / "plain").mkdir()
    for argv in (["bank", "ls", tmp_path / "plain"],
                 ["bank", "show", tmp_path / "plain", "m"],
                 ["eval", "--bank", tmp_path / "plain", "--task-file", f"toy={files['csv']}"]):
        msg = error_of(capsys, *argv)
        assert "is not an mtpeft bank" in msg and "mtpeft train --out" in msg
    for argv in (["bank", "ls", tmp_path / "nowhere"],
                 ["eval", "--bank", tmp_path / "nowhere", "--task-file", f"toy={files['csv']}"],
                 ["bank", "import", tmp_path / "nowhere", tmp_path]):
        msg = error_of(capsys, *argv)
        assert "bank directory not found" in msg and "mtpeft train --out" in msg
    (tmp_path / "plain" / "manifest.json").write_text("{not json")
    msg = error_of(capsys, "bank", "ls", tmp_path / "plain")
    assert "not valid JSON" in msg and "re-create it" in msg
    (tmp_path / "plain" / "manifest.json").write_text('{"format": "something-else"}')
    msg = error_of(capsys, "bank", "ls", tmp_path / "plain")
    assert "is not an mtpeft bank manifest" in msg


def test_bank_show_unknown_module(capsys, trained):
    msg = error_of(capsys, "bank", "show", trained["dir"], "nosuch")
    assert "no module 'nosuch'" in msg and "it has: toy-lora, my-ia3" in msg


def test_eval_unknown_module_and_task(capsys, trained, files):
    msg = error_of(capsys, "eval", "--bank", trained["dir"], "--task-file", f"toy={files['csv']}",
                   "--module", "nosuch")
    assert "no module 'nosuch'" in msg and "toy-lora, my-ia3" in msg
    msg = error_of(capsys, "eval", "--bank", trained["dir"], "--task-file", f"other={files['csv']}")
    assert "trained on task 'other'" in msg and "['toy', 'toy2']" in msg and "--module" in msg


def test_corrupted_weights(capsys, bank_copy, files):
    f = module_file(bank_copy, "toy-lora")
    data = bytearray(f.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    f.write_bytes(bytes(data))
    msg = error_of(capsys, "eval", "--bank", bank_copy, "--task-file", f"toy={files['csv']}")
    assert "weights of module 'toy-lora' are corrupted" in msg and "restore the file or retrain" in msg
    f.unlink()
    msg = error_of(capsys, "eval", "--bank", bank_copy, "--task-file", f"toy={files['csv']}")
    assert "weights of module 'toy-lora' are missing" in msg and "restore the file" in msg


def test_unreadable_weights_in_bank_show(capsys, bank_copy):
    module_file(bank_copy, "my-ia3").write_bytes(b"not safetensors")
    msg = error_of(capsys, "bank", "show", bank_copy, "my-ia3")
    assert "corrupted or not safetensors" in msg and "re-create it" in msg


def test_wrong_schema_version(capsys, bank_copy, files):
    m = read_manifest_json(bank_copy)
    m["schema_version"] = 99
    (bank_copy / "manifest.json").write_text(json.dumps(m))
    for argv in (["bank", "ls", bank_copy],
                 ["eval", "--bank", bank_copy, "--task-file", f"toy={files['csv']}"]):
        msg = error_of(capsys, *argv)
        assert "schema version 99" in msg and "upgrade mtpeft or re-create the bank" in msg


def test_bank_on_a_changed_backbone(capsys, bank_copy, files):
    """The manifest's fingerprint no longer matches the backbone it names (other weights)."""
    m = read_manifest_json(bank_copy)
    m["backbone"]["weights_hash"] = "0" * 64
    (bank_copy / "manifest.json").write_text(json.dumps(m))
    msg = error_of(capsys, "eval", "--bank", bank_copy, "--task-file", f"toy={files['csv']}")
    assert "built on another backbone" in msg and "weights differ" in msg
    assert "load it with the backbone it was trained on ('tiny-bert')" in msg


@pytest.mark.parametrize("name,problem", [("no-such-model", "unknown backbone 'no-such-model'"),
                                          (None, "does not name its backbone")])
def test_bank_naming_an_unknown_backbone(capsys, bank_copy, files, name, problem):
    m = read_manifest_json(bank_copy)
    m["backbone"]["name"] = name
    (bank_copy / "manifest.json").write_text(json.dumps(m))
    msg = error_of(capsys, "eval", "--bank", bank_copy, "--task-file", f"toy={files['csv']}")
    assert problem in msg


# ---- run files (--config), bank rm, --name with several tasks -------------------------------------

def write_config(path, **conf):
    path.write_text(json.dumps(conf))
    return path


def test_config_file_fills_what_flags_leave_out(capsys, tmp_path, files):
    conf = write_config(tmp_path / "run.json", backbone="tiny-bert", module="lora", options={"r": 2},
                        task_files=[f"toy={files['csv']}"], max_steps=3, batch_size=8, seed=1)
    bank = tmp_path / "b"
    got = run_json(capsys, "train", "--config", conf, "--out", bank)
    (row,) = got["results"]
    assert (row["module"], row["task"], row["steps"]) == ("toy-lora", "toy", 3)
    (e,) = read_manifest_json(bank)["modules"]
    assert e["config"]["r"] == 2
    assert read_manifest_json(bank)["backbone"]["name"] == "tiny-bert"
    # a flag wins over the file; --option overrides one key and keeps the rest
    got = run_json(capsys, "train", "--config", conf, "--out", bank, "--module", "ia3", "--max-steps", 2)
    assert [(r["module"], r["steps"]) for r in got["results"]] == [("toy-ia3", 2)]
    got = run_json(capsys, "train", "--config", conf, "--out", bank, "--name", "wide", "--option", "alpha=4")
    cfg = next(e for e in read_manifest_json(bank)["modules"] if e["name"] == "wide")["config"]
    assert (cfg["r"], cfg["alpha"]) == (2, 4)


def test_run_dir_writes_each_fits_curves(capsys, tmp_path, files):
    run_dir = tmp_path / "run"
    got = run_json(capsys, "train", "--backbone", "tiny-bert", "--module", "lora", "--option", "r=2",
                   "--task-file", f"toy={files['csv']}", "--task-file", f"toy2={files['jsonl']}",
                   "--out", tmp_path / "b", "--max-steps", 3, "--run-dir", run_dir)
    assert got["run_dir"] == str(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["toy-lora", "toy2-lora"]  # one directory per fit
    for row in got["results"]:
        with open(run_dir / row["module"] / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len([r for r in rows if r["train/loss"]]) == row["steps"] == 3
        assert [r for r in rows if r["val/acc"]], "no validation row"
    # a run file key too (the flag wins over it); without either, no logs and no run_dir in the output
    conf = write_config(tmp_path / "run.json", backbone="tiny-bert", module="ia3", max_steps=2,
                        task_files=[f"toy={files['csv']}"], run_dir=str(tmp_path / "from-file"))
    run_json(capsys, "train", "--config", conf, "--out", tmp_path / "b")
    assert (tmp_path / "from-file" / "toy-ia3" / "metrics.csv").is_file()
    got = run_json(capsys, "train", "--config", conf, "--out", tmp_path / "b", "--name", "flag", "--run-dir", run_dir)
    assert (run_dir / "flag" / "metrics.csv").is_file() and not (tmp_path / "from-file" / "flag").exists()
    got = run_json(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}", "--name", "none",
                   "--out", tmp_path / "b", "--max-steps", 1)
    assert "run_dir" not in got
    # a file is not a run directory; --help says what it is for
    (tmp_path / "afile").write_text("x")
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                   "--out", tmp_path / "c", "--run-dir", tmp_path / "afile")
    assert "--run-dir" in msg and "is a file" in msg and not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "metrics.csv" in " ".join(capsys.readouterr().out.split())


def test_shipped_configs_are_valid(capsys):
    """Every file under configs/ names known keys, known tasks and a known module type with valid options."""
    from pathlib import Path

    from mtpeft.api import parse_options
    from mtpeft.cli import TRAIN_CONFIG_KEYS, load_run_config
    from mtpeft.suite import builtin_names

    paths = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.y*ml"))
    assert paths
    for p in paths:
        from mtpeft.io import read_config

        if "benchmark" in read_config(p):  # a benchmark's config (benchmarks/bench_<name>.py), not a run file
            conf = read_config(p)
            assert set(conf["experts"] + conf["heldout"]) <= set(builtin_names()), p
            assert (Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{conf['benchmark']}.py").exists()
        elif p.name.startswith("continual-"):  # `mtpeft continual --config`
            from mtpeft.continual import STRATEGIES, load_config
            from mtpeft.continual.stream import STREAMS

            conf = load_config(p)
            assert conf["stream"] in STREAMS or set(conf["tasks"]) <= set(builtin_names()), p
            assert all(s in STRATEGIES for s in [conf["strategy"], *conf["compare"], *conf["strategies"]]), p
        elif p.name.startswith("mpt-"):  # `mtpeft distil --config`
            from mtpeft.mpt.config import load_distil_config

            load_distil_config(p)
            continue
        else:
            conf = load_run_config(p)
            assert set(conf) <= set(TRAIN_CONFIG_KEYS), p
            assert set(conf.get("tasks", [])) <= set(builtin_names()), p
        parse_options(conf.get("module", "lora"), [f"{k}={json.dumps(v)}" for k, v in conf.get("options", {}).items()])


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ("tasks: [a, b\n", "not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping"),
    ("!!python/object:os.system {}\n", "not valid YAML"),  # safe loading: no objects
    ("[1, 2]", "must hold a mapping"),
    ('{"learning_rate": 0.1}', "unknown key(s) ['learning_rate']"),
    ('{"options": [1]}', "'options' must be a mapping"),
    ('{"tasks": "bbc_topic"}', "'tasks' must be a list of strings"),
    ('{"run_dir": 3}', "'run_dir' must be a directory path"),
])
def test_bad_config_files(capsys, tmp_path, content, problem):
    yaml_like = not content.startswith(("{", "["))
    conf = tmp_path / ("run.yml" if yaml_like else "run.json")
    conf.write_text(content)
    msg = error_of(capsys, "train", "--config", conf, "--out", tmp_path / "b")
    assert problem in msg and str(conf) in msg
    assert not (tmp_path / "b").exists()
    msg = error_of(capsys, "train", "--config", tmp_path / "missing.json", "--out", tmp_path / "b")
    assert "run config not found" in msg


def test_name_with_several_tasks_needs_multitask(capsys, tmp_path, files):
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={files['csv']}",
                   "--task-file", f"toy2={files['jsonl']}", "--name", "one", "--out", tmp_path / "b")
    assert "--name names one module" in msg and "--multitask" in msg
    assert not (tmp_path / "b").exists()


def test_bank_rm(capsys, bank_copy):
    weights = module_file(bank_copy, "my-ia3")
    assert weights.is_file()
    rc, out, _ = run(capsys, "bank", "rm", bank_copy, "my-ia3")
    assert rc == 0 and "removed my-ia3" in out
    assert [e["name"] for e in read_manifest_json(bank_copy)["modules"]] == ["toy-lora"]
    assert not weights.exists()
    got = run_json(capsys, "bank", "ls", bank_copy)
    assert [m["name"] for m in got["modules"]] == ["toy-lora"]
    msg = error_of(capsys, "bank", "rm", bank_copy, "my-ia3")
    assert "no module 'my-ia3'" in msg and "toy-lora" in msg


def test_broken_pipe_is_quiet():
    """`mtpeft ... | head`: the reader leaves early; the command ends without a traceback."""
    import subprocess
    import sys

    prog = ("import mtpeft.cli as c\n"
            "def flood(args):\n"
            "    for _ in range(200000):\n"
            "        print('row ' * 20)\n"
            "p = c.build_parser()\n"
            "c.build_parser = lambda: p\n"
            "p._subparsers._group_actions[0].choices['tasks'].set_defaults(func=flood)\n"
            "raise SystemExit(c.main(['tasks']))\n")
    p = subprocess.run(f"{sys.executable} -c \"$PROG\" | head -n 1", shell=True, capture_output=True, text=True,
                       env={**__import__('os').environ, "PROG": prog}, timeout=120, check=False)
    assert p.stdout.startswith("row"), p
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_yaml_run_file_equals_the_json_one(capsys, tmp_path, files):
    conf = {"backbone": "tiny-bert", "module": "lora", "options": {"r": 2}, "task_files": [f"toy={files['csv']}"],
            "max_steps": 2, "batch_size": 8, "seed": 1}
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(conf))
    write_config(tmp_path / "run.json", **conf)
    a = run_json(capsys, "train", "--config", tmp_path / "run.yaml", "--out", tmp_path / "a")
    b = run_json(capsys, "train", "--config", tmp_path / "run.json", "--out", tmp_path / "b")
    strip = [{k: v for k, v in r.items() if k not in ("train_s", "train_seconds", "bank")} for r in (a["results"][0], b["results"][0])]
    assert strip[0] == strip[1]
    assert read_manifest_json(tmp_path / "a")["modules"][0]["config"]["r"] == 2
