"""Banks on disk, crash-safe.

A bank directory holds::

    manifest.json                               the one commit point (see below)
    modules/<name>.<sha16>.safetensors          one module's weights
    artifacts/<owner>.<sha16>.safetensors       one module's or one group's artifacts

``<sha16>`` is the first 16 hex digits of the file's sha256: a file is named by its content and never
rewritten in place. ``manifest.json`` holds the schema version, the backbone fingerprint, one entry per
module (type, config, task, metrics, metadata, merged, finalized, ``file`` and ``sha256`` of its
weights, and ``artifacts: {file, sha256}`` when it has artifacts) and ``groups: [{key, file, sha256}]``
for the artifacts of groups (``key`` as ``bank.group_of(name).key`` gives it; the file name has ``-``
for ``:``).

Saving writes every new file first (temporary file, fsync, rename, fsync of the directory; a file
whose content is already there is not written again), then replaces ``manifest.json`` the same way:
that rename is the commit. Only then are the files no entry of the new manifest references deleted
(old weights and artifacts, temporary files a crash left behind). A crash at any instant leaves the
old bank or the new one, both loadable; loading ignores files the manifest does not name.

Loading is strict: schema, fingerprint, every ``file`` inside ``modules/`` or ``artifacts/`` of the
bank (no ``..``, no absolute path, no symlink out), every file present and matching its sha256, configs
and group keys valid, all checked before the backbone is touched; the shapes are checked as the modules
are added (``ModuleBank.add_from``). Banks written by the previous layout (``modules/<name>.safetensors``,
no artifacts) load as they are. Never pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..io import MtpeftError, read_json, read_tensors, write_bytes, write_json
from ..modules.base import MODULE_TYPES
from .artifacts import check_key
from .sites import group_key as _group_key

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS, ARTIFACTS = "modules", "artifacts"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def group_key(module_type: str, config: dict) -> str:
    """The key ``ModuleBank.add`` gives the group of modules of this type and config (a config as a dict)."""
    return _group_key(module_type, MODULE_TYPES.get(module_type).config_cls.from_dict(dict(config)))


def _stem(owner: str) -> str:
    """A file-name-safe form of a module name or group key (``lora:ab12`` -> ``lora-ab12``)."""
    s = re.sub(r"[^A-Za-z0-9_.\-]", "-", owner).lstrip(".")
    return s or "_"


def _serialise(tensors: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # One metadata key: safetensors writes the keys of its metadata in no fixed order, and the file
    # name is the hash of the bytes, so the same content must give the same bytes.
    return save(clean, metadata={"mtpeft": json.dumps(meta, sort_keys=True)})


def _put(path: Path, folder: str, owner: str, data: bytes) -> dict:
    """Store ``data`` under its content name in ``folder`` (written only when not already there)."""
    sha = hashlib.sha256(data).hexdigest()
    rel = f"{folder}/{_stem(owner)}.{sha[:16]}.safetensors"
    f = path / rel
    if f.is_symlink() or not f.is_file() or _sha256(f) != sha:
        write_bytes(f, data)
    return {"file": rel, "sha256": sha}


def _reusable(path: Path, prev: dict | None, entry: dict) -> bool:
    """Whether the old manifest's weights file of the module of ``entry`` (its new manifest entry) is still
    there, intact and of the same type, config and layout."""
    if prev is None or not prev.get("sha256"):
        return False
    if (prev["type"], prev["config"], bool(prev.get("finalized"))) != \
            (entry["type"], entry["config"], bool(entry.get("finalized"))):
        return False
    f = path / prev["file"]
    return f.is_file() and _sha256(f) == prev["sha256"]


def _check_folders(path: Path) -> None:
    for folder in (WEIGHTS, ARTIFACTS):
        d = path / folder
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise MtpeftError(f"bank {path}: {folder}/ is a symlink or not a directory; a bank keeps its files "
                              f"in a real {folder}/ folder inside it: move it out of the way or save elsewhere")


def save_bank(bank, path: str | Path, only: list[str] | None = None) -> None:
    """Write the bank to ``path``: new content-named files, then the manifest (the commit), then cleanup.

    ``only``: just these modules changed; another module keeps the weights file the current manifest names
    when it is still there, intact and of the same type and config (else it is written from memory).
    Artifacts are always written from memory (unchanged ones are the same file: nothing is written).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _check_folders(path)
    (path / WEIGHTS).mkdir(exist_ok=True)
    old = {}
    if only is not None and (path / MANIFEST).is_file():
        try:
            old = {e["name"]: e for e in read_manifest(path)["modules"]}
        except MtpeftError:
            old = {}  # an unreadable old manifest: write everything from memory
    entries = []
    for rec in bank.records:
        e = json.loads(json.dumps(rec.__dict__))  # a plain copy, JSON-clean
        prev = old.get(rec.name)
        if only is not None and rec.name not in only and _reusable(path, prev, e):
            e.update(file=prev["file"], sha256=prev["sha256"])
        else:
            data = _serialise(bank.module_parameters(rec.name), {"module": rec.name, "type": rec.type})
            e.update(_put(path, WEIGHTS, rec.name, data))
        arts = bank.artifacts(rec.name)
        if arts:
            e["artifacts"] = _put(path, ARTIFACTS, rec.name,
                                  _serialise(arts, {"scope": "module", "owner": rec.name}))
        entries.append(e)
    groups = []
    for key in bank.groups:
        arts = bank.group_artifacts(key)
        if arts:
            groups.append({"key": key, **_put(path, ARTIFACTS, key, _serialise(arts, {"scope": "group", "owner": key}))})
    manifest = {"format": "mtpeft-bank", "schema_version": SCHEMA_VERSION,
                "backbone": bank.backbone.fingerprint(), "modules": entries, "groups": groups}
    write_json(path / MANIFEST, manifest)  # the commit point
    _clean(path, manifest)


