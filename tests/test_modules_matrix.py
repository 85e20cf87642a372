"""The generic checks every module type must pass, as one matrix: module type x backbone family x check.

Types come from ``mtpeft.modules.MODULE_TYPES`` (``test_matrix_covers_every_registered_type`` fails
when a type is registered without a row here); families from the conftest ``tiny_backbone`` fixture
(tiny-bert, an encoder; tiny-llama, a causal LM). Where a check does not apply to a type, the
type's own declared capability says so (``ModuleType.identity_at_init``, ``ModuleType.mergeable``)
and the negative is asserted instead. Type-specific mechanics (sites, reference computations,
config fields) live in test_adapters.py, test_ia3_krona.py and test_prompt_prefix.py.
"""
from dataclasses import dataclass, fields

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONES, perturb, synthetic_task

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.modules import MODULE_TYPES
from mtpeft.routing import Routing
from mtpeft.scorer import make_scorer


@dataclass(frozen=True)
class Case:
    id: str
    type: str
    config: dict  # small sizes: the tiny backbones have hidden size 32
    alt: dict  # another config of the same type: a second group of stacks

    @property
    def mtype(self):
        return MODULE_TYPES.get(self.type)

    @property
    def other(self) -> str:
        """A module of another type to share the bank with."""
        return "ia3" if self.type == "lora" else "lora"


CASES = [
    Case("lora", "lora", {"r": 4}, {"r": 2, "alpha": 4.0}),
    Case("ia3", "ia3", {}, {"feedforward_modules": []}),
    Case("krona", "krona", {}, {"max_factor": 4, "alpha": 2.0}),
    Case("prompt", "prompt", {"n_tokens": 4}, {"n_tokens": 2}),
    Case("mpt", "mpt", {"n_tokens": 4, "rank": 2}, {"n_tokens": 2, "shared": "other"}),
    Case("ptuning-mlp", "ptuning", {"n_tokens": 4, "encoder_hidden": 16}, {"n_tokens": 2, "encoder_hidden": 8}),
    Case("ptuning-lstm", "ptuning", {"n_tokens": 3, "encoder": "lstm", "encoder_hidden": 8},
         {"n_tokens": 2, "encoder": "lstm", "encoder_hidden": 4, "lstm_layers": 1}),
    Case("prefix", "prefix", {"n_tokens": 3}, {"n_tokens": 2, "projection": True, "projection_hidden": 16}),
    Case("houlsby", "houlsby", {"r": 8}, {"r": 4, "placement": "ffn"}),
    Case("pfeiffer", "pfeiffer", {"r": 8, "activation": "gelu"}, {"r": 4}),
    Case("parallel", "parallel", {"r": 8, "placement": "both", "activation": "tanh"}, {"r": 4}),
    Case("scaled_parallel", "scaled_parallel", {"reduction_factor": 4, "activation": "silu"}, {"r": 4}),
    Case("mam", "mam", {"prefix_tokens": 3, "prefix_hidden": 16, "adapter_r": 8},
         {"prefix_tokens": 2, "prefix_projection": False, "adapter_r": 4}),
]


def each_case(test):
    """Parametrize over the cases x the tiny backbones (the conftest fixture, indirectly), ids ``case-backbone``."""
    test = pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])(test)
    return pytest.mark.parametrize("tiny_backbone", TINY_BACKBONES, indirect=True)(test)


each_type = pytest.mark.parametrize("mtype", MODULE_TYPES.names())

TEXTS = ["the big apple", "a sky", "one small old ocean ruby", "some new cherry sapphire"]


