"""Fuzzing every reader of bank, router and peft files with hypothesis: random bytes, mutated valid files (byte
flips, JSON values replaced or removed) and truncation (every length of the JSON files; for the weights files
every length of their header and a sample beyond). The only outcomes allowed: success or MtpeftError, within a
time limit per case, with no large allocation; a failed bank load leaves the backbone as it was.

``FUZZ_REPORT=path.json`` writes the number of cases and outcomes per target (docs/robustness-banks.md);
``FUZZ_SCALE=N`` runs N times the examples, ``FUZZ_RANDOM=1`` draws fresh ones (the default is a fixed seed).
"""
from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.bank.layers import BankedLinear
from mtpeft.errors import MtpeftError
from mtpeft.interop import export_peft, import_peft
from mtpeft.routers import FixedRouter, Router

OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))  # FUZZ_SCALE=20 FUZZ_RANDOM=1: a longer, fresh exploration
SETTINGS = settings(max_examples=60 * SCALE, deadline=None, derandomize=not os.environ.get("FUZZ_RANDOM"),
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CASE_SECONDS = 20  # a case that takes longer hangs
MAX_GROWTH_MB = 400  # peak memory may not grow more than this over the whole file


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang("a reader took longer than the case time limit")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    bb = load_backbone("tiny-bert", seed=0)
    bank = ModuleBank(bb)
    bank.add("m0", "lora", {"r": 2})
    bank.add("m1", "lora", {"r": 2}, seed=1)
    bank.add("m2", "ia3")
    bank.set_artifact("m0", "gate", torch.ones(4))
    bank.set_group_artifact(bank.group_of("m0").key, "shared", torch.zeros(2, 2))
    bank.save(root / "bank")
    export_peft(bank, "m0", root / "adapter")
    FixedRouter({"m0": 0.5, "m1": 0.5}).save(root / "router")
    bank.release()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield {"root": root, "backbone": bb}
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    assert grown < MAX_GROWTH_MB, f"peak memory grew by {grown:.0f} MB while fuzzing"
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps({k: dict(v) for k, v in OUTCOMES.items()}, indent=2))


def _run(target: str, fn) -> None:
    """Run one case: success or MtpeftError, recorded; anything else fails the test."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        fn()
        OUTCOMES[target]["success"] += 1
    except MtpeftError:
        OUTCOMES[target]["MtpeftError"] += 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- the readers -----------------------------------------------------------------------------------

def _copy(world, what: str) -> Path:
    d = Path(tempfile.mkdtemp(dir=world["root"])) / what
    shutil.copytree(world["root"] / what, d)
    return d


def _load_bank(world, d: Path) -> None:
    bb = world["backbone"]
    try:
        bank = ModuleBank.load(d, bb)
    except MtpeftError:
        assert not any(isinstance(m, BankedLinear) for m in bb.model.modules()), "a failed load left the backbone wrapped"
        raise
    bank.release()


def _import_adapter(world, d: Path) -> None:
    bank = ModuleBank(world["backbone"])
    try:
        import_peft(bank, d, name="imported")
    finally:
        bank.release()


def _rehash(d: Path, rel: str) -> None:
    """Point the manifest's checksum at the mutated file, so the fuzzed bytes reach the parser."""
    import hashlib

    m = json.loads((d / "manifest.json").read_text())
    sha = hashlib.sha256((d / rel).read_bytes()).hexdigest()
    for e in m["modules"]:
        for ref in (e, e.get("artifacts") or {}):
            if ref.get("file") == rel:
                ref["sha256"] = sha
    for g in m.get("groups") or []:
        if g["file"] == rel:
            g["sha256"] = sha
    (d / "manifest.json").write_text(json.dumps(m))


def _module_file(world) -> str:
    return json.loads((world["root"] / "bank" / "manifest.json").read_text())["modules"][0]["file"]


