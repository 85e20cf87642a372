"""Banks on disk: crash safety of save, artifacts, files named by content, paths kept inside the bank,
stale files, and banks of the previous layout."""
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank, remove_saved_module
from mtpeft.bank.core import BankedLinear
from mtpeft.io import MtpeftError

BACKBONES = ["tiny-bert", "tiny-llama"]


def _randomise(bank, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.module_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    for _, stack in bank.stacks_of(name):
        stack.invalidate()


def _bank_a(name):
    """Bank A: two LoRAs (one group, with a group artifact), an (IA)3; artifacts on m0 and m1."""
    bank = ModuleBank(load_backbone(name, seed=0))
    for i, (n, t) in enumerate([("m0", "lora"), ("m1", "lora"), ("m3", "ia3")]):
        bank.add(n, t, {"r": 4} if t == "lora" else None, task=f"t{i}", trainable=False)
        _randomise(bank, n, seed=i + 1)
    bank.set_artifact("m0", "gate", torch.randn(32, generator=torch.Generator().manual_seed(10)))
    bank.set_artifact("m0", "arrow.proto", torch.arange(6, dtype=torch.int64).reshape(2, 3))
    bank.set_artifact("m1", "gate", torch.randn(32, generator=torch.Generator().manual_seed(11)))
    bank.set_group_artifact(bank.group_of("m0").key, "shared", torch.randn(4, 8).half())
    bank.record("m0").metrics["acc"] = 0.5
    return bank


def _to_b(bank):
    """A -> B: m0 retrained in place and its gate changed, m1 removed, m2 added with an artifact,
    the group artifact changed; m3 untouched."""
    _randomise(bank, "m0", seed=20)
    bank.set_artifact("m0", "gate", torch.full((32,), 3.0))
    bank.remove("m1")
    bank.add("m2", "lora", {"r": 4}, task="t2", trainable=False)
    _randomise(bank, "m2", seed=21)
    bank.set_artifact("m2", "gate", torch.full((32,), -1.0))
    bank.set_group_artifact(bank.group_of("m0").key, "shared", torch.ones(4, 8).half())
    bank.record("m0").metrics["acc"] = 0.75


def snapshot(bank):
    """Everything a saved bank restores: records, parameters, module and group artifacts (CPU clones)."""
    return {
        "records": copy.deepcopy([(r.name, r.type, r.config, r.task, r.metrics, r.metadata, r.merged, r.finalized)
                                  for r in bank.records]),
        "params": {n: {k: v.detach().cpu().clone() for k, v in bank.module_parameters(n).items()} for n in bank.names},
        "artifacts": {n: {k: v.cpu().clone() for k, v in bank.artifacts(n).items()} for n in bank.names},
        "groups": {k: {a: v.cpu().clone() for a, v in bank.group_artifacts(k).items()} for k in bank.groups},
    }


def same(a, b) -> bool:
    """Exact equality of two snapshots (tensors: same dtype, shape and values)."""
    if a["records"] != b["records"]:
        return False
    for part in ("params", "artifacts", "groups"):
        if a[part].keys() != b[part].keys():
            return False
        for owner in a[part]:
            x, y = a[part][owner], b[part][owner]
            if x.keys() != y.keys() or any(x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k]) for k in x):
                return False
    return True


def files_in(d: Path) -> set[str]:
    """The bank's files (its lock file aside)."""
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != ".mtpeft.lock"}


def referenced(d: Path) -> set[str]:
    m = json.loads((d / "manifest.json").read_text())
    out = {"manifest.json"} | {e["file"] for e in m["modules"]}
    out |= {e["artifacts"]["file"] for e in m["modules"] if e.get("artifacts")}
    return out | {g["file"] for g in m.get("groups", [])}


# ---- crash safety ------------------------------------------------------------------------------

class SimulatedCrash(BaseException):
    """The process dies here: raised at the N-th file operation and at every one after it."""


