"""The continual-learning metrics against hand-computed matrices, their edge cases, JSON, torchmetrics."""
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtpeft.continual import (
    AccuracyMatrix,
    AverageAccuracy,
    BackwardTransfer,
    Forgetting,
    ForwardTransfer,
    Intransigence,
)
from mtpeft.errors import MtpeftError

NAN = float("nan")
R3 = [[0.8, 0.3, 0.2],
      [0.6, 0.9, 0.4],
      [0.5, 0.7, 0.95]]


def three():
    return AccuracyMatrix(["a", "b", "c"], rows=R3, untrained=[0.3, 0.2, 0.1], joint=[0.9, 0.9, 0.9])


def test_hand_computed_three_tasks():
    m = three()
    assert m.acc() == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert m.bwt() == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m.fwt() == pytest.approx(((0.3 - 0.2) + (0.4 - 0.1)) / 2)
    assert m.forgetting() == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
    assert m.intransigence() == pytest.approx(((0.9 - 0.8) + (0.9 - 0.9) + (0.9 - 0.95)) / 3)
    assert m.bwt_per_task() == pytest.approx({"a": -0.3, "b": -0.2})
    assert m.fwt_per_task() == pytest.approx({"b": 0.1, "c": 0.3})
    assert set(m.summary()) == {"acc", "bwt", "fwt", "forgetting", "intransigence"}


def test_forgetting_takes_the_best_earlier_row_not_the_diagonal():
    # task a peaks after step 1 (0.9 > its diagonal 0.7): forgetting counts from the peak, BWT from the diagonal
    m = AccuracyMatrix(["a", "b", "c"], rows=[[0.7, 0.1, 0.1], [0.9, 0.8, 0.1], [0.4, 0.8, 0.9]])
    assert m.forgetting_per_task() == pytest.approx({"a": 0.5, "b": 0.0})
    assert m.bwt_per_task() == pytest.approx({"a": -0.3, "b": 0.0})


def test_forgetting_max_runs_over_every_earlier_row_as_methods_writes_it():
    # max_{l < T-1} R[l][j]: row 0 (before task b was trained) counts too
    m = AccuracyMatrix(["a", "b", "c"], rows=[[0.9, 0.6, 0.0], [0.9, 0.5, 0.0], [0.9, 0.4, 0.9]])
    assert m.forgetting_per_task()["b"] == pytest.approx(0.6 - 0.4)


def test_one_task_has_no_bwt_fwt_or_forgetting():
    m = AccuracyMatrix(["a"], rows=[[0.7]], untrained=[0.2], joint=[0.8])
    assert m.acc() == pytest.approx(0.7)
    assert m.bwt() is None and m.fwt() is None and m.forgetting() is None  # undefined, not 0
    assert m.intransigence() == pytest.approx(0.1)


def test_nothing_trained_yet_every_metric_is_none():
    m = AccuracyMatrix(["a", "b"], untrained=[0.5, 0.5], joint=[0.9, 0.9])
    assert m.summary() == {k: None for k in ("acc", "bwt", "fwt", "forgetting", "intransigence")}


def test_without_untrained_or_joint_fwt_and_intransigence_are_none():
    m = AccuracyMatrix(["a", "b", "c"], rows=R3)
    assert m.fwt() is None and m.intransigence() is None
    assert m.fwt_per_task() == {"b": None, "c": None}


def test_partial_stream_counts_only_the_learnt_tasks():
    m = AccuracyMatrix(["a", "b", "c"], rows=R3[:2], untrained=[0.3, 0.2, 0.1])
    assert m.acc() == pytest.approx((0.6 + 0.9) / 2)  # c is not learnt: its 0.4 does not count
    assert m.bwt() == pytest.approx(0.6 - 0.8)
    assert m.forgetting() == pytest.approx(0.8 - 0.6)
    assert m.fwt_per_task() == pytest.approx({"b": 0.1})