def _referenced(manifest: dict) -> set[str]:
    keep = set()
    for e in manifest["modules"]:
        keep.add(e["file"])
        if e.get("artifacts"):
            keep.add(e["artifacts"]["file"])
    keep.update(g["file"] for g in manifest.get("groups") or [])
    return keep


def _clean(path: Path, manifest: dict) -> None:
    """Delete what the (committed) manifest does not reference in ``modules/`` and ``artifacts/``, and
    temporary files of the manifest. Best effort: a file left behind is ignored by load, the next save
    retries."""
    keep = _referenced(manifest)
    doomed = [f for f in path.glob(f".{MANIFEST}.*.tmp")]
    for folder in (WEIGHTS, ARTIFACTS):
        d = path / folder
        if d.is_symlink() or not d.is_dir():
            continue
        doomed += [f for f in d.iterdir() if f"{folder}/{f.name}" not in keep and (f.is_symlink() or not f.is_dir())]
    for f in doomed:
        try:
            os.unlink(f)
        except OSError:
            pass


def _read_checked(path: Path, ref: dict, what: str, fix_missing: str, fix_bad: str) -> dict:
    f = path / ref["file"]
    if not f.is_file():
        raise MtpeftError(f"bank {path}: {what} are missing ({f}); {fix_missing}")
    if ref.get("sha256") and _sha256(f) != ref["sha256"]:
        raise MtpeftError(f"bank {path}: {what} are corrupted (checksum mismatch in {f}); {fix_bad}")
    return read_tensors(f, what=what)


def _read_artifacts(path: Path, ref: dict, what: str) -> dict:
    tensors = _read_checked(path, ref, what, "restore the file, or drop the entry from manifest.json",
                            "restore the file or re-create the artifacts")
    for k in tensors:
        try:
            check_key(k)
        except MtpeftError as err:
            raise MtpeftError(f"bank {path}: {what} in {ref['file']}: {err}") from None
    return tensors


def load_bank(cls, path: str | Path, backbone, trainable: bool = False):
    """``cls(backbone)`` with the modules and artifacts saved at ``path``; a bad bank raises before the
    backbone is touched (but for weights of the wrong shapes, found as each module is added)."""
    path = Path(path)
    manifest = read_manifest(path)
    fp = manifest["backbone"]
    if not backbone.fingerprint_matches(fp):
        raise MtpeftError(f"bank {path} was built on another backbone: "
                          f"{backbone.describe_mismatch(fp, backbone.fingerprint())}; load it with the "
                          f"backbone it was trained on ({fp.get('name')!r})")
    # Check and read every file before touching the backbone, so a bad bank loses nothing.
    loaded, keys = [], set()
    for e in manifest["modules"]:
        what = f"weights of module {e['name']!r}"
        tensors = _read_checked(path, e, what, "restore the file or remove the module from manifest.json",
                                "restore the file or retrain the module")
        arts = _read_artifacts(path, e["artifacts"], f"artifacts of module {e['name']!r}") if e.get("artifacts") else {}
        try:
            keys.add(group_key(e["type"], e["config"]))
        except (MtpeftError, TypeError, ValueError) as err:
            raise MtpeftError(f"bank {path}: module {e['name']!r} has a config its type {e['type']!r} does not "
                              f"take ({err}); fix its config in manifest.json or re-create the bank") from None
        loaded.append((e, tensors, arts))
    group_arts = []
    for g in manifest.get("groups") or []:
        if g["key"] not in keys:
            raise MtpeftError(f"bank {path}: saved artifacts of group {g['key']!r} match no group of its modules "
                              f"(groups: {', '.join(sorted(keys)) or 'none'}); a module's type or config changed "
                              "since they were saved: drop the entry from 'groups' in manifest.json or re-create "
                              "the bank")
        group_arts.append((g["key"], _read_artifacts(path, g, f"artifacts of group {g['key']!r}")))
    bank = cls(backbone)
    try:
        for e, tensors, _ in loaded:
            bank.add_from(e["name"], e["type"], e["config"], tensors, task=e.get("task"), metadata=e.get("metadata"),
                          trainable=trainable, finalized=bool(e.get("finalized")),
                          what=f"bank {path}: weights of module {e['name']!r}")
            bank.records[-1].metrics = dict(e.get("metrics") or {})
            if e.get("merged"):
                bank.merge(e["name"])
        for e, _, arts in loaded:
            for k, v in arts.items():
                bank.set_artifact(e["name"], k, v)
        for key, arts in group_arts:
            if key not in bank.groups:  # group_key() drifted from ModuleBank.add: a bug, not a bad bank
                raise MtpeftError(f"bank {path}: saved artifacts of group {key!r} match no group of the loaded bank "
                                  f"({', '.join(bank.groups)}); report this as an mtpeft bug")
            for k, v in arts.items():
                bank.set_group_artifact(key, k, v)
    except BaseException:
        bank.release()  # the backbone is left as it was: another bank can take it
        raise
    return bank