def inputs(bb, n=4):
    """Tokenised texts of different lengths: the batch is right-padded."""
    enc = bb.tokenizer(TEXTS[:n], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert not bool(mask.all())
    return ids, mask


def real(out):
    """Outputs at the real-token positions (input-level modules prepend ``n_virtual`` positions)."""
    return out.output[:, out.n_virtual:]


def bank_of(bb, case, n=2, other=False, seed=0):
    """Modules m0..m{n-1} of the case's type (one group), and optionally one of another type, all perturbed."""
    bank = ModuleBank(bb)
    for i in range(n):
        bank.add(f"m{i}", case.type, dict(case.config), seed=seed + i)
        perturb(bank, f"m{i}", seed=seed + i)
    if other:
        bank.add("other", case.other, seed=seed + 10)
        perturb(bank, "other", seed=seed + 10)
    bank.freeze()
    return bank


def assert_differs(a, b, what, tol=1e-4):
    d = (a - b).abs().max().item()
    assert d > tol, f"{what}: outputs differ by only {d:.2e}; the check would pass trivially"


# ---- the registry ------------------------------------------------------------------------------
def test_matrix_covers_every_registered_type():
    assert sorted({c.type for c in CASES}) == MODULE_TYPES.names()
    assert len({c.id for c in CASES}) == len(CASES)


@each_type
def test_config_defaults_round_trip(mtype):
    cls = MODULE_TYPES.get(mtype).config_cls
    c = cls()
    assert cls.from_dict(c.to_dict()) == c
    assert set(cls.help()) == set(c.to_dict())


@each_type
def test_config_rejects_unknown_option(mtype):
    with pytest.raises(MtpeftError, match="unknown option"):
        MODULE_TYPES.get(mtype).config_cls.from_dict({"no_such_option": 1})


@each_type
def test_config_rejects_target_modules_string(mtype):
    with pytest.raises(MtpeftError, match="target_modules"):
        MODULE_TYPES.get(mtype).config_cls.from_dict({"target_modules": "query"})


def _fields_of_each_type(keep):
    """``(type, field)`` for every config field ``keep(field)`` selects, by the fields' declarations."""
    return [pytest.param(t, f.name, id=f"{t}-{f.name}") for t in MODULE_TYPES.names()
            for f in fields(MODULE_TYPES.get(t).config_cls) if keep(f)]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
@pytest.mark.parametrize("mtype,name", _fields_of_each_type(lambda f: f.type in (int, "int", "int | None")))
def test_config_rejects_bad_size(mtype, name, bad):
    """Integer fields are sizes (ranks, token counts, widths, layers, factors): positive integers."""
    with pytest.raises(MtpeftError):
        MODULE_TYPES.get(mtype).config_cls.from_dict({name: bad})


@pytest.mark.parametrize("bad", [1.0, -0.1])
@pytest.mark.parametrize("mtype,name", _fields_of_each_type(lambda f: f.name.endswith("dropout")))
def test_config_rejects_bad_dropout(mtype, name, bad):
    with pytest.raises(MtpeftError, match=r"\[0, 1\)"):
        MODULE_TYPES.get(mtype).config_cls.from_dict({name: bad})


# ---- identity at init --------------------------------------------------------------------------
@each_case
def test_identity_at_init(case, tiny_backbone):
    """Types declaring ``identity_at_init`` leave outputs exactly unchanged when freshly added; the
    others change them by design. Either way an example routed to no module gets the bare output."""
    bank = ModuleBank(tiny_backbone)
    ids, mask = inputs(tiny_backbone)
    with torch.no_grad():
        bare = bank(ids, mask).output
        bank.add("a", case.type, dict(case.config), seed=0)
        bank.add("b", case.type, dict(case.config), seed=1)
        routed = bank(ids, mask, routing=Routing.one_hot([0, 1, 0, 1]))
        if case.mtype.identity_at_init:
            assert routed.n_virtual == 0
            assert torch.equal(routed.output, bare)
            g = torch.Generator().manual_seed(0)
            for mix in ("output", "params"):
                soft = bank(ids, mask, routing=Routing(torch.rand(4, 2, generator=g), mix=mix)).output
                assert torch.equal(soft, bare), mix
        else:
            m = mask.bool()
            assert_differs(real(routed)[m], bare[m], f"a fresh {case.type} module (not identity at init)")
        w = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        part = bank(ids, mask, routing=Routing(w))
    for b in (1, 3):
        torch.testing.assert_close(real(part)[b], bare[b], atol=1e-6, rtol=0)


# ---- gradients -------------------------------------------------------------------------------
def _assert_grads_only(bank, name):
    own = bank.module_parameters(name)
    for k, p in own.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {k} got no gradient"
    own_ids = {id(p) for p in own.values()}
    for k, p in bank.named_parameters():
        if id(p) not in own_ids:
            assert p.grad is None, f"{k} (not part of {name}) got a gradient"


@each_case
def test_grads_only_own(case, tiny_backbone):
    """Only the routed, trainable module's parameters get gradients: never the backbone's, nor another module's."""
    bank = bank_of(tiny_backbone, case, n=2, other=True)
    for name in bank.names:
        bank.unfreeze(name)
    bank.train()
    ids, mask = inputs(tiny_backbone)
    # everything trainable, every example routed to m1: only m1's parameters take part
    real(bank(ids, mask, routing=Routing.one_hot([1, 1, 1, 1]))).pow(2).mean().backward()
    _assert_grads_only(bank, "m1")
    # the others frozen, soft mixtures that include them
    bank.zero_grad(set_to_none=True)
    bank.freeze()
    bank.unfreeze("m1")
    assert {id(p) for p in bank.trainable_parameters()} == {id(p) for p in bank.module_parameters("m1").values()}
    w = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]])
    real(bank(ids, mask, routing=Routing(w))).pow(2).mean().backward()
    _assert_grads_only(bank, "m1")


