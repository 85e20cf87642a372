"""Merging experts into a new LoRA module: exact linear merges, SVD truncation, TIES, DARE, negation, peft export."""
import pytest
import torch
from conftest import bank_with, batch, make_backbone, perturb

from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.merge import merge_modules, ties_merge
from mtpeft.routing import Routing

FAMILIES = ["encoder", "causal"]
QUERY = {"encoder": "query", "causal": "q_proj"}


def mixed_bank(family):
    """Three LoRAs with different ranks, scales and sites (c acts on the query projections only)."""
    bank = ModuleBank(make_backbone(family))
    bank.add("a", "lora", {"r": 2, "alpha": 4.0}, seed=1)
    bank.add("b", "lora", {"r": 4, "alpha": 2.0}, seed=2)
    bank.add("c", "lora", {"r": 3, "alpha": 3.0, "target_modules": [QUERY[family]]}, seed=3)
    for i, n in enumerate(bank.names):
        perturb(bank, n, seed=10 + i)
    return bank


def deltas(bank, name):
    return {s: d.double() for s, d in bank.delta_weight(name).items()}


def expected(bank, names, weights):
    """sum_i w_i Delta W_i per site, zero where a module does not act."""
    out = {}
    for n, w in zip(names, weights):
        for s, d in deltas(bank, n).items():
            out[s] = out.get(s, 0) + w * d
    return out


def outputs(bank, name, ids, mask):
    with torch.no_grad():
        return bank(ids, mask, routing=Routing.one_hot([bank.index(name)] * ids.shape[0])).output


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_merge_is_the_mean_of_the_products_exactly(family):
    bank = mixed_bank(family)
    rep = merge_modules(bank, ["a", "b"], "ab")
    assert rep["exact"] and rep["rank"] == 6 and rep["relative_error"] == 0.0
    assert bank.record("ab").type == "lora" and bank.record("ab").config["r"] == 6
    want = expected(bank, ["a", "b"], [0.5, 0.5])
    got = deltas(bank, "ab")
    assert set(got) == set(want)
    for s in want:
        torch.testing.assert_close(got[s], want[s], atol=1e-6, rtol=1e-5)
    # the bank's output with the merged module equals its output with the averaged delta folded in
    ids, mask = batch()
    merged_out = outputs(bank, "ab", ids, mask)
    with torch.no_grad():
        for s, d in want.items():
            bank.banked_layer(s).base.weight.add_(d.float())
        folded = bank(ids, mask).output  # no module routed: the base weights carry the mean delta
        for s, d in want.items():
            bank.banked_layer(s).base.weight.sub_(d.float())
    torch.testing.assert_close(merged_out, folded, atol=1e-5, rtol=1e-5)
    assert (merged_out - bank(ids, mask).output).abs().max() > 1e-3