class Ops:
    """Counts the file operations a save performs (creating a temporary file, fsync, rename, unlink) and
    crashes at the ``crash_at``-th; logs each with the path it acts on."""

    def __init__(self, monkeypatch):
        self.n, self.crash_at, self.log = 0, None, []
        real = {"mkstemp": tempfile.mkstemp, "fsync": os.fsync, "replace": os.replace, "unlink": os.unlink}
        self.real = real

        def wrap(kind, path_of):
            def op(*a, **k):
                if self.crash_at is not None and self.n >= self.crash_at:
                    raise SimulatedCrash(f"{kind} #{self.n}")
                self.n += 1
                self.log.append((kind, path_of(*a, **k)))
                return real[kind](*a, **k)
            return op

        def fd_path(fd):
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return None

        monkeypatch.setattr(tempfile, "mkstemp", wrap("mkstemp", lambda *a, **k: k.get("dir")))
        monkeypatch.setattr(os, "fsync", wrap("fsync", fd_path))
        monkeypatch.setattr(os, "replace", wrap("replace", lambda src, dst: (str(src), str(dst))))
        monkeypatch.setattr(os, "unlink", wrap("unlink", lambda p, *a, **k: str(p)))

    def arm(self, crash_at=None):
        self.n, self.crash_at, self.log = 0, crash_at, []


@pytest.mark.parametrize("only", [None, ["m0", "m2"]], ids=["full", "only"])
@pytest.mark.parametrize("name", BACKBONES)
def test_bank_is_loadable_after_a_crash_at_every_point_of_save(name, only, tmp_path, monkeypatch):
    bank = _bank_a(name)
    pristine = tmp_path / "a"
    bank.save(pristine)
    want_a = snapshot(bank)
    _to_b(bank)
    want_b = snapshot(bank)
    if only is not None:
        # a module left out of `only` keeps the file it has on disk, whatever memory holds
        _randomise(bank, "m3", seed=99)
        assert not same(snapshot(bank), want_b)
    assert not same(want_a, want_b)

    ops = Ops(monkeypatch)
    ops.arm()
    full = tmp_path / "full"
    shutil.copytree(pristine, full)
    bank.save(full, only=only)
    total = ops.n
    log = list(ops.log)
    assert total > 12, log  # 5 new files x (mkstemp, fsync, rename, fsync dir) + the manifest + 5 unlinks
    # The manifest's rename is the one commit point: every new file is on disk (fsynced, renamed, its
    # directory fsynced) before it, and nothing is deleted before it.
    commit = next(i for i, (k, p) in enumerate(log) if k == "replace" and p[1].endswith("manifest.json"))
    assert all(k != "unlink" for k, _ in log[:commit])
    assert [k for k, _ in log[commit + 1:]][:1] == ["fsync"]  # the bank directory, after the rename
    assert any(k == "unlink" for k, _ in log[commit + 1:])
    if os.path.exists("/proc/self/fd"):  # fsync is logged with the path of its file descriptor
        real = os.path.realpath
        for i, (k, p) in enumerate(log):
            if k == "replace":
                src, dst = map(real, p)
                assert src in [q for kk, q in log[:i] if kk == "fsync"], f"{src} renamed before its fsync"
                assert real(Path(dst).parent) in [q for kk, q in log[i + 1:] if kk == "fsync"], \
                    f"{dst}: its directory is not fsynced after the rename"

    outcomes = []
    for n in range(total + 1):
        d = tmp_path / f"crash{n}"
        shutil.copytree(pristine, d)
        ops.arm(crash_at=n)
        if n < total:
            with pytest.raises(SimulatedCrash):
                bank.save(d, only=only)
        else:
            bank.save(d, only=only)
        ops.arm()  # the process restarts: no more crashes
        got = snapshot(ModuleBank.load(d, load_backbone(name, seed=0)))
        if same(got, want_a):
            outcomes.append("A")
        else:
            assert same(got, want_b), f"crash at operation {n} ({log[n] if n < total else 'none'}): neither A nor B"
            outcomes.append("B")
        # the next save completes, gives B and leaves only the files its manifest references
        bank.save(d, only=only)
        assert same(snapshot(ModuleBank.load(d, load_backbone(name, seed=0))), want_b)
        assert files_in(d) == referenced(d), n
    # A until the commit, B from it on: both outcomes are exercised
    assert outcomes == ["A"] * (commit + 1) + ["B"] * (total - commit), outcomes


