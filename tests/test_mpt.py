"""Multitask prompt tuning (MPT): the module family (shared prompt times task factors) on tiny BERT and Llama.

The generic checks (mixed batches, save/load, gradients, growing) also run for ``mpt`` in
test_modules_matrix.py; here the MPT specifics: ``P_k = P* * (u_k v_k)``, one ``P*`` per group, its
persistence, and the reference computation with a plain prompt.
"""
import pytest
import torch
from conftest import batch, make_backbone, perturb

from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.modules.mpt import MPTConfig, mpt_stack, shared_prompt
from mtpeft.routing import Routing

FAMILIES = ["encoder", "causal"]
needs = pytest.mark.parametrize("family", FAMILIES)
H = 32  # the tiny backbones' hidden size


def mpt_bank(family, n=2, cfg=None, seed=0):
    """Modules t0..t{n-1} of one MPT group, factors perturbed, P* perturbed too."""
    bank = ModuleBank(make_backbone(family))
    for i in range(n):
        bank.add(f"t{i}", "mpt", dict(cfg or {"n_tokens": 4, "rank": 2}), seed=seed + i)
        perturb(bank, f"t{i}", seed=seed + i)
    with torch.no_grad():
        P = shared_prompt(bank, "t0")
        P.add_(torch.randn(P.shape, generator=torch.Generator().manual_seed(seed + 99)))
    mpt_stack(bank, "t0").invalidate()
    bank.freeze()
    return bank


@needs
def test_ones_factors_give_the_shared_prompt(family):
    """With u = v = ones (rank 1) the task prompt is P* itself: the same outputs as a plain prompt module
    holding P*; other factors change them."""
    bank = mpt_bank(family, n=1, cfg={"n_tokens": 4, "rank": 1})
    stack = mpt_stack(bank, "t0")
    with torch.no_grad():
        stack.experts[0].u.fill_(1.0)
        stack.experts[0].v.fill_(1.0)
    stack.invalidate()
    P = shared_prompt(bank, "t0").detach()
    assert torch.equal(stack.prompt_of(0), P)
    bank.add("pr", "prompt", {"n_tokens": 4})
    with torch.no_grad():
        bank.module_parameters("pr")["<input>.prompt"].copy_(P)
    bank.freeze()
    ids, mask = batch()
    with torch.no_grad():
        a = bank(ids, mask, routing=Routing.one_hot([0] * 3)).output
        b = bank(ids, mask, routing=Routing.one_hot([1] * 3)).output
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        stack.experts[0].v.mul_(3.0)
        stack.invalidate()
        c = bank(ids, mask, routing=Routing.one_hot([0] * 3)).output
    assert (c - a).abs().max() > 1e-3


@needs
@pytest.mark.parametrize("rank", [1, 3])
def test_factor_shapes_and_parameter_count(family, rank):
    """A module holds u [n, r] and v [r, H] only: r (n + H) parameters; P* [n, H] is held once per group."""
    bank = ModuleBank(make_backbone(family))
    bank.add("a", "mpt", {"n_tokens": 5, "rank": rank})
    bank.add("b", "mpt", {"n_tokens": 5, "rank": rank})
    shapes = {k: tuple(p.shape) for k, p in bank.module_parameters("a").items()}
    assert shapes == {"<input>.u": (5, rank), "<input>.v": (rank, H)}
    assert sum(p.numel() for p in bank.module_parameters("b").values()) == rank * (5 + H)
    assert len(bank.groups) == 1
    assert tuple(shared_prompt(bank, "a").shape) == (5, H)
    assert shared_prompt(bank, "a") is shared_prompt(bank, "b")
    assert not shared_prompt(bank, "a").requires_grad  # frozen unless asked: fitting one task leaves the others
    # the factors at init multiply to ones, so a new task starts from P*
    stack = mpt_stack(bank, "b")
    torch.testing.assert_close(stack.prompt_of(1), shared_prompt(bank, "a").detach(), atol=0.1, rtol=0.1)
    # another shared name, another P*
    bank.add("c", "mpt", {"n_tokens": 5, "rank": rank, "shared": "other"})
    assert len(bank.groups) == 2 and shared_prompt(bank, "c") is not shared_prompt(bank, "a")


