"""No pickle anywhere: every load path runs with ``pickle``'s loaders, ``dill``'s and ``torch.load`` made to fail
(and recorded, in case a caller swallows the failure): bank load, router load, peft import, task files,
the built-in suite (built, then read from its Arrow cache), backbones. Plus a static check that no mtpeft
source calls a pickle loader."""
from __future__ import annotations

import _pickle
import ast
import pickle
from pathlib import Path

import pytest
import torch
from test_cli import write_csv, write_jsonl

SRC = Path(__file__).resolve().parent.parent / "mtpeft"


class PickleLoaded(AssertionError):
    pass


@pytest.fixture
def no_pickle(monkeypatch):
    calls = []

    def refuse(what):
        def f(*a, **k):
            calls.append(what)
            raise PickleLoaded(f"{what} called: mtpeft must never load a pickle")
        return f

    for mod in (pickle, _pickle):
        for name in ("load", "loads"):
            monkeypatch.setattr(mod, name, refuse(f"{mod.__name__}.{name}"))
        # a class still (libraries subclass it at import), whose instances refuse to load
        monkeypatch.setattr(mod, "Unpickler", type("Unpickler", (mod.Unpickler,),
                                                   {"load": refuse(f"{mod.__name__}.Unpickler.load")}))
    monkeypatch.setattr(pickle._Unpickler, "load", refuse("pickle._Unpickler.load"))
    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    try:
        import dill

        for name in ("load", "loads"):
            monkeypatch.setattr(dill, name, refuse(f"dill.{name}"))
    except ImportError:
        pass
    yield calls
    assert calls == [], calls


def test_the_refusal_works(no_pickle):
    with pytest.raises(PickleLoaded):
        pickle.loads(pickle.dumps(1))
    with pytest.raises(PickleLoaded):
        torch.load("x")
    no_pickle.clear()


def test_bank_router_and_peft_loads(no_pickle, tmp_path):
    from mtpeft.backbone import load_backbone
    from mtpeft.bank import ModuleBank
    from mtpeft.interop import export_peft, import_peft
    from mtpeft.routers import FixedRouter, Router

    for name in ("tiny-bert", "tiny-llama"):
        bank = ModuleBank(load_backbone(name, seed=0))
        bank.add("a", "lora", {"r": 2})
        bank.add("p", "prompt", {"n_tokens": 2})
        bank.set_artifact("a", "gate", torch.ones(3))
        bank.save(tmp_path / name)
        back = ModuleBank.load(tmp_path / name, load_backbone(name, seed=0))
        assert back.names == ["a", "p"]
        export_peft(back, "a", tmp_path / f"{name}-ad")
        fresh = ModuleBank(load_backbone(name, seed=0))
        assert import_peft(fresh, tmp_path / f"{name}-ad", name="imp") == "imp"
    FixedRouter({"a": 1.0}).save(tmp_path / "r")
    assert isinstance(Router.load(tmp_path / "r"), FixedRouter)


def test_task_files_and_cli_reads(no_pickle, tmp_path, capsys):
    from mtpeft.cli import main
    from mtpeft.tasks import load_task_file

    csv, jsonl = write_csv(tmp_path / "t.csv"), write_jsonl(tmp_path / "t.jsonl")
    for p in (csv, jsonl):
        assert len(load_task_file("t", p).splits["train"]) > 0
    rc = main(["train", "--backbone", "tiny-bert", "--task-file", f"toy={csv}", "--out", str(tmp_path / "b"),
               "--max-steps", "1", "--json"])
    assert rc == 0
    for argv in (["bank", "ls", tmp_path / "b"], ["bank", "show", tmp_path / "b", "toy-lora"],
                 ["eval", "--bank", tmp_path / "b", "--task-file", f"toy={csv}"]):
        assert main([str(a) for a in argv] + ["--json"]) == 0
    capsys.readouterr()


def test_builtin_suite_build_and_cache(no_pickle, tmp_path, monkeypatch):
    from mtpeft.suite import builtin_names, load_builtin

    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path / "cache"))
    name = "tweet_selfdriving" if "tweet_selfdriving" in builtin_names() else builtin_names()[0]
    first = load_builtin(name, seed=0)  # built from the shipped files, written to the Arrow cache
    again = load_builtin(name, seed=0)  # read back from the cache
    assert len(again.splits["train"]) == len(first.splits["train"]) > 0
    assert (tmp_path / "cache" / "tasks").is_dir()


def test_shipped_backbone_loads_without_pickle(no_pickle):
    from mtpeft.backbone import load_backbone

    bb = load_backbone("minilm")
    assert bb.family == "encoder"


# ---- static: no mtpeft source calls a pickle loader ----------------------------------------------

LOADERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("_pickle", "load"),
           ("_pickle", "loads"), ("dill", "load"), ("dill", "loads"), ("torch", "load"), ("joblib", "load"),
           ("cloudpickle", "load"), ("cloudpickle", "loads"), ("np", "load"), ("numpy", "load")}
MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def offenders(tree: ast.AST, rel: str) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"{rel}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] in MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in MODULES:
            out.append(f"{rel}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            out.append(f"{rel}:{node.lineno} from torch import load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in LOADERS:
            out.append(f"{rel}:{node.lineno} {node.func.value.id}.{node.func.attr}(...)")
    return out


def test_no_source_calls_a_pickle_loader():
    found = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30
    for f in files:
        found += offenders(ast.parse(f.read_text(encoding="utf-8")), str(f.relative_to(SRC.parent)))
    assert found == []


def test_the_static_check_finds_what_it_looks_for():
    code = "import pickle\nfrom dill import loads\nimport torch\ntorch.load('x')\nnp.load('y')\n"
    assert len(offenders(ast.parse(code), "x.py")) == 4
    assert offenders(ast.parse("msg = 'torch.load(f)'\n"), "x.py") == []  # a hint in a message is no call