def test_a_task_never_learnt_is_left_out():
    # "held" is evaluated after every step but never trained
    m = AccuracyMatrix(["a", "held", "b"], steps=["a", "b"], rows=[[0.8, 0.4, 0.3], [0.6, 0.45, 0.9]],
                       untrained=[0.3, 0.4, 0.2], joint=[0.9, 0.9, 0.9])
    assert m.acc() == pytest.approx((0.6 + 0.9) / 2)
    assert m.bwt() == pytest.approx(0.6 - 0.8)
    assert m.fwt() == pytest.approx(0.3 - 0.2)
    assert set(m.intransigence_per_task()) == {"a", "b"}


def test_stream_evaluated_on_a_subset_of_its_tasks():
    # step b trains a task nobody evaluates: columns a and c, rows a, b, c
    m = AccuracyMatrix(["a", "c"], steps=["a", "b", "c"], rows=[[0.8, 0.1], [0.7, 0.3], [0.6, 0.9]],
                       untrained=[0.2, 0.1])
    assert m.step_of("c") == 2
    assert m.acc() == pytest.approx((0.6 + 0.9) / 2)
    assert m.bwt() == pytest.approx(0.6 - 0.8)  # a against its own step 0, c is the last
    assert m.fwt_per_task() == pytest.approx({"c": 0.3 - 0.1})  # the row before c's step is b's
    assert m.forgetting() == pytest.approx(0.8 - 0.6)


def test_nan_cells_drop_their_terms_only():
    rows = [[0.8, NAN, NAN], [NAN, 0.9, NAN], [0.5, 0.7, 0.95]]
    m = AccuracyMatrix(["a", "b", "c"], rows=rows, untrained=[0.3, 0.2, 0.1])
    # each task evaluated only once learnt: FWT needs R[j-1][j], never measured -> None, not 0 (avalanche's pitfall)
    assert m.fwt() is None
    assert m.bwt() == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    assert m.forgetting() == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
    rows[1][1] = NAN  # b's diagonal missing: b drops out of BWT and forgetting, a stays
    m = AccuracyMatrix(["a", "b", "c"], rows=rows)
    assert m.bwt_per_task() == {"a": pytest.approx(-0.3), "b": None}
    assert m.bwt() == pytest.approx(-0.3)
    assert m.forgetting() == pytest.approx(0.3)


def test_rows_as_mappings_leave_missing_tasks_unevaluated():
    m = AccuracyMatrix(["a", "b"])
    m.add_row({"a": 0.5})
    m.add_row({"a": 0.4, "b": 0.8})
    assert math.isnan(m.R[0][1])
    assert m.bwt() == pytest.approx(-0.1)


@pytest.mark.parametrize("bad, match", [
    ({"tasks": []}, "non-empty"),
    ({"tasks": ["a", "a"]}, "distinct"),
    ({"tasks": ["a", "b"], "rows": [[0.5, 85.0]]}, r"fractions in \[0, 1\]"),
    ({"tasks": ["a", "b"], "rows": [[0.5]]}, "1 values for 2 tasks"),
    ({"tasks": ["a", "b"], "rows": [{"a": 0.5, "z": 0.1}]}, "unknown tasks"),
    ({"tasks": ["a"], "rows": [[0.5], [0.6]]}, "already have a row"),
    ({"tasks": ["a", "b"], "untrained": [True, 0.5]}, "fractions"),
    ({"tasks": ["a", "b"], "joint": ["x", 0.5]}, "fractions"),
])
def test_bad_input_is_refused(bad, match):
    kw = dict(bad)
    with pytest.raises(MtpeftError, match=match):
        AccuracyMatrix(kw.pop("tasks"), **kw)


