"""Fuzzing the readers of user input that `mtpeft train` and the task commands open: run files (JSON and
YAML) and task files (CSV, JSONL, parquet). Random bytes, valid files truncated at random lengths, bytes
flipped, and valid files with values swapped for random JSON: every outcome is a loaded value or an
``MtpeftError``; anything else (a traceback) fails.

Derandomised (the same cases every run) and sized to finish in well under a minute on one core.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtpeft.cli import load_run_config
from mtpeft.errors import MtpeftError
from mtpeft.tasks import load_task_file

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VALID_RUN = {"backbone": "tiny-bert", "module": "lora", "options": {"r": 4, "alpha": 8.0}, "tasks": ["bbc_topic"],
             "task_files": ["toy=toy.csv"], "max_examples": 40, "seed": 1, "multitask": False,
             "sampling": "temperature", "lr": 0.002, "batch_size": 8, "max_epochs": 2, "max_steps": 10,
             "patience": 1, "run_dir": "runs"}
VALID_YAML = "\n".join(f"{k}: {json.dumps(v)}" for k, v in VALID_RUN.items()) + "\n"

# text with control characters and lone surrogates (JSON can escape "\ud800"; no tokenizer takes it)
texts = st.text(st.characters(categories=["Lu", "Ll", "Nd", "Zs", "Cc", "Cs", "So"]), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


def outcome(read, *args, **kwargs):
    """'ok' or 'error' (an MtpeftError); any other exception propagates and fails the test."""
    try:
        read(*args, **kwargs)
    except MtpeftError:
        return "error"
    return "ok"


def mutate(data: bytes, how: tuple) -> bytes:
    kind, pos, byte = how
    if not data:
        return data
    pos %= len(data)
    if kind == "truncate":
        return data[:pos]
    if kind == "flip":
        return data[:pos] + bytes([byte]) + data[pos + 1:]
    if kind == "insert":
        return data[:pos] + bytes([byte]) + data[pos:]
    return data[:pos] + data[pos + 1:]  # delete


mutations = st.lists(st.tuples(st.sampled_from(["truncate", "flip", "insert", "delete"]), st.integers(0, 10**6),
                               st.integers(0, 255)), min_size=1, max_size=4)


# ---- run files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@FUZZ
@given(data=st.binary(max_size=300))
def test_run_file_random_bytes(tmp_path, suffix, data):
    (tmp_path / f"run{suffix}").write_bytes(data)
    outcome(load_run_config, tmp_path / f"run{suffix}")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@FUZZ
@given(how=mutations)
def test_run_file_mutated_bytes(tmp_path, suffix, how):
    data = (json.dumps(VALID_RUN) if suffix == ".json" else VALID_YAML).encode()
    for h in how:
        data = mutate(data, h)
    (tmp_path / f"run{suffix}").write_bytes(data)
    outcome(load_run_config, tmp_path / f"run{suffix}")


@FUZZ
@given(key=st.sampled_from(sorted(VALID_RUN)), value=json_values, as_yaml=st.booleans())
def test_run_file_mutated_values(tmp_path, key, value, as_yaml):
    import yaml

    conf = dict(VALID_RUN, **{key: value})
    path = tmp_path / ("run.yaml" if as_yaml else "run.json")
    path.write_text(yaml.safe_dump(conf) if as_yaml else json.dumps(conf))
    if outcome(load_run_config, path) == "ok":  # what loads is what the flags would give
        conf = load_run_config(path)
        assert isinstance(conf["lr"], float) and isinstance(conf["multitask"], bool)
        assert isinstance(conf["max_steps"], int) and not isinstance(conf["max_steps"], bool)


# YAML that PyYAML reads into surprises: dates (and impossible ones), tags, anchors, YAML 1.1 booleans,
# numbers it reads as strings, merge keys, nesting thousands deep
YAML_SNIPPETS = ["2001-13-45", "2001-12-14", "2001-12-14 21:59:43.10 -5", "!!float fast", "!!int x", "!!binary xx",
                 "!!python/object:os.system {}", "!!set {a, b}", ".nan", "-.inf", "1e999", "1e-3", "0x1F", "0o17",
                 "0b101", "~", "yes", "no", "on", "'1e-3'", "[1, [2, [3]]]", "{a: 1}", "&a [1, *a]", "*nothing",
                 "\"\\ud800\"", "\"\\x00\"", "12:30:00", "!!str", "|\n  block\n", "{? [1]: 2}", "<<: {r: 1}",
                 "-1", "2.5", "true", "''", "'  '"]


@FUZZ
@given(key=st.sampled_from(sorted(VALID_RUN)), snippet=st.sampled_from(YAML_SNIPPETS),
       depth=st.sampled_from([0, 0, 1, 3, 5000]), nested=st.sampled_from(["", "options", "r"]))
def test_run_file_yaml_surprises(tmp_path, key, snippet, depth, nested):
    value = "[" * depth + snippet + "]" * depth if depth else snippet
    body = {k: json.dumps(v) for k, v in VALID_RUN.items()}
    body[key] = value if not nested else f"{{{nested}: {value}}}"
    (tmp_path / "run.yaml").write_text("".join(f"{k}: {v}\n" for k, v in body.items()))
    outcome(load_run_config, tmp_path / "run.yaml")
    (tmp_path / "run.json").write_text("{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}")
    outcome(load_run_config, tmp_path / "run.json")


@FUZZ
@given(depth=st.integers(1, 200_000), opener=st.sampled_from(["[", '{"a": ', '{"text": [']))
def test_task_file_deep_json(tmp_path, depth, opener):
    (tmp_path / "d.jsonl").write_text(opener * depth + "\n")
    (tmp_path / "e.json").write_text("[" + opener * depth)
    outcome(load_task_file, "x", tmp_path / "d.jsonl")
    outcome(load_task_file, "x", tmp_path / "e.json")


def test_valid_run_files_load(tmp_path):
    """The seeds the mutations start from are valid: the fuzzing is not of files that never load."""
    (tmp_path / "run.json").write_text(json.dumps(VALID_RUN))
    (tmp_path / "run.yaml").write_text(VALID_YAML)
    assert load_run_config(tmp_path / "run.json") == load_run_config(tmp_path / "run.yaml")


# ---- task files --------------------------------------------------------------------------------------

def rows(n=12):
    return [{"text": f"example {i} {'red' if i % 2 else 'blue'}", "label": "ab"[i % 2]} for i in range(n)]


def as_bytes(kind: str, records: list[dict]) -> bytes:
    if kind == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(records)
        return buf.getvalue().encode()
    if kind == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records).encode()
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf)
    return buf.getvalue()


KINDS = ["csv", "jsonl", "parquet"]


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.binary(max_size=400))
def test_task_file_random_bytes(tmp_path, kind, data):
    (tmp_path / f"d.{kind}").write_bytes(data)
    outcome(load_task_file, "x", tmp_path / f"d.{kind}")


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(how=mutations)
def test_task_file_mutated_bytes(tmp_path, kind, how):
    data = as_bytes(kind, rows())
    for h in how:
        data = mutate(data, h)
    (tmp_path / f"d.{kind}").write_bytes(data)
    outcome(load_task_file, "x", tmp_path / f"d.{kind}")


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 11), st.sampled_from(["text", "label", "extra"]), json_values),
                        min_size=1, max_size=3))
def test_task_file_mutated_values(tmp_path, kind, changes):
    records = rows()
    for i, col, value in changes:
        records[i] = dict(records[i], **{col: value})
    try:
        data = as_bytes(kind, records)
    except Exception:  # noqa: BLE001 - pyarrow cannot write a table of these values: nothing to read
        return
    (tmp_path / f"d.{kind}").write_bytes(data)
    outcome(load_task_file, "x", tmp_path / f"d.{kind}")


@FUZZ
@given(texts=st.lists(st.text(min_size=1, max_size=30), min_size=3, max_size=12),
       labels=st.lists(st.text(max_size=6) | st.integers(-5, 10**9), min_size=3, max_size=12))
def test_task_file_random_csv_cells(tmp_path, texts, labels):
    records = [{"text": t, "label": y} for t, y in zip(texts, labels)]
    (tmp_path / "d.csv").write_bytes(as_bytes("csv", records))
    outcome(load_task_file, "x", tmp_path / "d.csv")


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_of_a_valid_task_file(tmp_path, kind):
    data = as_bytes(kind, rows(6))
    assert load_task_file("x", _write(tmp_path / f"d.{kind}", data)).num_labels == 2
    results = {outcome(load_task_file, "x", _write(tmp_path / f"d.{kind}", data[:n])) for n in range(len(data))}
    assert "error" in results


def _write(path, data):
    path.write_bytes(data)
    return path