@needs
def test_prompt_is_shared_times_factors(family):
    bank = mpt_bank(family, n=2)
    stack = mpt_stack(bank, "t1")
    e = stack.experts[1]
    ref = shared_prompt(bank, "t1") * (e.u @ e.v)
    torch.testing.assert_close(stack.tokens_of(torch.tensor([1, 0, 1]))[0], ref)
    torch.testing.assert_close(stack.prompt_of(1), ref)


@needs
def test_mixed_batch_equals_per_task_forwards(family):
    """Each example routed to its own task's MPT module in one pass == each task's examples run alone;
    also while training (the factors and P* trainable: the selected experts are computed, not cached)."""
    bank = mpt_bank(family, n=3)
    ids, mask = batch(B=4, T=7)
    tasks = [2, 0, 1, 2]
    for trainable in (False, True):
        bank.set_trainable(None, trainable)
        shared_prompt(bank, "t0").requires_grad_(trainable)
        with torch.set_grad_enabled(trainable):
            mixed = bank(ids, mask, routing=Routing.one_hot(tasks))
            for k in set(tasks):
                rows = [i for i, t in enumerate(tasks) if t == k]
                alone = bank(ids[rows], mask[rows], routing=Routing.one_hot([k] * len(rows)))
                assert alone.n_virtual == mixed.n_virtual == 4
                torch.testing.assert_close(mixed.output[rows], alone.output, atol=1e-5, rtol=0)
    a = bank(ids, mask, routing=Routing.one_hot([0] * 4)).output
    b = bank(ids, mask, routing=Routing.one_hot([1] * 4)).output
    assert (a - b).abs().max() > 1e-3  # the tasks' prompts differ: the check is not vacuous


@needs
def test_shared_prompt_trains_when_asked(family):
    """Gradients reach the routed modules' factors and, once unfrozen, P*; never another module's factors."""
    bank = mpt_bank(family, n=2)
    bank.unfreeze("t0")
    shared_prompt(bank, "t0").requires_grad_(True)
    ids, mask = batch()
    bank(ids, mask, routing=Routing.one_hot([0, 0, 0])).output.pow(2).mean().backward()
    assert shared_prompt(bank, "t0").grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bank.module_parameters("t0").values())
    assert all(p.grad is None for p in bank.module_parameters("t1").values())


@needs
def test_save_load_round_trip(family, tmp_path):
    """P* is saved once, in the group's file, and put back on load: identical outputs; a bank whose group
    file is gone is refused, not loaded with a random P*."""
    import json

    bank = mpt_bank(family, n=2)
    bank.add("lora", "lora", seed=3)
    perturb(bank, "lora", seed=3)
    bank.freeze()
    ids, mask = batch()
    r = Routing.one_hot([1, 2, 0])
    with torch.no_grad():
        before = bank(ids, mask, routing=r).output
    bank.save(tmp_path / "b")
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    (g,) = man["groups"]
    assert g["key"] == bank.group_of("t0").key
    from mtpeft.io import read_tensors

    saved = read_tensors(tmp_path / "b" / g["file"], what="group file")
    assert set(saved) == {"param:shared"} and torch.equal(saved["param:shared"], shared_prompt(bank, "t0").detach())
    loaded = ModuleBank.load(tmp_path / "b", make_backbone(family))
    assert torch.equal(shared_prompt(loaded, "t0"), shared_prompt(bank, "t0"))
    assert not shared_prompt(loaded, "t0").requires_grad
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, routing=r).output, before)
    # removing one task keeps P*; removing the last drops the group and its file
    loaded.remove("t0")
    loaded.save(tmp_path / "b")
    again = ModuleBank.load(tmp_path / "b", make_backbone(family))
    assert torch.equal(shared_prompt(again, "t1"), shared_prompt(bank, "t0"))
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [e["name"] for e in man["modules"]] == ["t1", "lora"] and len(man["groups"]) == 1
    man["groups"] = []
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(MtpeftError, match="no saved group file"):
        ModuleBank.load(tmp_path / "b", make_backbone(family))


