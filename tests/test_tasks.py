"""Task, TaskStream and load_task_file on tiny synthetic data."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from mtpeft.io import MtpeftError
from mtpeft.tasks import Task, TaskStream, load_task_file, make_dataset


def _task(name="t", n=(8, 4, 4), labels=("a", "b"), **kw) -> Task:
    def split(k, off):
        return make_dataset([f"text {off + i}" for i in range(k)], [i % len(labels) for i in range(k)])

    dd = DatasetDict(train=split(n[0], 0), validation=split(n[1], 100), test=split(n[2], 200))
    return Task(name=name, splits=dd, label_names=list(labels), **kw)


def _write_csv(path, rows, header=("text", "label")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _rows(n=50, labels=("neg", "pos", "neu")):
    return [(f"example number {i}", labels[i % len(labels)]) for i in range(n)]


# ---- Task ---------------------------------------------------------------------------------------
def test_task_formatting():
    t = _task(template="Review: {text}", label_template="{label} sentiment", prompt_suffix="\nSentiment:")
    assert t.num_labels == 2
    assert t.label_texts == ["a sentiment", "b sentiment"]
    assert t.format_inputs(["x", "y {z}"]) == ["Review: x", "Review: y {z}"]
    assert t.format_input("q") == "Review: q"
    assert t.prompt_suffix == "\nSentiment:"
    assert _task().label_texts == ["a", "b"] and _task().format_input("x") == "x"


def test_template_needs_placeholders():
    with pytest.raises(MtpeftError, match=r"\{text\}"):
        _task(template="no placeholder")
    with pytest.raises(MtpeftError, match=r"\{label\}"):
        _task(label_template="about it")


def test_majority_baseline_uses_train_majority():
    train = make_dataset(["a"] * 5, [1, 1, 1, 0, 2])
    test = make_dataset(["b"] * 4, [0, 0, 0, 1])  # the train majority (1) is right once in 4
    t = Task("m", DatasetDict(train=train, validation=test, test=test), ["x", "y", "z"])
    assert t.majority_baseline() == pytest.approx(0.25)
    assert t.majority_baseline("train") == pytest.approx(0.6)
    assert list(t.label_counts("train")) == [1, 3, 1]
    with pytest.raises(MtpeftError, match="no split"):
        t.majority_baseline("dev")


def test_cap_is_seeded_mixed_and_bounded():
    # a train split sorted by label: the first 10 rows are all label 0
    train = make_dataset([f"t{i}" for i in range(100)], [0] * 50 + [1] * 50)
    small = make_dataset(["v1", "v2", "v3"], [0, 1, 0])
    t = Task("c", DatasetDict(train=train, validation=small, test=small), ["a", "b"])
    c1, c2, c3 = t.cap(10, seed=0), t.cap(10, seed=0), t.cap(10, seed=1)
    assert {k: len(v) for k, v in c1.splits.items()} == {"train": 10, "validation": 3, "test": 3}
    assert c1.splits["train"]["text"][:] == c2.splits["train"]["text"][:]
    assert c1.splits["train"]["text"][:] != c3.splits["train"]["text"][:]
    assert len(set(c1.splits["train"]["label"][:])) == 2  # shuffled before the cut: both classes
    assert len(t.splits["train"]) == 100  # the original is untouched
    assert c1.validate() is c1 and c1.label_names == t.label_names
    assert len(t.cap(None).splits["train"]) == 100
    for bad in (0, -3, 2.5, True):
        with pytest.raises(MtpeftError, match="max_examples"):
            t.cap(bad)


def test_cap_selected_splits_only():
    big = make_dataset([f"t{i}" for i in range(40)], [0, 1] * 20)
    t = Task("c", DatasetDict(train=big, validation=big, test=big), ["a", "b"])
    c = t.cap(5, splits=["train"])
    assert {k: len(v) for k, v in c.splits.items()} == {"train": 5, "validation": 40, "test": 40}
    with pytest.raises(MtpeftError, match="no split.*dev"):
        t.cap(5, splits=["dev"])


def test_validate_accepts_good_task():
    assert _task().validate().name == "t"


def test_validate_missing_split():
    t = _task()
    t.splits = DatasetDict(train=t.splits["train"], test=t.splits["test"])
    with pytest.raises(MtpeftError, match="lacks the split 'validation'"):
        t.validate()


def test_validate_missing_column():
    t = _task()
    t.splits["test"] = t.splits["test"].rename_column("label", "y")
    with pytest.raises(MtpeftError, match=r"split test lacks the column 'label' \(columns: text, y\)"):
        t.validate()


def test_validate_empty_split():
    t = _task()
    t.splits["validation"] = make_dataset([], [])
    with pytest.raises(MtpeftError, match="split validation is empty"):
        t.validate()


@pytest.mark.parametrize("bad", [2, -1])
def test_validate_label_out_of_range(bad):
    t = _task()
    t.splits["train"] = make_dataset(["x", "y"], [0, bad])
    with pytest.raises(MtpeftError, match=rf"label {bad} outside 0..1"):
        t.validate()


def test_validate_label_range_sees_selected_view():
    t = _task()
    t.splits["test"] = make_dataset(["x", "y", "z"], [0, 1, 5]).select([2, 0])
    with pytest.raises(MtpeftError, match="label 5 outside"):
        t.validate()
    t.splits["test"] = make_dataset(["x", "y", "z"], [0, 1, 5]).select([0, 1])
    t.validate()


def test_validate_fewer_than_two_labels():
    with pytest.raises(MtpeftError, match="at least two"):
        _task(labels=("only",)).validate()


def test_validate_duplicate_label_names():
    with pytest.raises(MtpeftError, match="duplicate label names"):
        _task(labels=("a", "a")).validate()


def test_validate_non_str_text():
    t = _task()
    t.splits["train"] = Dataset.from_dict({"text": [1, 2], "label": [0, 1]})
    with pytest.raises(MtpeftError, match="not str"):
        t.validate()


def test_validate_null_text():
    t = _task()
    t.splits["train"] = make_dataset(["x", None], [0, 1])
    with pytest.raises(MtpeftError, match="null text"):
        t.validate()


# ---- TaskStream ---------------------------------------------------------------------------------
def test_task_stream():
    a, b = _task("a"), _task("b")
    s = TaskStream([a, b])
    assert len(s) == 2 and s.names == ["a", "b"] and list(s) == [a, b]
    assert s[0] is a and s["b"] is b and s[-1] is b
    assert "a" in s and "z" not in s and s.index("b") == 1
    with pytest.raises(KeyError, match="no task 'z'"):
        s["z"]
    with pytest.raises(MtpeftError, match="duplicate task name 'a'"):
        TaskStream([a, _task("a")])
    with pytest.raises(MtpeftError, match="Task objects"):
        TaskStream(["a"])


# ---- load_task_file: formats and labels -----------------------------------------------------------
def test_csv_string_labels_inferred_sorted(tmp_path):
    p = _write_csv(tmp_path / "d.csv", _rows(50))
    t = load_task_file("rev", p)
    assert t.name == "rev" and t.label_names == ["neg", "neu", "pos"]
    sizes = {k: len(v) for k, v in t.splits.items()}
    assert sizes == {"train": 35, "validation": 5, "test": 10}
    # every row lands in exactly one split, with its label intact
    seen = {}
    for ds in t.splits.values():
        for ex in ds:
            seen[ex["text"]] = t.label_names[ex["label"]]
    assert seen == dict(_rows(50))


def test_given_label_names_fix_the_order(tmp_path):
    p = _write_csv(tmp_path / "d.csv", _rows(30))
    t = load_task_file("rev", p, label_names=["pos", "neg", "neu"])
    assert t.label_names == ["pos", "neg", "neu"]
    ex = next(e for ds in t.splits.values() for e in ds if e["text"] == "example number 0")
    assert ex["label"] == 1  # "neg"


def test_split_is_deterministic_and_seeded(tmp_path):
    p = _write_csv(tmp_path / "d.csv", _rows(60))
    a, b, c = load_task_file("x", p, seed=3), load_task_file("x", p, seed=3), load_task_file("x", p, seed=4)
    assert a.splits["test"]["text"][:] == b.splits["test"]["text"][:]
    assert a.splits["test"]["text"][:] != c.splits["test"]["text"][:]
    t = load_task_file("x", p, val_frac=0.25, test_frac=0.25)
    assert [len(t.splits[s]) for s in ("train", "validation", "test")] == [30, 15, 15]


def test_jsonl_int_labels_without_names(tmp_path):
    recs = [{"text": f"t{i}", "label": i % 3, "extra": 1} for i in range(20)]
    t = load_task_file("j", _write_jsonl(tmp_path / "d.jsonl", recs))
    assert t.label_names == ["0", "1", "2"]
    got = {e["text"]: e["label"] for ds in t.splits.values() for e in ds}
    assert got == {r["text"]: r["label"] for r in recs}


def test_json_lines_int_labels_with_names(tmp_path):
    recs = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    t = load_task_file("j", _write_jsonl(tmp_path / "d.json", recs), label_names=["no", "yes"])
    assert t.label_names == ["no", "yes"]
    assert t.label_texts == ["no", "yes"]


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)]), encoding="utf-8")
    assert load_task_file("j", p).label_names == ["a", "b"]


def test_csv_integer_labels(tmp_path):
    p = _write_csv(tmp_path / "d.csv", [(f"t{i}", i % 4) for i in range(20)])
    assert load_task_file("c", p).label_names == ["0", "1", "2", "3"]
    t = load_task_file("c", p, label_names=["a", "b", "c", "d"])
    got = {e["text"]: e["label"] for ds in t.splits.values() for e in ds}
    assert got["t3"] == 3 and got["t5"] == 1


def test_parquet_and_custom_columns(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"sentence": [f"s{i}" for i in range(12)], "y": ["b", "a"] * 6}), p)
    t = load_task_file("pq", p, text_column="sentence", label_column="y")
    assert t.label_names == ["a", "b"]
    assert sum(len(ds) for ds in t.splits.values()) == 12
    assert t.splits["train"].column_names == ["text", "label"]


def test_directory_with_train_and_test(tmp_path):
    _write_csv(tmp_path / "train.csv", [(f"tr{i}", "xy"[i % 2]) for i in range(20)])
    _write_csv(tmp_path / "test.csv", [(f"te{i}", "yz"[i % 2]) for i in range(6)])
    t = load_task_file("d", tmp_path, val_frac=0.1)
    assert t.label_names == ["x", "y", "z"]  # inferred over all the files
    assert sorted(t.splits["test"]["text"][:]) == sorted(f"te{i}" for i in range(6))
    assert len(t.splits["validation"]) == 2 and len(t.splits["train"]) == 18
    assert all(x.startswith("tr") for x in t.splits["validation"]["text"][:])


def test_directory_with_all_splits_and_mixed_formats(tmp_path):
    _write_csv(tmp_path / "train.csv", [(f"tr{i}", "ab"[i % 2]) for i in range(10)])
    _write_jsonl(tmp_path / "dev.jsonl", [{"text": "v", "label": "a"}])
    pq.write_table(pa.table({"text": ["t1", "t2"], "label": ["b", "a"]}), tmp_path / "test.parquet")
    (tmp_path / "README.md").write_text("ignored")
    t = load_task_file("d", tmp_path)
    assert {k: len(v) for k, v in t.splits.items()} == {"train": 10, "validation": 1, "test": 2}
    assert t.splits["test"]["label"][:] == [1, 0]


# ---- load_task_file: errors ------------------------------------------------------------------------
def test_error_missing_file(tmp_path):
    with pytest.raises(MtpeftError, match=r"not found: .*nope\.csv"):
        load_task_file("x", tmp_path / "nope.csv")


def test_error_unsupported_extension(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("text,label\na,b\n")
    with pytest.raises(MtpeftError, match=r"unsupported task file type '\.txt'.*data\.txt.*\.csv"):
        load_task_file("x", p)


def test_error_missing_column_lists_columns(tmp_path):
    p = _write_csv(tmp_path / "d.csv", [("a", "b")], header=("sentence", "label"))
    with pytest.raises(MtpeftError, match=r"d\.csv lacks the column\(s\) 'text'; columns found: 'sentence', 'label'"):
        load_task_file("x", p)
    recs = [{"text": "a", "y": 1}]
    with pytest.raises(MtpeftError, match=r"d\.jsonl lacks the column\(s\) 'label'.*'text', 'y'"):
        load_task_file("x", _write_jsonl(tmp_path / "d.jsonl", recs))
    pq.write_table(pa.table({"txt": ["a"], "label": [0]}), tmp_path / "d.parquet")
    with pytest.raises(MtpeftError, match=r"lacks the column\(s\) 'text'.*'txt'"):
        load_task_file("x", tmp_path / "d.parquet")


def test_error_empty_files(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(MtpeftError, match=r"e\.csv is empty"):
        load_task_file("x", tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(MtpeftError, match=r"h\.csv holds no examples"):
        load_task_file("x", tmp_path / "h.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(MtpeftError, match=r"e\.jsonl holds no examples"):
        load_task_file("x", tmp_path / "e.jsonl")


def test_error_empty_split(tmp_path):
    p = _write_csv(tmp_path / "two.csv", [("a", "x"), ("b", "y")])
    with pytest.raises(MtpeftError, match=r"two\.csv: the train split is empty"):
        load_task_file("x", p)


def test_error_label_not_in_names(tmp_path):
    p = _write_csv(tmp_path / "d.csv", [("a", "pos"), ("b", "neg"), ("c", "meh")])
    with pytest.raises(MtpeftError, match=r"d\.csv: row 3 has the label 'meh', which is not among"):
        load_task_file("x", p, label_names=["neg", "pos"])


def test_error_label_index_out_of_range(tmp_path):
    recs = [{"text": "a", "label": 0}, {"text": "b", "label": 7}]
    with pytest.raises(MtpeftError, match=r"row 2 has the label index 7, outside 0\.\.1"):
        load_task_file("x", _write_jsonl(tmp_path / "d.jsonl", recs), label_names=["a", "b"])


def test_error_fewer_than_two_labels(tmp_path):
    p = _write_csv(tmp_path / "one.csv", [(f"t{i}", "same") for i in range(10)])
    with pytest.raises(MtpeftError, match=r"one\.csv: found 1 label\(s\) \['same'\]; .*at least two"):
        load_task_file("x", p)
    with pytest.raises(MtpeftError, match="at least two"):
        load_task_file("x", p, label_names=["same"])


def test_error_not_utf8(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\ncaf\u00e9,a\nb,b\nc,a\n".encode("latin-1"))
    with pytest.raises(MtpeftError, match=r"latin\.csv is not valid UTF-8 .*line 2.*re-encode"):
        load_task_file("x", p)


def test_error_null_text(tmp_path):
    recs = [{"text": "a", "label": "x"}, {"text": None, "label": "y"}, {"text": "c", "label": "x"}]
    with pytest.raises(MtpeftError, match=r"d\.jsonl: row 2 has a null or empty 'text'"):
        load_task_file("x", _write_jsonl(tmp_path / "d.jsonl", recs))
    p = _write_csv(tmp_path / "d.csv", [("a", "x"), ("", "y"), ("c", "x")])
    with pytest.raises(MtpeftError, match=r"d\.csv: row 2 has a null or empty 'text'"):
        load_task_file("x", p)
    pq.write_table(pa.table({"text": ["a", None], "label": ["x", "y"]}), tmp_path / "d.parquet")
    with pytest.raises(MtpeftError, match=r"d\.parquet: row 2 has a null"):
        load_task_file("x", tmp_path / "d.parquet")


def test_error_non_string_text_and_bad_labels(tmp_path):
    with pytest.raises(MtpeftError, match=r"row 1 has a int in 'text'"):
        load_task_file("x", _write_jsonl(tmp_path / "a.jsonl", [{"text": 5, "label": "x"}]))
    with pytest.raises(MtpeftError, match="mixes integer and string labels"):
        load_task_file("x", _write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": 1},
                                                                 {"text": "b", "label": "x"}]))
    with pytest.raises(MtpeftError, match=r"row 2 has no label"):
        load_task_file("x", _write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}]))


def test_error_bad_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(MtpeftError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_task_file("x", p)


def test_error_directory_without_train(tmp_path):
    _write_csv(tmp_path / "test.csv", [("a", "x")])
    with pytest.raises(MtpeftError, match=r"no train file \(found: test\.csv\)"):
        load_task_file("x", tmp_path)


def test_error_bad_fractions(tmp_path):
    p = _write_csv(tmp_path / "d.csv", _rows(10))
    with pytest.raises(MtpeftError, match="val_frac"):
        load_task_file("x", p, val_frac=0.6, test_frac=0.5)


def test_loaded_labels_are_int64(tmp_path):
    t = load_task_file("x", _write_csv(tmp_path / "d.csv", _rows(20)))
    assert str(t.splits["train"].features["label"].dtype) == "int64"
    assert np.asarray(t.splits["train"]["label"][:]).dtype == np.int64
