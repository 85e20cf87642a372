"""Replay memories on disk, crash-safe, validated, never pickled.

A memory directory holds::

    manifest.json                      the one commit point: format, version, settings, the IVF index's
                                       calibration (nprobe, measured recall), policy and rng states, and
                                       {file, sha256} of each file below
    vectors.<sha16>.safetensors        ``ids`` int64 [n] and ``embeddings`` float32 [n, dim], in row order
    payloads.<sha16>.json              the examples, [text, label id, task, label space] per row
    index.<sha16>.faiss                the IVF index in FAISS's own format (only once it is built):
                                       IndexIVFScalarQuantizer fp16 or IndexIVFFlat, as ``ivf.storage``

Version 2 (this one) added ``ivf.storage`` and the calibration settings and ``ivf_state``; version 1
memories (float32 lists, a fixed ``nprobe``) still load as they were, their recall measured at the next
add, and are saved as version 2.

Files are named by their content and written first (atomically); then ``manifest.json`` is replaced (the
commit); then files it does not name are deleted. A crash leaves the old memory or the new one. One
writer at a time (``mtpeft.lock.DirLock``; its ``.mtpeft.lock`` file stays in the directory).

Loading checks, before building anything: the manifest (format, version, every field's type and range),
each file's name (a plain name in the directory, no symlink) and sha256, the vectors (keys, dtypes,
shapes, finite values, distinct ids below ``next_id``), the payloads (one well-formed example per row),
the policy and rng states, and the FAISS index (its type, dimension, metric, trained, and exactly the
stored ids and vectors, encoded as its storage encodes them). Any problem is an ``MtpeftError`` naming the file and the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import MtpeftError
from ..io import read_json, write_bytes, write_json
from ..lock import DirLock
from .example import Example
from .index import IVFConfig, VectorIndex

FORMAT, VERSION = "mtpeft-memory", 2
MANIFEST = "manifest.json"
_NAME = re.compile(r"^(vectors|payloads|index)\.[0-9a-f]{16}\.(safetensors|json|faiss)$")
_EXT = {"vectors": "safetensors", "payloads": "json", "index": "faiss"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put(path: Path, kind: str, data: bytes) -> dict:
    sha = _sha(data)
    name = f"{kind}.{sha[:16]}.{_EXT[kind]}"
    f = path / name
    if f.is_symlink() or not f.is_file() or _sha(f.read_bytes()) != sha:
        write_bytes(f, data)
    return {"file": name, "sha256": sha}


def _vectors_bytes(mem) -> bytes:
    from safetensors.torch import save

    return save({"ids": mem.index.ids.clone(), "embeddings": mem.index.embeddings.clone()})


def save_memory(mem, path: str | Path) -> None:

    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise MtpeftError(f"cannot save a memory to {path}: it is a file or a symlink; give a directory")
    path.mkdir(parents=True, exist_ok=True)
    with DirLock(path, what="replay memory"):
        _save(mem, path)


def _save(mem, path: Path) -> None:
    import faiss

    # The balanced policies pick a random member of a group by its place in the group's row list, whose
    # order comes from the insertion and eviction history: rebuild it in row order, as loading does, so
    # the saved memory and the loaded one evict the same examples from here on.
    mem._restore(mem._ids, mem._examples)
    files = {"vectors": _put(path, "vectors", _vectors_bytes(mem)),
             "payloads": _put(path, "payloads", json.dumps([e.to_json() for e in mem._examples]).encode())}
    if mem.index.ivf is not None:
        files["index"] = _put(path, "index", faiss.serialize_index(mem.index.ivf).tobytes())
    state = mem.index.state()
    manifest = {
        "format": FORMAT, "version": VERSION, "dim": mem.dim, "capacity": mem.capacity, "size": len(mem),
        "next_id": mem.next_id, "seed": mem.seed, "exact_limit": mem.index.exact_limit,
        "ivf": mem.index.cfg.to_json(), "ivf_built_at": mem.index.built_at,
        "ivf_state": None if state is None else {k: state[k] for k in _STATE},
        "policy": {"name": mem.policy.name, "state": mem.policy.state_dict()},
        "rng": {"policy": _rng_state(mem._policy_rng), "sample": _rng_state(mem._sample_rng)},
        "files": files,
    }
    write_json(path / MANIFEST, manifest)  # the commit point
    keep = {f["file"] for f in files.values()} | {MANIFEST}
    for f in path.iterdir():
        if f.name not in keep and (_NAME.match(f.name) or f.name.startswith(f".{MANIFEST}.")):
            try:
                os.unlink(f)
            except OSError:
                pass


def _rng_state(rng) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _bad(path: Path, what: str, fix: str = "restore it from a backup or re-create the memory") -> MtpeftError:
    return MtpeftError(f"replay memory {path}: {what}; {fix}")


def _int(m: dict, key: str, path: Path, lo: int = 0) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _bad(path, f"{MANIFEST} field {key!r} must be an integer >= {lo}, got {v!r}")
    return v


_STATE = ("nprobe", "recall", "calibrated_at", "writes")
_V1_IVF = {"nlist", "nprobe", "train_per_list", "niter", "seed", "regrow", "max_nlist"}


def _from_v1(m: dict, path: Path) -> dict:
    """A version-1 manifest as version 2: float32 lists, its fixed nprobe, recall not measured yet."""
    ivf = m.get("ivf")
    if not isinstance(ivf, dict) or set(ivf) != _V1_IVF:
        raise _bad(path, f"{MANIFEST} (version 1) field 'ivf' must hold {sorted(_V1_IVF)}, got {str(ivf)[:120]}")
    m["ivf"] = {**IVFConfig().to_json(), **ivf, "storage": "flat"}
    built = "index" in (m.get("files") or {})
    m["ivf_state"] = {"nprobe": ivf["nprobe"], "recall": None, "calibrated_at": 0, "writes": 0} if built else None
    return m


def _check_ivf(m: dict, path: Path) -> None:
    ivf, keys = m.get("ivf"), set(IVFConfig().to_json())
    if not isinstance(ivf, dict) or set(ivf) != keys:
        raise _bad(path, f"{MANIFEST} field 'ivf' must hold {sorted(keys)}, got {str(ivf)[:120]}")
    try:
        IVFConfig(**ivf)
    except MtpeftError as e:
        raise _bad(path, f"{MANIFEST} field 'ivf': {e}") from None
    st, built = m.get("ivf_state"), "index" in (m.get("files") or {})
    if built != (m["ivf_built_at"] > 0) or built != (st is not None):
        raise _bad(path, f"{MANIFEST}: 'ivf_built_at' is {m['ivf_built_at']}, 'ivf_state' is "
                         f"{'set' if st is not None else 'null'} but an index file is {'named' if built else 'not named'}")
    if st is None:
        return
    ok = isinstance(st, dict) and set(st) == set(_STATE) and all(
        isinstance(st[k], int) and not isinstance(st[k], bool) and st[k] >= (k == "nprobe")
        for k in ("nprobe", "calibrated_at", "writes"))
    rec = st.get("recall") if isinstance(st, dict) else None
    if not ok or not (rec is None or (isinstance(rec, (int, float)) and not isinstance(rec, bool) and 0 <= rec <= 1)):
        raise _bad(path, f"{MANIFEST} field 'ivf_state' must hold integers nprobe >= 1, calibrated_at, writes >= 0 "
                         f"and recall in [0, 1] or null, got {str(st)[:120]}")


def read_memory_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise MtpeftError(f"{path} is not a saved replay memory (no {MANIFEST}); give the directory "
                          "ReplayMemory.save wrote")
    m = read_json(path / MANIFEST, what="replay memory manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _bad(path, f"{MANIFEST} is not a replay memory manifest (format {FORMAT!r})")
    if m.get("version") not in (1, VERSION):
        raise _bad(path, f"format version {m.get('version')!r}, this mtpeft reads versions 1 and {VERSION}",
                   "upgrade mtpeft or re-create the memory")
    for key, lo in (("dim", 1), ("capacity", 1), ("size", 0), ("next_id", 0), ("exact_limit", 1), ("seed", 0),
                    ("ivf_built_at", 0)):
        _int(m, key, path, lo)
    if m["size"] > m["capacity"] or m["size"] > m["next_id"]:
        raise _bad(path, f"size {m['size']} exceeds the capacity {m['capacity']} or the ids given ({m['next_id']})")
    if m["version"] == 1:
        m = _from_v1(m, path)
    _check_ivf(m, path)
    pol = m.get("policy")
    if not isinstance(pol, dict) or not isinstance(pol.get("name"), str) or "state" not in pol:
        raise _bad(path, f"{MANIFEST} field 'policy' must be {{'name': ..., 'state': ...}}")
    if not isinstance(m.get("rng"), dict) or set(m["rng"]) != {"policy", "sample"}:
        raise _bad(path, f"{MANIFEST} field 'rng' must hold the 'policy' and 'sample' generator states")
    files = m.get("files")
    if not isinstance(files, dict) or not {"vectors", "payloads"} <= set(files) <= {"vectors", "payloads", "index"}:
        raise _bad(path, f"{MANIFEST} field 'files' must name 'vectors', 'payloads' and optionally 'index'")
    for kind, ref in files.items():
        ok = (isinstance(ref, dict) and set(ref) == {"file", "sha256"} and isinstance(ref["file"], str)
              and _NAME.match(ref["file"]) and ref["file"].split(".")[0] == kind and isinstance(ref["sha256"], str))
        if not ok:
            raise _bad(path, f"{MANIFEST} names {str(ref)[:120]} as its {kind} file: not a plain "
                             f"'{kind}.<hash>.{_EXT[kind]}' name inside the memory's directory")
    return m


def _read(path: Path, ref: dict, kind: str) -> bytes:
    f = path / ref["file"]
    if f.is_symlink() or not f.is_file():
        raise _bad(path, f"its {kind} file {ref['file']} is missing (or a symlink)")
    data = f.read_bytes()
    if _sha(data) != ref["sha256"]:
        raise _bad(path, f"its {kind} file {ref['file']} is corrupted or truncated (checksum mismatch)")
    return data


def _vectors(path: Path, data: bytes, m: dict):
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        t = load(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise _bad(path, f"its vectors file is not valid safetensors ({e})") from None
    n, d = m["size"], m["dim"]
    if set(t) != {"ids", "embeddings"}:
        raise _bad(path, f"its vectors file holds {sorted(t)}, expected ['embeddings', 'ids']")
    ids, emb = t["ids"], t["embeddings"]
    if ids.dtype != torch.int64 or tuple(ids.shape) != (n,):
        raise _bad(path, f"ids are {ids.dtype} {tuple(ids.shape)}, expected int64 ({n},)")
    if emb.dtype != torch.float32 or tuple(emb.shape) != (n, d):
        raise _bad(path, f"embeddings are {emb.dtype} {tuple(emb.shape)}, expected float32 ({n}, {d})")
    if not torch.isfinite(emb).all():
        raise _bad(path, "embeddings contain NaN or infinite values")
    if n and (int(ids.min()) < 0 or int(ids.max()) >= m["next_id"] or len(torch.unique(ids)) != n):
        raise _bad(path, f"ids must be distinct and in [0, next_id={m['next_id']})")
    return ids, emb


def _payloads(path: Path, data: bytes, n: int) -> list[Example]:
    try:
        rows = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"its payloads file is not valid JSON ({e})") from None
    if not isinstance(rows, list) or len(rows) != n:
        raise _bad(path, f"its payloads file must list {n} examples, got "
                         f"{len(rows) if isinstance(rows, list) else type(rows).__name__}")
    return [Example.from_json(r, f"replay memory {path}: payloads") for r in rows]


def _ivf_contents(ivf) -> tuple[np.ndarray, np.ndarray]:
    """Every (id, code) an IVF index holds, list after list: ids [n], codes uint8 [n, code_size]."""
    import faiss

    lists = ivf.invlists
    ids, codes = [np.empty(0, dtype=np.int64)], [np.empty((0, lists.code_size), dtype=np.uint8)]
    for i in range(ivf.nlist):
        n = lists.list_size(i)
        if n:
            ids.append(faiss.rev_swig_ptr(lists.get_ids(i), n).copy())
            codes.append(faiss.rev_swig_ptr(lists.get_codes(i), n * lists.code_size).copy().reshape(n, -1))
    return np.concatenate(ids), np.concatenate(codes)


def _right_kind(index, storage: str) -> tuple[bool, str]:
    """Whether ``index`` is the kind ``storage`` builds, and that kind's name."""
    import faiss

    if storage == "flat":
        return type(index) is faiss.IndexIVFFlat, "IndexIVFFlat"
    return (type(index) is faiss.IndexIVFScalarQuantizer and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16
            and not index.by_residual), "IndexIVFScalarQuantizer (fp16, not by residual)"