@pytest.mark.parametrize("bad,msg", [({"rank": 0}, "rank"), ({"n_tokens": -1}, "n_tokens"),
                                     ({"shared": "a/b"}, "shared"), ({"shared": ""}, "shared"),
                                     ({"target_modules": ["query"]}, "target_modules"),
                                     ({"init_std": 0.0}, "init_std")])
def test_bad_config_refused(bad, msg):
    with pytest.raises(MtpeftError, match=msg):
        MPTConfig.from_dict(bad)


# ---- export to peft's multitask prompt tuning ------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The tiny backbones saved to disk: what peft loads by path."""
    from mtpeft.backbone import load_backbone

    out = {}
    for name in ("tiny-bert", "tiny-llama"):
        bb = load_backbone(name, seed=0)
        d = tmp_path_factory.mktemp(name)
        bb.model.save_pretrained(d)
        bb.tokenizer.save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_peft_export_equal_outputs(saved_tiny, tmp_path, name):
    """The exported group loads in the installed peft and gives the bank's outputs, task by task, in one
    mixed batch (peft's task_ids index the names in the order exported)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModel, AutoModelForCausalLM

    from mtpeft.backbone import load_backbone
    from mtpeft.interop import read_adapter
    from mtpeft.mpt import export_peft_mpt

    d = saved_tiny[name]
    bank = ModuleBank(load_backbone(str(d)))
    for i in range(3):
        bank.add(f"t{i}", "mpt", {"n_tokens": 3, "rank": 2}, seed=i)
        perturb(bank, f"t{i}", seed=i)
    with torch.no_grad():
        shared_prompt(bank, "t0").normal_(generator=torch.Generator().manual_seed(5))
    mpt_stack(bank, "t0").invalidate()
    order = export_peft_mpt(bank, ["t2", "t0"], tmp_path / "a")
    assert order == ["t2", "t0"]
    cfg, tensors = read_adapter(tmp_path / "a")
    assert cfg["peft_type"] == "MULTITASK_PROMPT_TUNING" and cfg["num_tasks"] == 2 and cfg["num_ranks"] == 2
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "prompt_embeddings": (3, H), "prefix_task_cols": (2, 3, 2), "prefix_task_rows": (2, 2, H)}

    causal = name == "tiny-llama"
    auto = AutoModelForCausalLM if causal else AutoModel
    pm = peft.PeftModel.from_pretrained(auto.from_pretrained(str(d), attn_implementation="sdpa").eval(),
                                        str(tmp_path / "a")).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    task_ids = torch.tensor([0, 1, 1, 0])  # t2, t0, t0, t2
    with torch.no_grad():
        ours = bank(ids, mask, routing=Routing.one_hot(bank.ids(["t2", "t0", "t0", "t2"]))).output
        if causal:
            theirs = pm(input_ids=ids, attention_mask=mask, task_ids=task_ids, output_hidden_states=True)
            theirs = theirs.hidden_states[-1]
        else:  # peft's feature-extraction wrapper does not pass task_ids on: its own prompt, then the base model
            prompts = pm.get_prompt(batch_size=4, task_ids=task_ids)
            emb = pm.base_model.get_input_embeddings()(ids)
            full = torch.cat([torch.ones(4, 3, dtype=mask.dtype), mask], dim=1)
            theirs = pm.base_model(inputs_embeds=torch.cat([prompts, emb], 1), attention_mask=full).last_hidden_state
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    bare = bank(ids, mask).output
    assert (ours[:, 3:] - bare).abs().max() > 1e-3  # the prompts do change the outputs


def test_peft_export_refuses_mixed_groups(tmp_path):
    from mtpeft.mpt import export_peft_mpt

    bank = ModuleBank(make_backbone("encoder"))
    bank.add("a", "mpt", {"n_tokens": 3})
    bank.add("b", "mpt", {"n_tokens": 4})
    bank.add("p", "prompt", {"n_tokens": 3})
    with pytest.raises(MtpeftError, match="2 MPT groups"):
        export_peft_mpt(bank, ["a", "b"], tmp_path / "x")
    with pytest.raises(MtpeftError, match="type 'mpt'"):
        export_peft_mpt(bank, ["p"], tmp_path / "x")


def test_plain_peft_export_points_to_the_mpt_export(tmp_path):
    from mtpeft.interop import export_peft

    bank = ModuleBank(make_backbone("encoder"))
    bank.add("a", "mpt", {"n_tokens": 3})
    with pytest.raises(MtpeftError, match="export_peft_mpt"):
        export_peft(bank, "a", tmp_path / "x")


@needs
def test_peft_import_round_trip(family, tmp_path):
    """An exported group imported back (a group of its own, its own P*) gives the same outputs task by task;
    a clash of shared names, a wrong count of names and another backbone's width are refused, nothing added."""
    from mtpeft.interop import import_peft
    from mtpeft.mpt import export_peft_mpt, import_peft_mpt

    bank = mpt_bank(family, n=3)
    export_peft_mpt(bank, ["t1", "t2"], tmp_path / "a")
    assert import_peft_mpt(bank, tmp_path / "a", ["x1", "x2"], shared="imp", tasks=["one", "two"]) == ["x1", "x2"]
    assert bank.group_of("x1").key != bank.group_of("t1").key and bank.record("x2").task == "two"
    assert torch.equal(shared_prompt(bank, "x1"), shared_prompt(bank, "t0"))
    ids, mask = batch()
    with torch.no_grad():
        for a, b in (("t1", "x1"), ("t2", "x2")):
            ra = bank(ids, mask, routing=Routing.one_hot([bank.index(a)] * 3)).output
            rb = bank(ids, mask, routing=Routing.one_hot([bank.index(b)] * 3)).output
            assert torch.equal(ra, rb)
    n = len(bank)
    with pytest.raises(MtpeftError, match="another shared name"):
        import_peft_mpt(bank, tmp_path / "a", ["y1", "y2"], shared="imp")
    with pytest.raises(MtpeftError, match="give 2 distinct module names"):
        import_peft_mpt(bank, tmp_path / "a", ["y1"], shared="imp2")
    with pytest.raises(MtpeftError, match="import_peft_mpt"):
        import_peft(bank, tmp_path / "a")
    assert len(bank) == n
    narrow = ModuleBank(make_backbone(family, hidden=16, heads=2))
    with pytest.raises(MtpeftError, match=r"this backbone takes \[n, 16\]"):
        import_peft_mpt(narrow, tmp_path / "a", ["y1", "y2"])
    assert len(narrow) == 0


def test_group_artifacts_beside_the_shared_prompt(tmp_path):
    """A group's artifacts and its P* share the group's file; the 'param:' names stay reserved for P*."""
    bank = mpt_bank("encoder", n=1)
    key = bank.group_of("t0").key
    with pytest.raises(MtpeftError, match="reserved"):
        bank.set_group_artifact(key, "param:shared", torch.zeros(1))
    bank.set_group_artifact(key, "centroid", torch.ones(3))
    bank.save(tmp_path / "b")
    loaded = ModuleBank.load(tmp_path / "b", make_backbone("encoder"))
    assert set(loaded.group_artifacts(key)) == {"centroid"}
    assert torch.equal(shared_prompt(loaded, "t0"), shared_prompt(bank, "t0"))