def test_save_does_not_write_what_is_already_there(tmp_path, monkeypatch):
    bank = _bank_a("tiny-bert")
    bank.save(tmp_path / "b")
    before = {f: (tmp_path / "b" / f).stat().st_mtime_ns for f in files_in(tmp_path / "b")}
    ops = Ops(monkeypatch)
    ops.arm()
    bank.save(tmp_path / "b")
    # only the manifest is written again: every other file has its content already, under its name
    (only_rename,) = [p for k, p in ops.log if k == "replace"]
    assert only_rename[1].endswith("manifest.json") and not [k for k, _ in ops.log if k == "unlink"]
    assert {f: (tmp_path / "b" / f).stat().st_mtime_ns for f in files_in(tmp_path / "b")
            if f != "manifest.json"} == {f: t for f, t in before.items() if f != "manifest.json"}
    # the same bank saved elsewhere (another process would do the same) gives the same file names
    bank.save(tmp_path / "c")
    assert files_in(tmp_path / "b") == files_in(tmp_path / "c")


def test_layout_names_files_by_content(tmp_path):
    bank = _bank_a("tiny-bert")
    d = tmp_path / "b"
    bank.save(d)
    m = json.loads((d / "manifest.json").read_text())
    assert m["schema_version"] == 1
    key = bank.group_of("m0").key
    for e in m["modules"]:
        assert e["file"] == f"modules/{e['name']}.{e['sha256'][:16]}.safetensors"
    arts = {e["name"]: e.get("artifacts") for e in m["modules"]}
    assert arts["m3"] is None and arts["m0"]["file"] == f"artifacts/m0.{arts['m0']['sha256'][:16]}.safetensors"
    (g,) = m["groups"]
    assert g["key"] == key and ":" in key
    assert g["file"] == f"artifacts/{key.replace(':', '-')}.{g['sha256'][:16]}.safetensors"
    import hashlib

    for ref in [*m["modules"], arts["m0"], arts["m1"], g]:
        assert hashlib.sha256((d / ref["file"]).read_bytes()).hexdigest() == ref["sha256"]
    assert files_in(d) == referenced(d)


# ---- artifacts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
def test_artifacts_survive_save_and_load(name, tmp_path):
    bank = _bank_a(name)
    want = snapshot(bank)
    bank.save(tmp_path / "b")
    loaded = ModuleBank.load(tmp_path / "b", load_backbone(name, seed=0))
    assert same(snapshot(loaded), want)
    key = loaded.group_of("m0").key
    assert loaded.group_artifact(key, "shared").dtype == torch.float16
    assert torch.equal(loaded.artifact("m0", "arrow.proto"), torch.arange(6).reshape(2, 3))
    assert loaded.artifacts("m3") == {}
    # and again, through a second save of the loaded bank
    loaded.save(tmp_path / "c")
    assert same(snapshot(ModuleBank.load(tmp_path / "c", load_backbone(name, seed=0))), want)


def test_artifacts_go_with_their_module_in_memory(tmp_path):
    bank = _bank_a("tiny-bert")
    key = bank.group_of("m0").key
    bank.remove("m0")
    assert bank._artifacts.all("module", "m0") == {}
    with pytest.raises(MtpeftError, match="no module 'm0'"):
        bank.artifacts("m0")
    assert "shared" in bank.group_artifacts(key)  # m1 is still in the group
    bank.remove("m1")  # the group's last member: its artifacts go with it
    assert key not in bank.groups and bank._artifacts.all("group", key) == {}
    bank.add("m0", "lora", {"r": 4})  # the same name, the same group again: nothing comes back
    assert bank.artifacts("m0") == {} and bank.group_artifacts(key) == {}


def test_artifacts_go_with_their_module_on_disk(tmp_path):
    bank = _bank_a("tiny-bert")
    d = tmp_path / "b"
    bank.save(d)
    m = json.loads((d / "manifest.json").read_text())
    files = {e["name"]: e for e in m["modules"]}
    group_file = m["groups"][0]["file"]

    remove_saved_module(d, "m0")
    m = json.loads((d / "manifest.json").read_text())
    assert [e["name"] for e in m["modules"]] == ["m1", "m3"]
    assert not (d / files["m0"]["file"]).exists() and not (d / files["m0"]["artifacts"]["file"]).exists()
    assert (d / group_file).is_file() and m["groups"][0]["file"] == group_file  # m1 is still in the group
    remove_saved_module(d, "m1")  # the last of the group
    m = json.loads((d / "manifest.json").read_text())
    assert m["groups"] == [] and not (d / group_file).exists()
    assert not (d / files["m1"]["artifacts"]["file"]).exists()
    assert files_in(d) == referenced(d)
    loaded = ModuleBank.load(d, load_backbone("tiny-bert", seed=0))
    assert loaded.names == ["m3"] and loaded.artifacts("m3") == {}

    # a save after bank.remove drops them the same way
    bank2 = _bank_a("tiny-bert")
    d2 = tmp_path / "c"
    bank2.save(d2)
    art = json.loads((d2 / "manifest.json").read_text())["modules"][1]["artifacts"]["file"]
    bank2.remove("m1")
    bank2.save(d2)
    m = json.loads((d2 / "manifest.json").read_text())
    assert [e["name"] for e in m["modules"]] == ["m0", "m3"] and not (d2 / art).exists()
    assert art not in json.dumps(m) and files_in(d2) == referenced(d2)