def _check_file(path: Path, rel, folder: str, what: str) -> None:
    """``rel`` must name a file directly inside ``folder/`` of the bank, and stay inside once resolved."""
    bad = (not isinstance(rel, str) or "\\" in rel or "\0" in rel or rel.startswith("/")
           or len(rel.split("/")) != 2 or rel.split("/")[0] != folder or rel.split("/")[1] in ("", ".", ".."))
    if not bad:
        root = (path / folder).resolve()
        try:
            (path / rel).resolve().relative_to(root)
            bad = not root.is_relative_to(path.resolve())
        except ValueError:
            bad = True
    if bad:
        raise MtpeftError(f"bank {path}: {what} names file {rel!r}, which is not a file inside the bank's "
                          f"{folder}/ folder (absolute paths, '..' and symlinks out of the bank are refused); "
                          f"fix the entry in {MANIFEST} to '{folder}/<file name>' with the file in {path / folder}, "
                          "or re-create the bank")


def _check_ref(path: Path, ref, folder: str, what: str) -> None:
    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
        raise MtpeftError(f"{path / MANIFEST}: {what} must be {{'file': ..., 'sha256': ...}}, got {ref!r}; "
                          "fix the entry or re-create the bank")
    _check_file(path, ref["file"], folder, what)


def read_manifest(path: str | Path) -> dict:
    """The bank's manifest, checked: format, schema, entries, and that every file it names is inside the bank."""
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
    names = set()
    for e in m["modules"]:
        if not isinstance(e, dict):
            raise MtpeftError(f"{path / MANIFEST}: a module entry is not an object; re-create the bank")
        missing = {"name", "type", "config", "file"} - set(e)
        if missing:
            raise MtpeftError(f"{path / MANIFEST}: a module entry lacks {sorted(missing)}")
        if not isinstance(e["name"], str) or not e["name"] or e["name"] in names:
            raise MtpeftError(f"{path / MANIFEST}: module name {e['name']!r} is empty, not a string or listed twice; "
                              "fix the manifest or re-create the bank")
        names.add(e["name"])
        if e["type"] not in MODULE_TYPES:
            raise MtpeftError(f"bank {path}: module {e['name']!r} has unknown type {e['type']!r}; "
                              f"known types: {', '.join(MODULE_TYPES.names())}")
        if not isinstance(e["config"], dict):
            raise MtpeftError(f"{path / MANIFEST}: the config of module {e['name']!r} is not an object")
        _check_file(path, e["file"], WEIGHTS, f"module {e['name']!r}")
        if e.get("artifacts") is not None:
            _check_ref(path, e["artifacts"], ARTIFACTS, f"the artifacts of module {e['name']!r}")
    groups = m.get("groups")
    if groups is not None:
        if not isinstance(groups, list):
            raise MtpeftError(f"{path / MANIFEST}: 'groups' must be a list; fix it or re-create the bank")
        seen = set()
        for g in groups:
            key = g.get("key") if isinstance(g, dict) else None
            if not isinstance(key, str) or key in seen:
                raise MtpeftError(f"{path / MANIFEST}: a 'groups' entry has no key, or a key listed twice ({key!r})")
            seen.add(key)
            _check_ref(path, g, ARTIFACTS, f"the artifacts of group {key!r}")
    return m


def remove_saved_module(path: str | Path, name: str) -> None:
    """Drop module ``name`` (with its artifacts, and its group's when no module of the group is left) from
    the bank saved at ``path`` without loading the backbone: the manifest is rewritten atomically first,
    then the files no entry references any more go."""
    path = Path(path)
    m = read_manifest(path)
    entry = next((e for e in m["modules"] if e["name"] == name), None)
    if entry is None:
        raise MtpeftError(f"no module {name!r} in {path}; it has: {', '.join(e['name'] for e in m['modules']) or 'none'}")
    m["modules"] = [e for e in m["modules"] if e["name"] != name]
    if m.get("groups"):
        left = set()
        for e in m["modules"]:
            try:
                left.add(group_key(e["type"], e["config"]))
            except (MtpeftError, TypeError, ValueError):
                pass
        try:
            gone = group_key(entry["type"], entry["config"])
        except (MtpeftError, TypeError, ValueError):
            gone = None
        m["groups"] = [g for g in m["groups"] if g["key"] != gone or gone in left]
    write_json(path / MANIFEST, m)  # the commit point
    _clean(path, m)