def _codes(index, emb: np.ndarray, storage: str) -> np.ndarray:
    """What the index stores for ``emb``: its float32 bytes, or its float16 encoding by the index's own SQ."""
    return emb.view(np.uint8).reshape(len(emb), -1) if storage == "flat" else index.sq.compute_codes(emb)


def _index(path: Path, data: bytes, m: dict, ids: torch.Tensor, emb: torch.Tensor):
    import faiss

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
        ivf = faiss.try_extract_index_ivf(index)
    except (RuntimeError, MemoryError, ValueError, TypeError) as e:
        raise _bad(path, f"its FAISS index file cannot be read ({str(e).splitlines()[0][:200]})") from None
    storage = m["ivf"]["storage"]
    right, name = _right_kind(index, storage)
    if (not right or index.d != m["dim"] or not index.is_trained
            or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal != m["size"]):
        raise _bad(path, f"its FAISS index is a {type(index).__name__} over {index.ntotal} vectors of dim {index.d}, "
                         f"expected a trained inner-product {name} over {m['size']} of dim {m['dim']}")
    got_ids, got_codes = _ivf_contents(ivf)
    order, want = np.argsort(got_ids), np.argsort(ids.numpy())
    if not np.array_equal(got_ids[order], ids.numpy()[want]):
        raise _bad(path, "its FAISS index holds other ids than its vectors file")
    if not np.array_equal(got_codes[order], _codes(index, np.ascontiguousarray(emb.numpy()[want]), storage)):
        raise _bad(path, "its FAISS index holds other vectors than its vectors file")
    index.nprobe = min(m["ivf_state"]["nprobe"], index.nlist)  # what searching with more lists does
    return index