def _break(d, edit):
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _untouched(bb):
    """Nothing was loaded: the backbone has no bank and takes a new one."""
    assert not any(isinstance(x, BankedLinear) for x in bb.model.modules())
    ModuleBank(bb)


def test_artifact_file_errors(tmp_path):
    bank = _bank_a("tiny-bert")
    d = tmp_path / "b"
    bank.save(d)
    m = json.loads((d / "manifest.json").read_text())
    art = d / m["modules"][0]["artifacts"]["file"]
    group = d / m["groups"][0]["file"]
    pristine = tmp_path / "pristine"
    shutil.copytree(d, pristine)

    def reset():
        shutil.rmtree(d)
        shutil.copytree(pristine, d)

    cases = []
    cases.append((lambda: art.unlink(), r"artifacts of module 'm0' are missing"))
    cases.append((lambda: art.write_bytes(art.read_bytes()[:-4] + b"\0\0\0\0"),
                  r"artifacts of module 'm0' are corrupted \(checksum mismatch"))
    cases.append((lambda: group.unlink(), r"artifacts of group 'lora:[0-9a-f]{10}' are missing"))

    def not_safetensors():  # garbage whose checksum the manifest does list
        import hashlib

        art.write_bytes(b"not a tensor file")
        _break(d, lambda m: m["modules"][0]["artifacts"].update(sha256=hashlib.sha256(b"not a tensor file").hexdigest()))
    cases.append((not_safetensors, r"artifacts of module 'm0' .* is corrupted or not safetensors"))

    def bad_key():
        import hashlib

        save_file({"../escape": torch.zeros(2)}, str(art))
        sha = hashlib.sha256(art.read_bytes()).hexdigest()
        _break(d, lambda m: m["modules"][0]["artifacts"].update(sha256=sha))
    cases.append((bad_key, r"artifact name '\.\./escape' is not usable"))
    cases.append((lambda: _break(d, lambda m: m["groups"][0].update(key="lora:0000000000")),
                  r"saved artifacts of group 'lora:0000000000' match no group of its modules"))
    cases.append((lambda: _break(d, lambda m: m["modules"][0].update(artifacts={"file": "x"})),
                  r"the artifacts of module 'm0' must be \{'file': \.\.\., 'sha256': \.\.\.\}"))
    for make, msg in cases:
        reset()
        make()
        bb = load_backbone("tiny-bert", seed=0)
        with pytest.raises(MtpeftError, match=msg):
            ModuleBank.load(d, bb)
        _untouched(bb)


# ---- paths stay inside the bank -----------------------------------------------------------------

ESCAPES = ["../x.safetensors", "modules/../../x.safetensors", "{abs}", "modules/../manifest.json",
           "artifacts/m0.safetensors", "modules\\..\\..\\x.safetensors", "modules/sub/m0.safetensors",
           "modules/link.safetensors"]