# ---- mutations -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2000000, 10**9])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
    | st.sampled_from(["", "..", "../x.safetensors", "/etc/passwd", "modules/../manifest.json", "a\0b", "lora",
                       "modules/x.safetensors", "0" * 64]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@st.composite
def json_mutation(draw, doc):
    """``doc`` with one value somewhere replaced by a random JSON value, or one key removed."""
    doc = json.loads(json.dumps(doc))
    holder, key = None, None
    node = doc
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)) > 0:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        holder, key = node, draw(st.sampled_from(keys))
        node = node[key]
    if holder is None:
        return draw(json_values)
    if isinstance(holder, dict) and draw(st.booleans()):
        del holder[key]
    else:
        holder[key] = draw(json_values)
    return doc


ENTRY_KEYS = ["name", "type", "config", "file", "sha256", "task", "metrics", "metadata", "merged", "finalized",
              "artifacts"]


@st.composite
def entry_mutation(draw, doc):
    """A manifest with one field of one module entry (or of its config) replaced by a random value, or removed:
    the values a reader trusts most."""
    doc = json.loads(json.dumps(doc))
    e = draw(st.sampled_from(doc["modules"]))
    holder = e["config"] if draw(st.integers(0, 3)) == 0 else e
    keys = sorted(set(holder) | ({"r", "alpha", "target_modules"} if holder is not e else set(ENTRY_KEYS)))
    key = draw(st.sampled_from(keys))
    if draw(st.integers(0, 4)) == 0:
        holder.pop(key, None)
    else:
        holder[key] = draw(json_values)
    return doc


def _flip(data: bytes, flips) -> bytes:
    b = bytearray(data)
    for i, v in flips:
        b[i % len(b)] = v
    return bytes(b)


flips = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


def _dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


# ---- manifest.json ---------------------------------------------------------------------------------

@SETTINGS
@given(data=st.binary(max_size=2048))
def test_manifest_random_bytes(world, data):
    d = _copy(world, "bank")
    (d / "manifest.json").write_bytes(data)
    _run("manifest.json", lambda: _load_bank(world, d))


@SETTINGS
@given(data=st.data())
def test_manifest_json_mutations(world, data):
    d = _copy(world, "bank")
    doc = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_bytes(_dumps(data.draw(json_mutation(doc))))
    _run("manifest.json", lambda: _load_bank(world, d))


@settings(SETTINGS, max_examples=150 * SCALE)
@given(data=st.data())
def test_manifest_entry_mutations(world, data):
    d = _copy(world, "bank")
    doc = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_bytes(_dumps(data.draw(entry_mutation(doc))))
    _run("manifest.json", lambda: _load_bank(world, d))


@SETTINGS
@given(fl=flips)
def test_manifest_byte_flips(world, fl):
    d = _copy(world, "bank")
    (d / "manifest.json").write_bytes(_flip((d / "manifest.json").read_bytes(), fl))
    _run("manifest.json", lambda: _load_bank(world, d))


def test_manifest_truncated_at_every_length(world):
    d = _copy(world, "bank")
    full = (d / "manifest.json").read_bytes()
    for n in range(len(full)):
        (d / "manifest.json").write_bytes(full[:n])
        _run("manifest.json", lambda: _load_bank(world, d))
    assert OUTCOMES["manifest.json"]["MtpeftError"] >= len(full)


# ---- a module's weights ----------------------------------------------------------------------------

@SETTINGS
@given(data=st.binary(max_size=2048))
def test_weights_random_bytes(world, data):
    d = _copy(world, "bank")
    rel = _module_file(world)
    (d / rel).write_bytes(data)
    _rehash(d, rel)
    _run("module .safetensors", lambda: _load_bank(world, d))


@SETTINGS
@given(fl=flips, header=st.booleans())
def test_weights_byte_flips(world, fl, header):
    d = _copy(world, "bank")
    rel = _module_file(world)
    data = (d / rel).read_bytes()
    n = 8 + int.from_bytes(data[:8], "little")
    fl = [(i % n, v) for i, v in fl] if header else fl  # half the cases hit the header (shapes, dtypes, offsets)
    (d / rel).write_bytes(_flip(data, fl))
    _rehash(d, rel)
    _run("module .safetensors", lambda: _load_bank(world, d))