# ---- learning --------------------------------------------------------------------------------
@each_case
def test_loss_falls(case, tiny_backbone):
    """A few Adam steps on a learnable synthetic task, through the bank and the shared scorer."""
    bb = tiny_backbone
    task = synthetic_task(n=16)
    train = task.splits["train"]
    texts, labels = list(train["text"]), torch.tensor(train["label"])
    scorer = make_scorer(bb)
    bank = ModuleBank(bb)
    bank.add("m", case.type, dict(case.config), task=task.name)
    bank.train()
    params = bank.trainable_parameters()
    assert {id(p) for p in params} == {id(p) for p in bank.module_parameters("m").values()}
    routing = Routing.one_hot([0] * len(texts))
    opt = torch.optim.Adam(params, lr=3e-3)  # higher rates overshoot on some (parallel adapters)

    def loss():
        return F.cross_entropy(scorer.logits(bank, texts, task, routing), labels)

    before = loss()
    for _ in range(12):
        opt.zero_grad()
        loss().backward()
        opt.step()
    after = loss()
    assert after.item() < before.item() - 1e-5, f"loss {before.item():.4f} -> {after.item():.4f}"


# ---- persistence -------------------------------------------------------------------------------
@each_case
def test_save_load_identical(case, tiny_backbone, tmp_path):
    """Saved and loaded on a fresh backbone (same seed), the bank gives identical outputs; also after
    ``finalize`` (types with a training-time reparameterisation drop it, the others are unchanged)."""
    bb = tiny_backbone
    bank = bank_of(bb, case, n=2, other=True)
    ids, mask = inputs(bb)
    r = Routing.one_hot([0, 1, 2, 1])
    with torch.no_grad():
        before = bank(ids, mask, routing=r)
    bank.save(tmp_path / "bank")
    loaded = ModuleBank.load(tmp_path / "bank", load_backbone(bb.name, seed=0))
    assert loaded.names == bank.names
    assert [x.config for x in loaded.records] == [x.config for x in bank.records]
    for name in bank.names:
        assert set(loaded.module_parameters(name)) == set(bank.module_parameters(name))
    with torch.no_grad():
        got = loaded(ids, mask, routing=r)
    assert got.n_virtual == before.n_virtual
    assert torch.equal(got.output, before.output)

    changed = bank.finalize("m0")
    assert bank.record("m0").finalized == changed
    with torch.no_grad():
        fin = bank(ids, mask, routing=r)
    torch.testing.assert_close(fin.output, before.output, atol=1e-5, rtol=0)
    bank.save(tmp_path / "finalized")
    loaded = ModuleBank.load(tmp_path / "finalized", load_backbone(bb.name, seed=0))
    assert loaded.record("m0").finalized == changed
    assert set(loaded.module_parameters("m0")) == set(bank.module_parameters("m0"))
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, routing=r).output, fin.output)


# ---- merging ---------------------------------------------------------------------------------
@each_case
def test_merge_equals_unmerged(case, tiny_backbone):
    """Mergeable types: merged into the base weights == routed unmerged; unmerge restores the backbone.
    The others refuse to merge with a clear error and stay as they were."""
    bank = bank_of(tiny_backbone, case, n=2)
    ids, mask = inputs(tiny_backbone)
    weights = {k: v.clone() for k, v in bank.model.state_dict().items()}
    to_m1 = Routing.one_hot([1, 1, 1, 1])
    with torch.no_grad():
        bare = bank(ids, mask).output
        routed = bank(ids, mask, routing=to_m1)
    assert_differs(real(routed), bare, "routing to the perturbed module")
    if not case.mtype.mergeable:
        with pytest.raises(MtpeftError, match="cannot be merged"):
            bank.merge("m1")
        assert not bank.record("m1").merged
        with torch.no_grad():
            assert torch.equal(bank(ids, mask, routing=to_m1).output, routed.output)
    else:
        with torch.no_grad():
            bank.merge("m1")
            assert bank.record("m1").merged
            torch.testing.assert_close(bank(ids, mask).output, routed.output, atol=1e-5, rtol=1e-5)
            # routing to a merged module is a no-op, not a second application
            torch.testing.assert_close(bank(ids, mask, routing=to_m1).output, routed.output, atol=1e-5, rtol=1e-5)
            bank.unmerge("m1")
            torch.testing.assert_close(bank(ids, mask).output, bare, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bank(ids, mask, routing=to_m1).output, routed.output, atol=1e-5, rtol=1e-5)
    for k, v in bank.model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ---- mixed-task batches ----------------------------------------------------------------------------
def _assert_batch_equals_per_example(bank, ids, mask, routing):
    """The batch run under ``routing`` == each example run alone under its own row of ``routing``."""
    batched = bank(ids, mask, routing=routing)
    for i in range(ids.shape[0]):
        row = Routing(routing.weights[i:i + 1], None if routing.indices is None else routing.indices[i:i + 1],
                      routing.mix)
        one = bank(ids[i:i + 1], mask[i:i + 1], routing=row)
        assert one.n_virtual == batched.n_virtual
        torch.testing.assert_close(batched.output[i:i + 1], one.output, atol=1e-5, rtol=0,
                                   msg=lambda m, i=i: f"example {i}: {m}")