def test_json_round_trip_keeps_nan_cells_and_metrics(tmp_path):
    m = AccuracyMatrix(["a", "held", "b"], steps=["a", "b"], rows=[[0.8, NAN, 0.3], [0.6, 0.45, 0.9]],
                       untrained=[0.3, NAN, 0.2])
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: NaN written as null
    back = AccuracyMatrix.from_dict(json.loads(text))
    assert back.summary() == m.summary()
    assert back.tasks == m.tasks and back.steps == m.steps and back.joint is None
    assert math.isnan(back.R[0][1]) and math.isnan(back.untrained[1])
    m.save(tmp_path / "acc.json")
    assert AccuracyMatrix.load(tmp_path / "acc.json").to_dict() == d


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format="other"), "not an accuracy matrix"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(extra=1), "unknown fields"),
    (lambda d: d.update(R="nope"), "no 'R' list"),
    (lambda d: d["R"].append([0.1, 0.2, 0.3]), "already have a row"),
    (lambda d: d["R"][0].pop(), "2 values for 3 tasks"),
    (lambda d: d.update(tasks=None), "non-empty"),
])
def test_bad_json_is_refused(mutate, match):
    d = three().to_dict()
    mutate(d)
    with pytest.raises(MtpeftError, match=match):
        AccuracyMatrix.from_dict(d)


def test_load_refuses_a_file_that_is_not_json(tmp_path):
    (tmp_path / "acc.json").write_text("{not json")
    with pytest.raises(MtpeftError, match="not valid JSON"):
        AccuracyMatrix.load(tmp_path / "acc.json")


def reference(R, b):
    """METHODS.md's formulas, written directly on a full T x T matrix."""
    R, T = np.asarray(R), len(R)
    out = {"acc": R[-1].mean()}
    if T > 1:
        out["bwt"] = np.mean([R[-1, j] - R[j, j] for j in range(T - 1)])
        out["fwt"] = np.mean([R[j - 1, j] - b[j] for j in range(1, T)])
        out["forgetting"] = np.mean([R[:-1, j].max() - R[-1, j] for j in range(T - 1)])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6).flatmap(lambda t: st.tuples(
    st.lists(st.lists(st.floats(0, 1), min_size=t, max_size=t), min_size=t, max_size=t),
    st.lists(st.floats(0, 1), min_size=t, max_size=t))))
def test_full_matrices_match_the_formulas(Rb):
    R, b = Rb
    names = [f"t{i}" for i in range(len(R))]
    m = AccuracyMatrix(names, rows=R, untrained=b)
    ref = reference(R, b)
    for k in ("acc", "bwt", "fwt", "forgetting"):
        got = getattr(m, k)()
        assert (got is None) == (k not in ref)
        if k in ref:
            assert got == pytest.approx(ref[k], abs=1e-12)


@pytest.mark.parametrize("cls, which", [(AverageAccuracy, "acc"), (BackwardTransfer, "bwt"),
                                        (ForwardTransfer, "fwt"), (Forgetting, "forgetting"),
                                        (Intransigence, "intransigence")])
def test_torchmetrics_match_the_matrix_row_by_row(cls, which):
    metric = cls(["a", "b", "c"], untrained=[0.3, 0.2, 0.1], joint=[0.9, 0.9, 0.9])
    for i, row in enumerate(R3):
        got = metric(row)
        want = getattr(AccuracyMatrix(["a", "b", "c"], rows=R3[:i + 1], untrained=[0.3, 0.2, 0.1],
                                      joint=[0.9, 0.9, 0.9]), which)()
        if want is None:
            assert torch.isnan(got)
        else:
            assert got.item() == pytest.approx(want)
    assert metric.compute().item() == pytest.approx(getattr(three(), which)())
    metric.reset()
    assert len(metric.rows) == 0


def test_torchmetrics_undefined_is_nan_not_zero_and_bad_rows_are_refused():
    fwt = ForwardTransfer(["a", "b"])  # no untrained accuracies
    fwt.update([0.5, 0.4])
    fwt.update({"a": 0.4, "b": 0.9})
    assert torch.isnan(fwt.compute())
    fwt.set_untrained([0.1, 0.1])
    assert fwt.compute().item() == pytest.approx(0.3)
    with pytest.raises(MtpeftError, match="already have a row"):
        fwt.update([0.1, 0.1])
    with pytest.raises(MtpeftError, match="fractions"):
        BackwardTransfer(["a", "b"]).update([0.5, 50])


def test_public_name():
    import mtpeft
    from mtpeft.continual.metrics import AccuracyMatrix as FromMetrics

    assert mtpeft.AccuracyMatrix is AccuracyMatrix is FromMetrics and "AccuracyMatrix" in mtpeft.__all__