@SETTINGS
@given(data=st.data())
def test_weights_header_json_mutations(world, data):
    d = _copy(world, "bank")
    rel = _module_file(world)
    raw = (d / rel).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    new = _dumps(data.draw(json_mutation(header)))
    (d / rel).write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    _rehash(d, rel)
    _run("module .safetensors", lambda: _load_bank(world, d))


def test_weights_truncated(world):
    d = _copy(world, "bank")
    rel = _module_file(world)
    full = (d / rel).read_bytes()
    n = 8 + int.from_bytes(full[:8], "little")
    lengths = sorted(set(range(n + 1)) | set(range(n, len(full), 7)))
    for k in lengths:
        (d / rel).write_bytes(full[:k])
        _rehash(d, rel)
        _run("module .safetensors", lambda: _load_bank(world, d))


# ---- router.json + router.safetensors --------------------------------------------------------------

@SETTINGS
@given(data=st.data(), which=st.sampled_from(["router.json", "router.safetensors"]), how=st.integers(0, 2))
def test_router_files(world, data, which, how):
    d = _copy(world, "router")
    raw = (d / which).read_bytes()
    if how == 0:
        new = data.draw(st.binary(max_size=1024))
    elif how == 1:
        new = _flip(raw, data.draw(flips))
    elif which == "router.json":
        new = _dumps(data.draw(json_mutation(json.loads(raw))))
    else:
        n = int.from_bytes(raw[:8], "little")
        h = _dumps(data.draw(json_mutation(json.loads(raw[8:8 + n]))))
        new = len(h).to_bytes(8, "little") + h + raw[8 + n:]
    (d / which).write_bytes(new)
    _run("router", lambda: Router.load(d))


def test_router_truncated_at_every_length(world):
    for which in ("router.json", "router.safetensors"):
        d = _copy(world, "router")
        full = (d / which).read_bytes()
        for k in range(len(full)):
            (d / which).write_bytes(full[:k])
            _run("router", lambda d=d: Router.load(d))


# ---- a peft adapter directory ----------------------------------------------------------------------

@SETTINGS
@given(data=st.data(), which=st.sampled_from(["adapter_config.json", "adapter_model.safetensors"]),
       how=st.integers(0, 2))
def test_peft_adapter_files(world, data, which, how):
    d = _copy(world, "adapter")
    raw = (d / which).read_bytes()
    if how == 0:
        new = data.draw(st.binary(max_size=1024))
    elif how == 1:
        new = _flip(raw, data.draw(flips))
    elif which == "adapter_config.json":
        new = _dumps(data.draw(json_mutation(json.loads(raw))))
    else:
        n = int.from_bytes(raw[:8], "little")
        h = _dumps(data.draw(json_mutation(json.loads(raw[8:8 + n]))))
        new = len(h).to_bytes(8, "little") + h + raw[8 + n:]
    (d / which).write_bytes(new)
    _run("peft adapter", lambda: _import_adapter(world, d))


def test_peft_adapter_truncated(world):
    for which in ("adapter_config.json", "adapter_model.safetensors"):
        d = _copy(world, "adapter")
        full = (d / which).read_bytes()
        step = 1 if which.endswith(".json") else 5
        for k in range(0, len(full), step):
            (d / which).write_bytes(full[:k])
            _run("peft adapter", lambda d=d: _import_adapter(world, d))


def test_the_valid_files_load(world):
    """The unmutated files are accepted (else every case above would be a trivial error)."""
    for target, fn in (("manifest.json", lambda: _load_bank(world, _copy(world, "bank"))),
                       ("router", lambda: Router.load(_copy(world, "router"))),
                       ("peft adapter", lambda: _import_adapter(world, _copy(world, "adapter")))):
        fn()
        OUTCOMES[target]["success"] += 1