@pytest.mark.parametrize("where", ["weights", "artifacts", "group"])
@pytest.mark.parametrize("bad", ESCAPES)
def test_manifest_file_outside_the_bank_is_refused(bad, where, tmp_path):
    import hashlib

    bank = _bank_a("tiny-bert")
    d = tmp_path / "bank" / "b"
    bank.save(d)
    m = json.loads((d / "manifest.json").read_text())
    ref = {"weights": m["modules"][0], "artifacts": m["modules"][0]["artifacts"], "group": m["groups"][0]}[where]
    # a real, intact copy of the file lies where the entry points, so only the path check can refuse it
    outside = tmp_path / "bank" / "x.safetensors"
    shutil.copy(d / ref["file"], outside)
    shutil.copy(d / ref["file"], tmp_path / "x.safetensors")
    (d / "modules" / "link.safetensors").symlink_to(outside)
    bad = bad.replace("{abs}", str(outside))
    if where != "weights":
        bad = bad.replace("modules", "artifacts").replace("artifacts/m0.safetensors", "modules/m0.safetensors")
        if "link" in bad:
            (d / "artifacts" / "link.safetensors").symlink_to(outside)
    ref["file"] = bad
    (d / "manifest.json").write_text(json.dumps(m))
    assert hashlib.sha256(outside.read_bytes()).hexdigest() == ref["sha256"]
    bb = load_backbone("tiny-bert", seed=0)
    with pytest.raises(MtpeftError, match=r"names file .*, which is not a file inside the bank's "
                                          r"(modules|artifacts)/ folder .*fix the entry in manifest\.json"):
        ModuleBank.load(d, bb)
    _untouched(bb)
    with pytest.raises(MtpeftError, match="not a file inside the bank"):
        remove_saved_module(d, "m3")  # nor does anything else act on such a manifest


@pytest.mark.parametrize("part", ["modules", "artifacts", "manifest.json"])
def test_symlinked_modules_folder_is_refused(part, tmp_path):
    bank = _bank_a("tiny-bert")
    d = tmp_path / "b"
    bank.save(d)
    (d / part).rename(tmp_path / "elsewhere")
    (d / part).symlink_to(tmp_path / "elsewhere")
    (tmp_path / "mine.safetensors").write_bytes(b"a user's own model")
    if part != "manifest.json":
        shutil.copy(tmp_path / "mine.safetensors", tmp_path / "elsewhere" / "mine.safetensors")
    real = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()
                    and p.name != ".mtpeft.lock"}
    before = real()
    bb = load_backbone("tiny-bert", seed=0)
    with pytest.raises(MtpeftError, match=rf"{part} is a symbolic link .*replace the link by the real"):
        ModuleBank.load(d, bb)
    _untouched(bb)
    with pytest.raises(MtpeftError, match=rf"{part} is a symbolic link"):
        bank.save(d)
    with pytest.raises(MtpeftError, match=rf"{part} is a symbolic link"):
        remove_saved_module(d, "m0")
    assert real() == before  # nothing read through the link was changed or deleted


# ---- stale files, only=, the previous layout ----------------------------------------------------

def test_stale_files_are_ignored_by_load_and_cleaned_by_the_next_save(tmp_path):
    import hashlib

    bank = _bank_a("tiny-bert")
    d = tmp_path / "b"
    bank.save(d)
    want = snapshot(bank)
    # what a crashed save leaves: complete content-named files (named by their content) and temporary files
    blob = (d / referenced_list(d)[0]).read_bytes() + b""
    other = save_bytes({"x": torch.ones(3)})
    stale = {f"modules/m0.{hashlib.sha256(other).hexdigest()[:16]}.safetensors": other,
             "modules/.m0.abc.safetensors.x1_z.tmp": b"half", ".manifest.json.q7.tmp": b"{",
             f"artifacts/m9.{hashlib.sha256(blob).hexdigest()[:16]}.safetensors": blob}
    # what the bank never wrote: a user's own files, even next to the bank's, even named like the bank's
    foreign = {"modules/m9.safetensors": b"my model", "modules/m0.0123456789abcdef.safetensors": b"not its hash",
               "README.txt": b"mine", "artifacts/notes.json": b"{}"}
    for f, data in {**stale, **foreign}.items():
        (d / f).write_bytes(data)
    assert same(snapshot(ModuleBank.load(d, load_backbone("tiny-bert", seed=0))), want)
    bank.save(d, only=[])
    assert not any((d / f).exists() for f in stale)
    assert all((d / f).read_bytes() == data for f, data in foreign.items())
    assert files_in(d) == referenced(d) | set(foreign)
    assert same(snapshot(ModuleBank.load(d, load_backbone("tiny-bert", seed=0))), want)


def referenced_list(d: Path) -> list[str]:
    return sorted(referenced(d) - {"manifest.json"})


