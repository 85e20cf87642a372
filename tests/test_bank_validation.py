"""Every reader of bank, router and peft files validated before anything is allocated or changed: malformed
manifest entries, paths out of the bank, symlinks, shared files, oversized configs, non-finite or integer
weights, router state and peft adapters; module names; bad export targets. Each must be a clear MtpeftError
(``mtpeft: error:`` from the CLI), never a traceback, and nothing outside the bank is read or touched."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import error_of, run_json, write_csv

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.errors import MtpeftError
from mtpeft.interop import export_peft, import_peft
from mtpeft.modules.base import Stack
from mtpeft.routers import FixedRouter, Router


@pytest.fixture
def bank_dir(tmp_path):
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    bank.add("m0", "lora", {"r": 2})
    bank.add("m1", "ia3")
    bank.set_artifact("m0", "gate", torch.ones(4))
    d = tmp_path / "b"
    bank.save(d)
    return d


def edit(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def rehash(d, e):
    e["sha256"] = hashlib.sha256((d / e["file"]).read_bytes()).hexdigest()


def load(d):
    return ModuleBank.load(d, load_backbone("tiny-bert", seed=0))


def _set(i, key, value):
    def fn(m):
        m["modules"][i][key] = value
    return fn


MALFORMED = {
    "an entry that is a number": (lambda m: m["modules"].__setitem__(0, 5), r"a module entry is 5, not an object"),
    "metrics a string": (_set(0, "metrics", "abc"), r"'metrics' must be an object, got 'abc'"),
    "a non-string name": (_set(0, "name", 3), r"module name 3 is not a string \(a int\)"),
    "a NUL in a name": (_set(0, "name", "a\0b"), r"holds a control character"),
    "an escape in a name": (_set(0, "name", "a\x1b[31mb"), r"holds a control character"),
    "a slash in a name": (_set(0, "name", "a/b"), r"path separator"),
    "a missing key": (lambda m: m["modules"][0].pop("config"), r"lacks \['config'\]"),
    "task a number": (_set(0, "task", 5), r"'task' must be a string or null"),
    "merged a string": (_set(0, "merged", "yes"), r"'merged' must be true or false"),
    "config a list": (_set(0, "config", [1]), r"'config' must be an object"),
    "metadata a string": (_set(0, "metadata", "x"), r"'metadata' must be an object"),
    "type a list": (_set(0, "type", ["lora"]), r"'type' must be a string"),
    "a bad sha256": (_set(0, "sha256", "zz"), r"sha256 must be 64 lowercase hex digits"),
    "a duplicate name": (lambda m: m["modules"][1].update(name="m0"), r"is listed twice"),
    "two entries sharing a file": (lambda m: m["modules"][1].update(file=m["modules"][0]["file"],
                                                                    sha256=m["modules"][0]["sha256"]),
                                   r"is named by two entries"),
    "modules not a list": (lambda m: m.update(modules={"m0": 1}), r"lacks 'modules' \(a list\)"),
    "groups not a list": (lambda m: m.update(groups=5), r"'groups' must be a list"),
    "bank_id not hex": (lambda m: m.update(bank_id="../x"), r"'bank_id' must be"),
    "an unknown type": (_set(0, "type", "nope"), r"unknown type 'nope'"),
    "a config the type does not take": (_set(0, "config", {"r": "big"}), r"has a config its type 'lora' does not take"),
    "r as a float": (_set(0, "config", {"r": 1e9}), r"r must be an integer"),
    "a huge rank": (_set(0, "config", {"r": 2000000}), r"r=2000000 is far beyond this backbone's sizes"),
    "a rank the file does not have": (_set(0, "config", {"r": 3}), r"has shape \(2, 32\), its config makes \(3, 32\)"),
    "../outside": (_set(0, "file", "../outside.safetensors"), r"not a file inside the bank's modules/ folder"),
    "an absolute path": (_set(0, "file", "/etc/passwd"), r"not a file inside the bank's modules/ folder"),
    "NaN in JSON": (_set(0, "metrics", {"acc": float("nan")}), r"not valid JSON \(NaN is not a JSON value"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_manifests_are_clear_errors_before_anything_is_built(case, bank_dir, capsys, monkeypatch):
    fn, msg = MALFORMED[case]
    shutil.copy(bank_dir / json.loads((bank_dir / "manifest.json").read_text())["modules"][0]["file"],
                bank_dir.parent / "outside.safetensors")
    edit(bank_dir, fn)
    built = []
    monkeypatch.setattr(Stack, "add_expert", lambda *a, **k: built.append(1))
    bb = load_backbone("tiny-bert", seed=0)
    with pytest.raises(MtpeftError, match=msg):
        ModuleBank.load(bank_dir, bb)
    assert built == []  # refused before any module was allocated
    assert not any(type(m).__name__ == "BankedLinear" for m in bb.model.modules())
    if case in ("an unknown type", "a config the type does not take", "r as a float", "a huge rank",
                "a rank the file does not have"):
        return  # `bank ls` lists what it can read; loading refuses
    for cmd in (["bank", "ls", bank_dir], ["bank", "show", bank_dir, "m1"]):
        assert re.search(msg, error_of(capsys, *cmd))



def test_huge_configs_fail_fast_at_add_time(capsys, tmp_path):
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    with pytest.raises(MtpeftError, match=r"r=2000000 is far beyond .*give a smaller r"):
        bank.add("x", "lora", {"r": 2000000})
    with pytest.raises(MtpeftError, match=r"would hold [\d,]+ parameters, more than the"):
        _with_small_budget(lambda: bank.add("x", "lora", {"r": 512, "target_modules": ["query", "value"]}))
    assert bank.names == [] and bank.groups == {}
    csv = write_csv(tmp_path / "toy.csv")
    msg = error_of(capsys, "train", "--backbone", "tiny-bert", "--task-file", f"toy={csv}", "--out", tmp_path / "o",
                   "--option", "r=2000000", "--max-steps", "1")
    assert "r=2000000 is far beyond" in msg
    assert not (tmp_path / "o" / "manifest.json").exists()


def _with_small_budget(fn):
    from mtpeft.bank import plan

    old = plan.MIN_BUDGET
    plan.MIN_BUDGET = 1000  # the tiny backbone's own size then bounds a module
    try:
        fn()
    finally:
        plan.MIN_BUDGET = old


@pytest.mark.parametrize("bad", ["nan", "inf", "int64", "bool"])
def test_bad_weights_are_refused_naming_file_and_tensor(bad, bank_dir):
    e0 = {}
    edit(bank_dir, lambda m: e0.update(m["modules"][0]))
    f = bank_dir / e0["file"]
    t = load_file(f)
    k = sorted(t)[1]
    if bad in ("nan", "inf"):
        t[k][0, 0] = float(bad)
    else:
        t = {n: v.to(getattr(torch, bad)) for n, v in t.items()}
    save_file(t, f)
    edit(bank_dir, lambda m: rehash(bank_dir, m["modules"][0]))
    msg = {"nan": "NaN or infinite", "inf": "NaN or infinite", "int64": "is int64, not floating point",
           "bool": "is bool, not floating point"}[bad]
    with pytest.raises(MtpeftError, match=rf"{re.escape(e0['file'])}.*tensor '.*' .*{msg}"):
        load(bank_dir)


def test_nan_artifacts_are_refused(bank_dir):
    e0 = {}
    edit(bank_dir, lambda m: e0.update(m["modules"][0]))
    f = bank_dir / e0["artifacts"]["file"]
    save_file({"gate": torch.tensor([1.0, float("nan")])}, f)
    edit(bank_dir, lambda m: rehash(bank_dir, m["modules"][0]["artifacts"]))
    with pytest.raises(MtpeftError, match="tensor 'gate' holds 1 NaN"):
        load(bank_dir)


def test_outside_files_are_never_read_by_show(bank_dir, capsys, tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.zeros(1000)}, outside)
    for bad in ("../outside.safetensors", str(outside)):
        edit(bank_dir, _set(0, "file", bad))
        assert "not a file inside the bank's modules/ folder" in error_of(capsys, "bank", "show", bank_dir, "m0")


def test_a_symlinked_modules_folder_survives_train_out(capsys, tmp_path):
    csv = write_csv(tmp_path / "toy.csv")
    d = tmp_path / "bank"
    args = ["train", "--backbone", "tiny-bert", "--task-file", f"toy={csv}", "--out", d, "--max-steps", "1"]
    run_json(capsys, *args, "--name", "a")
    elsewhere = tmp_path / "my-models"
    (d / "modules").rename(elsewhere)
    (d / "modules").symlink_to(elsewhere)
    save_file({"w": torch.ones(3)}, elsewhere / "my-own.safetensors")
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    assert "modules is a symbolic link" in error_of(capsys, *args, "--name", "b")
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before


@pytest.mark.parametrize("name", ["a\0b", "a\x1bb", "a/b", "..", "", " a", 5])
def test_module_names_are_checked_at_add(name):
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    with pytest.raises(MtpeftError, match="module name"):
        bank.add(name, "lora", {"r": 2})


def test_bad_export_targets_are_clear_errors(bank_dir, capsys, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    for target in (".", "..", "/", str(bank_dir / "manifest.json"), str(bank_dir), "/proc/nope/x"):
        error_of(capsys, "bank", "export", bank_dir, "m0", target)
    assert os.listdir(tmp_path / "empty") == []
    assert sorted(os.listdir(bank_dir)) == [".mtpeft.lock", "artifacts", "manifest.json", "modules"]


# ---- routers -------------------------------------------------------------------------------------

@pytest.fixture
def router_dir(tmp_path):
    FixedRouter({"a": 0.25, "b": 0.75}).save(tmp_path / "r")
    return tmp_path / "r"


def _router_json(d, **changes):
    m = json.loads((d / "router.json").read_text())
    m.update(changes)
    (d / "router.json").write_text(json.dumps(m))


ROUTER_CASES = {
    "NaN weights": (lambda d: save_file({"weights": torch.tensor([float("nan"), 1.0])}, d / "router.safetensors"),
                    r"tensor 'weights' holds 1 NaN"),
    "integer weights": (lambda d: save_file({"weights": torch.tensor([1, 2])}, d / "router.safetensors"),
                        r"tensor 'weights' is int64, expected float32"),
    "a wrong shape": (lambda d: save_file({"weights": torch.ones(3)}, d / "router.safetensors"),
                      r"router state holds weights \[3\], router 'fixed' with this config expects weights \[2\]"),
    "a name that is a list": (lambda d: _router_json(d, name=["fixed"]), r"is not an mtpeft router"),
    "bound_names a number": (lambda d: _router_json(d, bound_names=5), r"'bound_names' must be a list of names"),
    "a config that does not fit": (lambda d: _router_json(d, config={"weights": {"a": "x"}}),
                                   r"config does not fit router 'fixed'"),
    "config weights a list": (lambda d: _router_json(d, config={"weights": [[1]]}), r"config does not fit"),
    "a missing state file": (lambda d: (d / "router.safetensors").unlink(), r"router state not found"),
    "not safetensors": (lambda d: (d / "router.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}"),
                        r"corrupted or not safetensors"),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_files_are_validated(case, router_dir):
    fn, msg = ROUTER_CASES[case]
    fn(router_dir)
    with pytest.raises(MtpeftError, match=msg):
        Router.load(router_dir)


# ---- peft adapters -------------------------------------------------------------------------------

@pytest.fixture
def adapter(tmp_path):
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    bank.add("m0", "lora", {"r": 2})
    export_peft(bank, "m0", tmp_path / "ad")
    return tmp_path / "ad"


def _adapter_json(d, **changes):
    m = json.loads((d / "adapter_config.json").read_text())
    m.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(m))


def _adapter_weights(d, fn):
    t = load_file(d / "adapter_model.safetensors")
    save_file(fn(t), d / "adapter_model.safetensors")


PEFT_CASES = {
    "NaN weights": (lambda d: _adapter_weights(d, lambda t: {k: v.fill_(float("nan")) for k, v in t.items()}),
                    r"holds \d+ NaN or infinite"),
    "int64 weights": (lambda d: _adapter_weights(d, lambda t: {k: v.long() for k, v in t.items()}),
                      r"is int64, not floating point"),
    "r a string": (lambda d: _adapter_json(d, r="8"), r"r must be a positive integer, got '8'"),
    "r zero": (lambda d: _adapter_json(d, r=0), r"r must be a positive integer"),
    "alpha a bool": (lambda d: _adapter_json(d, lora_alpha=True), r"lora_alpha must be a positive number"),
    "a bad regex": (lambda d: _adapter_json(d, rank_pattern={"(": 4}), r"is not a valid regular expression"),
    "modules_to_save numbers": (lambda d: _adapter_json(d, modules_to_save=[1]), r"modules_to_save must be"),
    "a huge rank": (lambda d: _adapter_json(d, r=2000000), r"with rank 2000000 needs"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapters_are_validated(case, adapter):
    fn, msg = PEFT_CASES[case]
    fn(adapter)
    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    with pytest.raises(MtpeftError, match=msg):
        import_peft(bank, adapter, name="x")
    assert bank.names == []


def test_imported_adapter_names_are_checked(adapter, tmp_path):
    bad = tmp_path / "a\x1bb"
    shutil.copytree(adapter, bad)
    with pytest.raises(MtpeftError, match="holds a control character"):
        import_peft(ModuleBank(load_backbone("tiny-bert", seed=0)), bad)


def test_bank_ls_imports_no_torch(bank_dir):
    import subprocess
    import sys

    code = ("import sys; from mtpeft.cli import main; rc = main(['bank', 'ls', sys.argv[1], '--json'])\n"
            "assert 'torch' not in sys.modules, 'bank ls imported torch'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(bank_dir)], capture_output=True, text=True, cwd=os.getcwd(),
                       check=False)
    assert p.returncode == 0, p.stderr
    assert [m["name"] for m in json.loads(p.stdout)["modules"]] == ["m0", "m1"]
