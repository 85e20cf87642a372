"""ModuleBank bookkeeping, persistence and its errors (module-type specifics live in their own tests)."""
import json

import pytest
import torch

from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.routing import Routing


def _inputs(bb, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, bb.model.config.vocab_size, (n, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return ids, mask


def _randomise(bank, name, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.module_parameters(name).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _lora_bank(bb, n=2):
    bank = ModuleBank(bb)
    for i in range(n):
        bank.add(f"m{i}", "lora", {"r": 4}, task=f"t{i}")
        _randomise(bank, f"m{i}", seed=i + 1)
    bank.freeze()
    return bank


def test_add_remove_and_names(tiny_backbone):
    bank = _lora_bank(tiny_backbone, 3)
    assert bank.names == ["m0", "m1", "m2"]
    assert bank.task_index("t1") == 1
    ids, mask = _inputs(tiny_backbone)
    before = bank(ids, mask, routing=Routing.one_hot([2, 2, 2])).output
    bank.remove("m1")
    assert bank.names == ["m0", "m2"]
    after = bank(ids, mask, routing=Routing.one_hot([1, 1, 1])).output  # m2 is now id 1
    assert torch.allclose(before, after, atol=1e-6)
    with pytest.raises(MtpeftError, match="already has a module"):
        bank.add("m0", "lora")
    with pytest.raises(MtpeftError, match="no module 'zz'"):
        bank.index("zz")
    with pytest.raises(MtpeftError, match="unknown module type"):
        bank.add("x", "nope")
    with pytest.raises(MtpeftError, match="file name"):
        bank.add("a/b", "lora")
    with pytest.raises(MtpeftError, match="match no linear layer"):
        bank.add("y", "lora", {"target_modules": ["does_not_exist"]})
    assert bank.names == ["m0", "m2"]


def test_routing_scope_is_restored_even_on_error(tiny_backbone):
    bank = _lora_bank(tiny_backbone)
    with pytest.raises(RuntimeError), bank.route(Routing.one_hot([0])):
        assert bank.state.routing is not None
        raise RuntimeError("boom")
    assert bank.state.routing is None


def test_new_expert_trainable_old_frozen(tiny_backbone):
    bank = _lora_bank(tiny_backbone)
    bank.add("new", "lora", {"r": 4})
    trainable = {id(p) for p in bank.trainable_parameters()}
    assert trainable == {id(p) for p in bank.module_parameters("new").values()}
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters()
                   if id(p) not in trainable)


def test_save_load_roundtrip_identical_outputs(tiny_backbone, tmp_path):
    bank = _lora_bank(tiny_backbone)
    bank.merge("m1")
    ids, mask = _inputs(tiny_backbone)
    r = Routing.one_hot([0, 1, 0])
    want = bank(ids, mask, routing=r).output
    bank.save(tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and [m["name"] for m in manifest["modules"]] == ["m0", "m1"]
    assert manifest["modules"][1]["merged"] is True
    bank2 = ModuleBank.load(tmp_path / "b", tiny_backbone_copy(tiny_backbone))
    assert torch.allclose(bank2(ids, mask, routing=r).output, want, atol=1e-5)
    assert not any(p.requires_grad for p in bank2.parameters())


def tiny_backbone_copy(bb):
    from mtpeft.backbone import load_backbone

    return load_backbone(bb.name, seed=0)


def test_load_errors(tiny_backbone, tmp_path):
    bank = _lora_bank(tiny_backbone)
    d = tmp_path / "b"
    bank.save(d)
    other = "tiny-llama" if tiny_backbone.family == "encoder" else "tiny-bert"
    from mtpeft.backbone import load_backbone

    with pytest.raises(MtpeftError, match="another backbone"):
        ModuleBank.load(d, load_backbone(other))
    with pytest.raises(MtpeftError, match="another backbone"):
        ModuleBank.load(d, load_backbone(tiny_backbone.name, seed=1))
    fresh = tiny_backbone_copy(tiny_backbone)
    # corrupted weights: flip bytes at the end of the file the manifest names
    entry = json.loads((d / "manifest.json").read_text())["modules"][0]
    assert entry["name"] == "m0" and entry["file"] == f"modules/m0.{entry['sha256'][:16]}.safetensors"
    f = d / entry["file"]
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\x01\x02\x03"
    f.write_bytes(bytes(data))
    with pytest.raises(MtpeftError, match="corrupted"):
        ModuleBank.load(d, fresh)
    f.unlink()
    with pytest.raises(MtpeftError, match="missing"):
        ModuleBank.load(d, fresh)
    m = json.loads((d / "manifest.json").read_text())
    m["schema_version"] = 99
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MtpeftError, match="schema version 99"):
        ModuleBank.load(d, fresh)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(MtpeftError, match="not valid JSON"):
        ModuleBank.load(d, fresh)
    with pytest.raises(MtpeftError, match="not found"):
        ModuleBank.load(tmp_path / "nothing", fresh)


def test_save_is_atomic_and_keeps_old_bank_on_failure(tiny_backbone, tmp_path, monkeypatch):
    bank = _lora_bank(tiny_backbone)
    d = tmp_path / "b"
    bank.save(d)
    before = (d / "manifest.json").read_text()
    bank.add("m2", "lora", {"r": 4})
    import mtpeft.io as mio

    def boom(tmp, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mio.json, "dump", boom)
    with pytest.raises(OSError):
        bank.save(d)
    assert (d / "manifest.json").read_text() == before
    assert not list(d.glob(".*.tmp"))


def test_merge_requires_mergeable_and_unmerge_restores(tiny_backbone):
    bank = _lora_bank(tiny_backbone)
    ids, mask = _inputs(tiny_backbone)
    with bank.disabled():
        bare = bank(ids, mask).output
    routed = bank(ids, mask, routing=Routing.one_hot([0, 0, 0])).output
    bank.merge("m0")
    with bank.disabled():
        merged = bank(ids, mask).output
    assert torch.allclose(merged, routed, atol=1e-5)
    # routing to a merged module must not apply it twice
    assert torch.allclose(bank(ids, mask, routing=Routing.one_hot([0, 0, 0])).output, routed, atol=1e-5)
    with pytest.raises(MtpeftError, match="already merged"):
        bank.merge("m0")
    bank.unmerge("m0")
    with bank.disabled():
        assert torch.allclose(bank(ids, mask).output, bare, atol=1e-5)


def test_init_depends_on_seed_and_name_not_on_what_the_bank_holds(tiny_backbone):
    from mtpeft.backbone import load_backbone

    a, b = ModuleBank(tiny_backbone), ModuleBank(load_backbone(tiny_backbone.name, seed=0))
    b.add("first", "lora")
    b.add("other", "ia3")
    for bank in (a, b):
        bank.add("x", "lora", {"r": 4}, seed=3)
    pa, pb = a.module_parameters("x"), b.module_parameters("x")
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)
    a.add("y", "lora", {"r": 4}, seed=4)
    a.add("x2", "lora", {"r": 4}, seed=3)
    A = next(k for k in pa if k.endswith("lora_A"))
    assert not torch.equal(a.module_parameters("y")[A], pa[A])   # another seed, another draw
    assert not torch.equal(a.module_parameters("x2")[A], pa[A])  # another name, another draw