def test_merging_the_factors_separately_would_differ():
    """What the exact merge avoids: mean(B) mean(A) != mean(B A) (the test that the check above could fail)."""
    bank = bank_with("encoder", "lora", {"r": 4}, n=2)
    merge_modules(bank, ["m0", "m1"], "avg")
    s = bank.module_sites("m0")[0]
    p0, p1 = bank.module_parameters("m0"), bank.module_parameters("m1")
    naive = 2.0 * ((p0[f"{s}.lora_B"] + p1[f"{s}.lora_B"]) / 2) @ ((p0[f"{s}.lora_A"] + p1[f"{s}.lora_A"]) / 2)
    assert (naive - bank.delta_weight("avg")[s]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_merge_over_different_ranks_sites_and_scales(family):
    bank = mixed_bank(family)
    w = [0.7, -0.4, 1.5]  # a negative weight negates b
    rep = merge_modules(bank, ["a", "b", "c"], "abc", method="weighted", weights=w)
    assert rep["exact"] and rep["rank"] == 9
    want, got = expected(bank, ["a", "b", "c"], w), deltas(bank, "abc")
    assert set(got) == set(want) == set(bank.module_sites("a"))
    for s in want:
        torch.testing.assert_close(got[s], want[s], atol=1e-6, rtol=1e-5)


def test_negation_is_minus_the_expert():
    bank = bank_with("encoder", "lora", {"r": 4}, n=1)
    merge_modules(bank, ["m0"], "neg", method="weighted", weights=[-1.0])
    ids, mask = batch()
    for s, d in deltas(bank, "m0").items():
        torch.testing.assert_close(deltas(bank, "neg")[s], -d, atol=1e-7, rtol=1e-6)
    with torch.no_grad():  # base + delta - delta: routing to both at weight 1 each cancels at every site
        both = bank(ids, mask, routing=Routing(torch.ones(3, 2), torch.tensor([[0, 1]] * 3))).output
    torch.testing.assert_close(both, bank(ids, mask).output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_svd_truncated_merge_at_full_rank_is_exact(family):
    bank = mixed_bank(family)
    rep = merge_modules(bank, ["a", "b", "c"], "svd", method="uniform", rank=9)
    assert not rep["exact"] and rep["rank"] == 9 and rep["relative_error"] < 1e-6
    assert all(e < 1e-6 for e in rep["site_errors"].values())
    want, got = expected(bank, ["a", "b", "c"], [1 / 3] * 3), deltas(bank, "svd")
    for s in want:
        torch.testing.assert_close(got[s], want[s], atol=1e-6, rtol=1e-5)


def test_svd_truncation_reports_the_error_it_makes():
    bank = bank_with("encoder", "lora", {"r": 4}, n=2)
    rep = merge_modules(bank, ["m0", "m1"], "low", rank=2)
    want = expected(bank, ["m0", "m1"], [0.5, 0.5])
    num = den = 0.0
    for s, d in want.items():
        diff = float(((deltas(bank, "low")[s] - d) ** 2).sum())
        assert rep["site_errors"][s] == pytest.approx((diff / float((d ** 2).sum())) ** 0.5, rel=1e-4)
        num, den = num + diff, den + float((d ** 2).sum())
        S = torch.linalg.svdvals(d)  # the best rank-2 approximation (Eckart-Young)
        assert diff == pytest.approx(float((S[2:] ** 2).sum()), rel=1e-4)
    assert 0 < rep["relative_error"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert bank.record("low").config["r"] == 2


def test_ties_matches_a_hand_computed_example():
    d = torch.tensor([[[3.0, -1.0], [0.5, 2.0]],
                      [[-2.0, 4.0], [0.1, -3.0]],
                      [[1.0, -0.2], [-6.0, 1.0]]], dtype=torch.float64)
    # density 0.5: keep the 2 largest |entries| of each: [[3,0],[0,2]], [[0,4],[0,-3]], [[0,0],[-6,1]]
    # elected signs (total mass): (0,0): +3 -> +; (0,1): +4 -> +; (1,0): -6 -> -; (1,1): 2-3+1=0 -> +
    # disjoint mean: (0,0) 3/1; (0,1) 4/1; (1,0) -6/1; (1,1) (2+1)/2
    want = torch.tensor([[3.0, 4.0], [-6.0, 1.5]], dtype=torch.float64)
    torch.testing.assert_close(ties_merge(d, torch.ones(3, dtype=torch.float64), 0.5), want)
    # weights apply before the election: halving the third expert halves its -6 and flips the vote at (1,1),
    # 2 - 3 + 0.5 < 0, so only the second expert's -3 is kept there
    got = ties_merge(d, torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64), 0.5)
    torch.testing.assert_close(got, torch.tensor([[3.0, 4.0], [-3.0, -3.0]], dtype=torch.float64))


def test_ties_merge_module_matches_ties_on_the_deltas():
    bank = bank_with("encoder", "lora", {"r": 4}, n=3)
    rep = merge_modules(bank, ["m0", "m1", "m2"], "ties", method="ties", density=0.3, rank=32)
    assert rep["relative_error"] < 1e-6  # rank 32 = the full width of the tiny model
    for s in bank.module_sites("m0"):
        D = torch.stack([deltas(bank, n)[s] for n in ["m0", "m1", "m2"]])
        want = ties_merge(D, torch.ones(3, dtype=torch.float64), 0.3)
        torch.testing.assert_close(deltas(bank, "ties")[s], want, atol=1e-6, rtol=1e-5)
        assert float((want != 0).double().mean()) < 0.9  # trimming left zeros


def test_dare_is_seeded_and_rescales():
    bank = bank_with("encoder", "lora", {"r": 4}, n=2)
    merge_modules(bank, ["m0", "m1"], "d1", method="dare", density=0.5, rank=32, seed=3)
    merge_modules(bank, ["m0", "m1"], "d2", method="dare", density=0.5, rank=32, seed=3)
    merge_modules(bank, ["m0", "m1"], "d3", method="dare", density=0.5, rank=32, seed=4)
    merge_modules(bank, ["m0", "m1"], "dt", method="dare_ties", density=0.5, rank=32, seed=3)
    s = bank.module_sites("m0")[0]
    d1, d2, d3 = (deltas(bank, n)[s] for n in ("d1", "d2", "d3"))
    torch.testing.assert_close(d1, d2)
    assert (d1 - d3).abs().max() > 1e-3
    mean = expected(bank, ["m0", "m1"], [0.5, 0.5])[s]
    # each kept entry is rescaled by 1/density: on average DARE keeps the mean (loosely, on 1024 entries)
    assert float((d1 - mean).mean().abs()) < 0.1 * float(mean.abs().mean())
    assert (deltas(bank, "dt")[s] - d1).abs().max() > 1e-3


def test_refusals():
    bank = mixed_bank("encoder")
    with pytest.raises(MtpeftError, match="already has a module named 'a'"):
        merge_modules(bank, ["b", "c"], "a")
    with pytest.raises(MtpeftError, match="unknown merge method"):
        merge_modules(bank, ["a", "b"], "x", method="mean")
    with pytest.raises(MtpeftError, match="one weight per module"):
        merge_modules(bank, ["a", "b"], "x", method="weighted", weights=[1.0])
    with pytest.raises(MtpeftError, match="needs one weight per module"):
        merge_modules(bank, ["a", "b"], "x", method="weighted")
    with pytest.raises(MtpeftError, match="takes no weights"):
        merge_modules(bank, ["a", "b"], "x", weights=[0.5, 0.5])
    with pytest.raises(MtpeftError, match="density"):
        merge_modules(bank, ["a", "b"], "x", method="ties", density=0)
    with pytest.raises(MtpeftError, match="rank"):
        merge_modules(bank, ["a", "b"], "x", rank=0)
    with pytest.raises(MtpeftError, match="no module 'zz'"):
        merge_modules(bank, ["a", "zz"], "x")
    with pytest.raises(MtpeftError, match="named twice"):
        merge_modules(bank, ["a", "a"], "x")
    bank.add("ia3", "ia3", {})
    with pytest.raises(MtpeftError, match="--rank"):
        merge_modules(bank, ["a", "ia3"], "x")
    bank.add("p", "prompt", {"n_tokens": 2})
    with pytest.raises(MtpeftError, match="no weight delta"):
        merge_modules(bank, ["a", "p"], "x")
    bank.merge("b")
    with pytest.raises(MtpeftError, match="unmerge it first"):
        merge_modules(bank, ["a", "b"], "x")
    assert "x" not in bank  # nothing was added by a refused merge


def test_ia3_merges_through_its_weight_delta_with_a_rank():
    bank = bank_with("encoder", "lora", {"r": 4}, n=1)
    bank.add("ia3", "ia3", {"target_modules": ["query", "value"]})
    perturb(bank, "ia3", seed=4)
    rep = merge_modules(bank, ["m0", "ia3"], "mix", method="uniform", rank=32)
    assert rep["relative_error"] < 1e-6
    want = expected(bank, ["m0", "ia3"], [0.5, 0.5])
    for s in want:
        torch.testing.assert_close(deltas(bank, "mix")[s], want[s], atol=1e-6, rtol=1e-5)


# ---- peft: the merged module exports and re-imports with equal outputs --------------------------------
def test_merged_module_exports_to_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    from mtpeft.backbone import load_backbone
    from mtpeft.interop import export_peft, import_peft

    bb = load_backbone("tiny-bert", seed=0)
    bb.model.save_pretrained(tmp_path / "base")
    bb.tokenizer.save_pretrained(tmp_path / "base")
    bank = ModuleBank(load_backbone(str(tmp_path / "base")))
    bank.add("a", "lora", {"r": 2, "alpha": 4.0}, seed=1)
    bank.add("b", "lora", {"r": 4, "alpha": 2.0, "target_modules": ["query"]}, seed=2)
    for i, n in enumerate(bank.names):
        perturb(bank, n, seed=i)
    merge_modules(bank, ["a", "b"], "ab", method="weighted", weights=[0.6, 0.4])
    export_peft(bank, "ab", tmp_path / "ab")
    ids, mask = batch()
    ids = ids + 5  # clear of the special tokens
    want = outputs(bank, "ab", ids, mask)
    pm = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(str(tmp_path / "base")).eval(), str(tmp_path / "ab"))
    with torch.no_grad():
        got = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    other = ModuleBank(load_backbone(str(tmp_path / "base")))
    import_peft(other, tmp_path / "ab", name="ab")
    torch.testing.assert_close(outputs(other, "ab", ids, mask), want, atol=1e-6, rtol=1e-6)