@each_case
def test_mixed_batch_equals_per_task(case, tiny_backbone):
    """Example i routed to module i % 2 in one batch == each example routed alone; soft mixtures
    (mixing outputs or parameters) likewise, and explicit indices == the same weights given dense."""
    bank = bank_of(tiny_backbone, case, n=2)
    ids, mask = inputs(tiny_backbone)
    B = ids.shape[0]
    with torch.no_grad():
        assert_differs(real(bank(ids, mask, routing=Routing.one_hot([0] * B))),
                       real(bank(ids, mask, routing=Routing.one_hot([1] * B))), "the two modules")
        _assert_batch_equals_per_example(bank, ids, mask, Routing.one_hot([i % 2 for i in range(B)]))
        g = torch.Generator().manual_seed(4)
        for mix in ("output", "params"):
            _assert_batch_equals_per_example(bank, ids, mask, Routing(torch.rand(B, 2, generator=g), mix=mix))
        idx = torch.tensor([[1, 0], [0, 1]] * (B // 2))
        w2 = torch.rand(B, 2, generator=g)
        dense = torch.zeros(B, 2).scatter_(1, idx, w2)
        torch.testing.assert_close(bank(ids, mask, routing=Routing(w2, idx)).output,
                                   bank(ids, mask, routing=Routing(dense)).output, atol=1e-5, rtol=0)


# ---- per-token routing -----------------------------------------------------------------------
@each_case
@pytest.mark.parametrize("k", [1, 2])
def test_per_token_routing(case, tiny_backbone, k, monkeypatch):
    """Per-token top-k: the dense pass over all experts == grouping tokens by expert, and routing that is
    the same for every token == per-example routing. Input-level types (virtual tokens) refuse it clearly."""
    from mtpeft import kernels
    from mtpeft.io import MtpeftError

    bank = bank_of(tiny_backbone, case, n=5)
    ids, mask = inputs(tiny_backbone)
    B, T = ids.shape
    r = Routing.topk(torch.randn(B, T, 5, generator=torch.Generator().manual_seed(2)), k)
    if case.type in ("prompt", "mpt", "ptuning", "prefix", "mam"):
        with pytest.raises(MtpeftError, match="per example"), torch.no_grad():
            bank(ids, mask, routing=r)
        return
    with torch.no_grad():
        dense = bank(ids, mask, routing=r).output
        monkeypatch.setattr(kernels, "DENSE_TOKEN_MAX_EXPERTS", 0)  # every stack takes the grouped path
        grouped = bank(ids, mask, routing=r).output
        assert_differs(dense, bank(ids, mask, routing=Routing.one_hot([0] * B)).output, "per-token vs module 0")
    torch.testing.assert_close(grouped, dense, atol=1e-5, rtol=0)
    w = torch.rand(B, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tok = bank(ids, mask, routing=Routing(w[:, None].expand(B, T, 5).contiguous())).output
        ex = bank(ids, mask, routing=Routing(w)).output
    torch.testing.assert_close(tok, ex, atol=1e-5, rtol=0)


# ---- growing ---------------------------------------------------------------------------------
@each_case
def test_growing_leaves_outputs_unchanged(case, tiny_backbone):
    """Adding modules (to the same stacks, as a second group of the type, of another type) leaves an
    existing module's outputs unchanged; so does removing them again."""
    bank = bank_of(tiny_backbone, case, n=1)
    ids, mask = inputs(tiny_backbone)
    r = Routing.one_hot([0] * ids.shape[0])
    with torch.no_grad():
        before = bank(ids, mask, routing=r)
        bank.add("same", case.type, dict(case.config), seed=7)  # same group: the stacks grow
        bank.add("alt", case.type, dict(case.alt), seed=8)  # another config: a second group
        bank.add("other", case.other, seed=9)
        assert len(bank.groups) == 3
        for i, name in enumerate(("same", "alt", "other")):
            perturb(bank, name, seed=11 + i)
        bank.freeze()
        for name in ("same", "alt", "other"):
            assert_differs(real(bank(ids, mask, routing=Routing.one_hot([bank.index(name)] * ids.shape[0]))),
                           real(before), f"module {name!r}")
        after = bank(ids, mask, routing=r)
        assert after.n_virtual == before.n_virtual
        torch.testing.assert_close(after.output, before.output, atol=1e-6, rtol=0)
        bank.remove("same")
        bank.remove("alt")
        torch.testing.assert_close(bank(ids, mask, routing=r).output, before.output, atol=1e-6, rtol=0)