def load_memory(cls, path: str | Path):
    from .policies import make_policy

    path = Path(path)
    m = read_memory_manifest(path)
    ids, emb = _vectors(path, _read(path, m["files"]["vectors"], "vectors"), m)
    try:
        VectorIndex(m["dim"], m["exact_limit"], IVFConfig(**m["ivf"])).check(emb, "its embeddings")
    except MtpeftError as e:
        raise _bad(path, str(e)) from None
    examples = _payloads(path, _read(path, m["files"]["payloads"], "payloads"), m["size"])
    index = _index(path, _read(path, m["files"]["index"], "index"), m, ids, emb) if "index" in m["files"] else None
    try:
        policy = make_policy(m["policy"]["name"])
        policy.load_state_dict(m["policy"]["state"])
    except MtpeftError as e:
        raise _bad(path, str(e)) from None
    mem = cls(m["dim"], m["capacity"], policy, seed=m["seed"], exact_limit=m["exact_limit"],
              ivf=IVFConfig(**m["ivf"]))
    for name, rng in (("policy", mem._policy_rng), ("sample", mem._sample_rng)):
        _set_rng(path, rng, m["rng"][name], name)
    mem.next_id = m["next_id"]
    mem.index._reserve(len(ids))
    mem.index._emb[: len(ids)], mem.index._ids[: len(ids)], mem.index.n = emb, ids, len(ids)
    mem.index.ivf, mem.index.built_at = index, m["ivf_built_at"]
    if index is not None:
        st = m["ivf_state"]
        mem.index.recall, mem.index.calibrated_at, mem.index.writes = st["recall"], st["calibrated_at"], st["writes"]
    mem._restore(ids.tolist(), examples)
    return mem


def _set_rng(path: Path, rng, state, name: str) -> None:
    try:
        version, internal, gauss = state
        if not (isinstance(internal, list) and len(internal) == 625 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 32 for x in internal)):
            raise ValueError("625 integers in [0, 2**32) expected")
        rng.setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError) as e:
        raise _bad(path, f"its {name} random state is invalid ({e})") from None
