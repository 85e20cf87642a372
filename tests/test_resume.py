"""`mtpeft train --resume`: the run state (BANK/runs/<run-id>.json), what a resumed run skips and retrains,
the errors (no state, other settings, a bank changed since), and the run-state reader on broken files.

Interruptions here are exceptions raised in-process at a chosen instant (KeyboardInterrupt, as Ctrl-C
gives); real SIGKILLs at random instants are in test_crash_resume.py.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import write_csv

import mtpeft.train
from mtpeft.cli import main
from mtpeft.errors import MtpeftError
from mtpeft.runstate import RUNS, Run, read_state

TASKS = ("ta", "tb", "tc")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return {t: write_csv(d / f"{t}.csv", t, seed=i) for i, t in enumerate(TASKS)}


def argv(files, bank, *extra, multitask=False):
    tasks = [x for t in TASKS for x in ("--task-file", f"{t}={files[t]}")]
    return ["train", "--backbone", "tiny-bert", *tasks, "--max-steps", "2", "--batch-size", "8",
            "--max-examples", "24", "--option", "r=2", "--option", "dropout=0.1", "--seed", "3", "--out", str(bank), "--json",
            *(["--multitask"] if multitask else []), *extra]


def run(capsys, args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def results(out: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in json.loads(out)["results"]]


def sums(bank) -> dict:
    from mtpeft.bank import read_manifest

    return {e["name"]: e["sha256"] for e in read_manifest(bank)["modules"]}


def states(bank) -> list[dict]:
    return [read_state(p) for p in sorted((bank / RUNS).glob("*.json"))]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """An uninterrupted run: its results and module checksums, for experts and for one multitask module."""
    import contextlib
    import io

    out = {}
    for multitask in (False, True):
        bank = tmp_path_factory.mktemp("ref") / "bank"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv(files, bank, multitask=multitask)) == 0
        out[multitask] = (results(buf.getvalue()), sums(bank), bank)
    return out


def interrupt(monkeypatch, target, attr, when):
    """Make ``target.attr`` raise KeyboardInterrupt when called for the module named ``when``."""
    real = getattr(target, attr)

    def wrapped(*a, **kw):
        names = [x for x in (*a, *kw.values()) if isinstance(x, str)]
        if when in names:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(target, attr, wrapped)


def test_run_state_of_a_finished_run(reference):
    rows, _, bank = reference[False]
    (s,) = states(bank)
    assert s["status"] == "finished"
    assert [u["name"] for u in s["units"]] == ["ta-lora", "tb-lora", "tc-lora"]
    assert s["config"]["lr"] == 1e-3 and s["config"]["seed"] == 3 and s["config"]["options"]["r"] == 2
    assert [t["name"] for t in s["config"]["tasks"]] == list(TASKS)
    assert [{k: v for k, v in r.items() if k != "train_seconds"} for r in s["report"]["results"]] == rows


def test_resume_after_an_interrupted_fit(files, reference, tmp_path, capsys, monkeypatch):
    rows, want, _ = reference[False]
    bank = tmp_path / "bank"
    interrupt(monkeypatch, mtpeft.train, "fit_expert", "tb-lora")
    with pytest.raises(KeyboardInterrupt):
        main(argv(files, bank))
    monkeypatch.undo()
    assert sums(bank) == {"ta-lora": want["ta-lora"]}  # the finished module is on disk, the interrupted one not
    (s,) = states(bank)
    assert s["status"] == "running" and [u["name"] for u in s["units"]] == ["ta-lora"]
    capsys.readouterr()

    rc, _, err = run(capsys, argv(files, bank))  # without --resume: refused, told what to do
    assert rc == 2 and "unfinished training run" in err and "--resume" in err and RUNS in err

    rc, out, err = run(capsys, argv(files, bank, "--resume"))
    assert rc == 0, err
    assert "resuming" in err and "1 of 3" in err
    assert results(out) == rows
    assert sums(bank) == want  # bit-identical modules
    (s,) = states(bank)
    assert s["status"] == "finished"

    rc, out2, err = run(capsys, argv(files, bank, "--resume"))  # a finished run: its report again
    assert rc == 0 and results(out2) == rows and "finished already" in err


def test_resume_retrains_a_module_saved_but_not_recorded(files, reference, tmp_path, capsys, monkeypatch):
    """A kill between the bank's save and the run state's: the module is in the bank, not in the state."""
    rows, want, _ = reference[False]
    bank = tmp_path / "bank"
    interrupt(monkeypatch, Run, "finished", "tb-lora")
    with pytest.raises(KeyboardInterrupt):
        main(argv(files, bank))
    monkeypatch.undo()
    assert set(sums(bank)) == {"ta-lora", "tb-lora"}
    capsys.readouterr()
    rc, out, err = run(capsys, argv(files, bank, "--resume"))
    assert rc == 0, err
    assert "'tb-lora' reached the bank" in err
    assert results(out) == rows and sums(bank) == want


def test_resume_of_a_multitask_run(files, reference, tmp_path, capsys, monkeypatch):
    rows, want, _ = reference[True]
    bank = tmp_path / "bank"
    interrupt(monkeypatch, mtpeft.train, "evaluate", "multitask-lora")
    with pytest.raises(KeyboardInterrupt):
        main(argv(files, bank, multitask=True))
    monkeypatch.undo()
    assert not (bank / "manifest.json").exists()  # nothing committed: the folder holds the run state only
    capsys.readouterr()
    rc, out, err = run(capsys, argv(files, bank, "--resume", multitask=True))
    assert rc == 0, err
    assert results(out) == rows and sums(bank) == want


def test_resume_refuses_other_settings(files, tmp_path, capsys, monkeypatch):
    bank = tmp_path / "bank"
    interrupt(monkeypatch, mtpeft.train, "fit_expert", "tb-lora")
    with pytest.raises(KeyboardInterrupt):
        main(argv(files, bank))
    monkeypatch.undo()
    capsys.readouterr()
    rc, _, err = run(capsys, argv(files, bank, "--resume", "--lr", "0.01", "--option", "alpha=4"))
    assert rc == 2
    assert "lr: saved 0.001, given 0.01" in err and "options:" in err and "remove that file" in err
    # the same flags, but a task file edited since the run started
    edited = tmp_path / "ta.csv"
    edited.write_text(files["ta"].read_text(encoding="utf-8").replace("apple", "pear"), encoding="utf-8")
    args = [a.replace(str(files["ta"]), str(edited)) for a in argv(files, bank, "--resume")]
    rc, _, err = run(capsys, args)
    assert rc == 2 and "the data of task(s) ['ta'] changed" in err


def test_resume_with_nothing_to_resume(files, tmp_path, capsys):
    rc, _, err = run(capsys, argv(files, tmp_path / "new", "--resume"))
    assert rc == 2 and "no unfinished run to resume" in err and "drop --resume" in err
    assert not (tmp_path / "new" / "manifest.json").exists()


def test_resume_refuses_a_bank_changed_since(files, reference, tmp_path, capsys, monkeypatch):
    bank = tmp_path / "bank"
    interrupt(monkeypatch, mtpeft.train, "fit_expert", "tc-lora")
    with pytest.raises(KeyboardInterrupt):
        main(argv(files, bank))
    monkeypatch.undo()
    capsys.readouterr()
    assert run(capsys, ["bank", "rm", bank, "ta-lora"])[0] == 0
    rc, _, err = run(capsys, argv(files, bank, "--resume"))
    assert rc == 2 and "'ta-lora'" in err and "no longer in the bank" in err


# ---- the run-state reader on broken files -------------------------------------------------------------
@pytest.fixture(scope="module")
def good_state(reference):
    (path,) = sorted((reference[False][2] / RUNS).glob("*.json"))
    return path.read_bytes()


@pytest.mark.parametrize("edit", [
    lambda s: s.update(format="other"), lambda s: s.update(schema_version=99), lambda s: s.update(status="odd"),
    lambda s: s.update(config=[]), lambda s: s["units"].append({"name": "zz-lora", "modules": {}, "rows": []}),
    lambda s: s["units"][0]["modules"].update({"ta-lora": "not-a-sha"}), lambda s: s.update(units=[1]),
    lambda s: s["units"].append(dict(s["units"][0])), lambda s: s["config"].update(modules="ta-lora"),
])
def test_read_state_refuses_bad_fields(good_state, tmp_path, edit):
    s = json.loads(good_state)
    edit(s)
    p = tmp_path / "s.json"
    p.write_text(json.dumps(s), encoding="utf-8")
    with pytest.raises(MtpeftError, match="not a valid mtpeft run state.*remove it"):
        read_state(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_state_fuzzed(good_state, tmp_path, data):
    """Truncations, byte flips and random bytes: read_state loads or raises MtpeftError, nothing else."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "random"]))
    if kind == "truncate":
        blob = good_state[: data.draw(st.integers(0, len(good_state) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(good_state) - 1))
        blob = good_state[:i] + bytes([data.draw(st.integers(0, 255))]) + good_state[i + 1:]
    else:
        blob = data.draw(st.binary(max_size=300))
    p = tmp_path / "fuzz.json"
    p.write_bytes(blob)
    try:
        s = read_state(p)
    except MtpeftError:
        return
    assert s["format"] == "mtpeft-run"  # what loads is a checked state


def test_a_folder_killed_before_its_first_commit_is_a_new_bank(tmp_path):
    """What a kill before the manifest's first commit leaves (run state, lock, a content-named weights file,
    temporary files) does not make `train --out` refuse the folder; anything else in it does."""
    from mtpeft.api import load_bank_or_new

    bank = tmp_path / "bank"
    (bank / RUNS).mkdir(parents=True)
    (bank / RUNS / "20260101T000000Z-1.json").write_text("{}")
    (bank / "modules").mkdir()
    (bank / "modules" / "ta-lora.0123456789abcdef.safetensors").write_bytes(b"x")
    (bank / "modules" / ".ta-lora.0123456789abcdef.safetensors.k2j.tmp").write_bytes(b"x")
    (bank / ".manifest.json.ab12.tmp").write_text("{")
    b, _ = load_bank_or_new("tiny-bert", bank)
    assert b.names == []
    (bank / "modules" / "mine.safetensors").write_bytes(b"a user's file")
    with pytest.raises(MtpeftError, match="not empty and is not a bank"):
        load_bank_or_new("tiny-bert", bank)


def test_two_runs_in_one_second_keep_their_own_states(tmp_path):
    """Run ids are time + pid: a second run of the same process in the same second must not overwrite the
    first one's state (and the later one sorts last)."""
    from mtpeft.runstate import Run, _states

    conf = {"modules": ["m"], "x": 1}
    paths = []
    for _ in range(3):
        with Run(tmp_path, conf) as run:
            run._start()
            paths.append(run.path)
            run.state["status"] = "finished"
            run._write()
    assert len(set(paths)) == 3 and all(p.exists() for p in paths)
    assert [p for p, _ in _states(tmp_path / "runs")] == paths
