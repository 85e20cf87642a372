"""Banks on disk: a directory with ``manifest.json`` (schema version, backbone fingerprint, one entry per
module: type, config, task, metrics, metadata, weights file, sha256) and ``modules/<name>.safetensors``.

Every write is atomic (temporary file, then rename); reading checks the schema, the fingerprint, that
every weights file exists and matches its checksum and its module's config, before anything changes.
Never pickle.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..io import MtpeftError, read_json, read_tensors, write_json, write_tensors
from ..modules.base import MODULE_TYPES

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bank(bank, path: str | Path, only: list[str] | None = None) -> None:
    """Write ``manifest.json`` plus one safetensors file per module, each atomically."""
    path = Path(path)
    (path / "modules").mkdir(parents=True, exist_ok=True)
    entries = []
    for rec in bank.records:
        rel = f"modules/{rec.name}.safetensors"
        f = path / rel
        if only is None or rec.name in only or not f.exists():
            write_tensors(f, {k: v.detach() for k, v in bank.module_parameters(rec.name).items()},
                          metadata={"module": rec.name, "type": rec.type})
        entries.append(dict(rec.__dict__, file=rel, sha256=_sha256(f)))
    keep = {Path(e["file"]).name for e in entries}
    manifest = {"format": "mtpeft-bank", "schema_version": SCHEMA_VERSION,
                "backbone": bank.backbone.fingerprint(), "modules": entries}
    write_json(path / MANIFEST, manifest)
    for stale in (path / "modules").glob("*.safetensors"):
        if stale.name not in keep:
            stale.unlink()


def load_bank(cls, path: str | Path, backbone, trainable: bool = False):
    """``cls(backbone)`` with the modules saved at ``path``; a bad bank raises before the backbone is touched."""
    path = Path(path)
    manifest = read_manifest(path)
    fp = manifest["backbone"]
    if not backbone.fingerprint_matches(fp):
        raise MtpeftError(f"bank {path} was built on another backbone: "
                          f"{backbone.describe_mismatch(fp, backbone.fingerprint())}; load it with the "
                          f"backbone it was trained on ({fp.get('name')!r})")
    # Check and read every weights file before touching the backbone, so a bad bank loses nothing.
    loaded = []
    for e in manifest["modules"]:
        f = path / e["file"]
        if not f.is_file():
            raise MtpeftError(f"bank {path}: weights of module {e['name']!r} are missing ({f}); "
                              "restore the file or remove the module from manifest.json")
        if e.get("sha256") and _sha256(f) != e["sha256"]:
            raise MtpeftError(f"bank {path}: weights of module {e['name']!r} are corrupted "
                              f"(checksum mismatch in {f}); restore the file or retrain the module")
        loaded.append((e, read_tensors(f, what=f"weights of module {e['name']!r}")))
    bank = cls(backbone)
    for e, tensors in loaded:
        bank.add_from(e["name"], e["type"], e["config"], tensors, task=e.get("task"), metadata=e.get("metadata"),
                      trainable=trainable, finalized=bool(e.get("finalized")),
                      what=f"bank {path}: weights of module {e['name']!r}")
        bank.records[-1].metrics = dict(e.get("metrics") or {})
        if e.get("merged"):
            bank.merge(e["name"])
    return bank


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise MtpeftError(f"bank directory not found: {path}; give the directory a bank was saved to "
                          "(e.g. by `mtpeft train --out DIR`)")
    if not (path / MANIFEST).is_file():
        raise MtpeftError(f"{path} is not an mtpeft bank: its {MANIFEST} was not found; give the directory a bank "
                          "was saved to (e.g. by `mtpeft train --out DIR`)")
    m = read_json(path / MANIFEST, what="bank manifest")
    if not isinstance(m, dict) or m.get("format") != "mtpeft-bank":
        raise MtpeftError(f"{path / MANIFEST} is not an mtpeft bank manifest")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise MtpeftError(f"bank {path} has schema version {m.get('schema_version')!r}; this mtpeft reads "
                          f"version {SCHEMA_VERSION}: upgrade mtpeft or re-create the bank")
    if not isinstance(m.get("modules"), list) or not isinstance(m.get("backbone"), dict):
        raise MtpeftError(f"{path / MANIFEST} lacks 'modules' or 'backbone'; re-create the bank")
    for e in m["modules"]:
        missing = {"name", "type", "config", "file"} - set(e)
        if missing:
            raise MtpeftError(f"{path / MANIFEST}: a module entry lacks {sorted(missing)}")
        if e["type"] not in MODULE_TYPES:
            raise MtpeftError(f"bank {path}: module {e['name']!r} has unknown type {e['type']!r}; "
                              f"known types: {', '.join(MODULE_TYPES.names())}")
    return m


def remove_saved_module(path: str | Path, name: str) -> None:
    """Drop module ``name`` from the bank saved at ``path`` without loading the backbone: the manifest is
    rewritten atomically first, then the weights file goes."""
    path = Path(path)
    m = read_manifest(path)
    entry = next((e for e in m["modules"] if e["name"] == name), None)
    if entry is None:
        raise MtpeftError(f"no module {name!r} in {path}; it has: {', '.join(e['name'] for e in m['modules']) or 'none'}")
    m["modules"] = [e for e in m["modules"] if e["name"] != name]
    write_json(path / MANIFEST, m)
    f = path / entry["file"]
    if f.is_file() and f.parent == path / "modules":
        f.unlink()