def save_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def test_only_keeps_the_files_of_unlisted_modules(tmp_path):
    bank = _bank_a("tiny-bert")
    d = tmp_path / "b"
    bank.save(d)
    on_disk = snapshot(bank)
    m3_file = json.loads((d / "manifest.json").read_text())["modules"][2]["file"]
    _randomise(bank, "m3", seed=5)
    _randomise(bank, "m0", seed=6)
    in_memory = snapshot(bank)
    bank.save(d, only=["m0"])
    got = snapshot(ModuleBank.load(d, load_backbone("tiny-bert", seed=0)))
    assert all(torch.equal(got["params"]["m0"][k], in_memory["params"]["m0"][k]) for k in got["params"]["m0"])
    assert all(torch.equal(got["params"]["m3"][k], on_disk["params"]["m3"][k]) for k in got["params"]["m3"])
    assert json.loads((d / "manifest.json").read_text())["modules"][2]["file"] == m3_file
    # an unlisted module whose file is gone (or damaged) is written from memory
    (d / m3_file).unlink()
    bank.save(d, only=["m0"])
    got = snapshot(ModuleBank.load(d, load_backbone("tiny-bert", seed=0)))
    assert all(torch.equal(got["params"]["m3"][k], in_memory["params"]["m3"][k]) for k in got["params"]["m3"])


def _old_layout_bank(bank, d):
    """What the previous mtpeft wrote: modules/<name>.safetensors, no artifacts, no groups."""
    import hashlib

    (d / "modules").mkdir(parents=True)
    entries = []
    for r in bank.records:
        f = d / "modules" / f"{r.name}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in bank.module_parameters(r.name).items()}, str(f),
                  metadata={"module": r.name, "type": r.type})
        entries.append(dict(r.__dict__, file=f"modules/{r.name}.safetensors",
                            sha256=hashlib.sha256(f.read_bytes()).hexdigest()))
    (d / "manifest.json").write_text(json.dumps({"format": "mtpeft-bank", "schema_version": 1,
                                                 "backbone": bank.backbone.fingerprint(), "modules": entries}))


@pytest.mark.parametrize("name", BACKBONES)
def test_banks_of_the_previous_layout_still_load(name, tmp_path):
    bank = ModuleBank(load_backbone(name, seed=0))
    for i, t in enumerate(["lora", "ia3"]):
        bank.add(f"m{i}", t, trainable=False)
        _randomise(bank, f"m{i}", seed=i + 1)
    bank.merge("m0")
    want = snapshot(bank)
    d = tmp_path / "old"
    _old_layout_bank(bank, d)
    loaded = ModuleBank.load(d, load_backbone(name, seed=0))
    assert same(snapshot(loaded), want) and loaded.record("m0").merged
    # saving with only= keeps the old files of unlisted modules; a full save moves to content names
    loaded.set_artifact("m1", "gate", torch.ones(3))
    loaded.save(d, only=["m1"])
    m = json.loads((d / "manifest.json").read_text())
    assert m["modules"][0]["file"] == "modules/m0.safetensors"
    assert m["modules"][1]["file"].startswith("modules/m1.") and not (d / "modules" / "m1.safetensors").exists()
    loaded.save(d)
    assert not (d / "modules" / "m0.safetensors").exists() and files_in(d) == referenced(d)
    again = ModuleBank.load(d, load_backbone(name, seed=0))
    assert same(snapshot(again), snapshot(loaded))


def test_a_failed_load_gives_the_backbone_back(tmp_path):
    """A bank whose second module's weights do not fit fails to load after the first module was wired in and
    merged: the backbone comes back unwrapped with its original weights, and takes a good bank."""
    bank = _bank_a("tiny-bert")
    bank.merge("m0")
    bank.save(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    m = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    e = next(e for e in m["modules"] if e["name"] == "m3")  # loaded after m0 was added and merged
    e["config"]["target_modules"] = ["query"]  # no longer the sites of the weights file (its checksum matches)
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps(m))
    bb = load_backbone("tiny-bert", seed=0)
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    with pytest.raises(MtpeftError, match="do not fit its config"):
        ModuleBank.load(tmp_path / "bad", bb)
    assert not any(isinstance(x, BankedLinear) for x in bb.model.modules())
    after = bb.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    good = ModuleBank.load(tmp_path / "good", bb)
    assert good.names == ["m0", "m1", "m3"]
