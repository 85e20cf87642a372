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
for ``:``). A group's file also holds the parameters its stacks keep for the whole group
(``stack.group_parameters()``, e.g. MPT's shared prompt), under ``param:<name>``; loading puts them back.

Saving takes the bank's lock (``locked(path)``: one writer at a time, the second refused naming the
first), re-reads the manifest there and merges three ways: what this bank object loaded from (or last
saved to) that bank, what it holds, what is on disk; its own additions, changes and removals are applied,
another writer's are kept, a module both changed is refused (``bank_id`` in the manifest tells a copy of the
same bank from another bank). It writes every new file first (temporary file, fsync, rename, fsync of the
directory; a file whose content is already there is not written again), then replaces ``manifest.json`` the
same way: that rename is the commit. Only then are files deleted, and only the bank's own: those the old
manifest named and the new one does not, content-named files a crash left (content matching the name) and
temporary files; a file the bank never wrote is never deleted. A crash at any instant leaves the old bank or
the new one, both loadable; loading ignores files the manifest does not name.

Loading is strict (``manifest.read_manifest_json``, then ``read_manifest`` for known types): schema,
fingerprint, every field typed, every ``file`` inside ``modules/`` or ``artifacts/`` of the bank (no ``..``,
no absolute path, no symlink; the folders and the manifest themselves no symlinks; no file named twice),
every file present and matching its sha256, weights floating point and finite, configs bounded and the
weights' shapes those the config makes (``plan.py``), all checked before the module is built. Banks written
by the previous layout (``modules/<name>.safetensors``, no artifacts) load as they are. Never pickle.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import torch

from ..checks import check_finite, check_weights
from ..io import MtpeftError, read_tensors, write_bytes, write_json
from ..lock import DirLock
from ..modules.base import MODULE_TYPES
from .artifacts import check_key
from .manifest import (
    ARTIFACTS,
    MANIFEST,
    SCHEMA_VERSION,
    WEIGHTS,
    check_folders,
    read_manifest_json,
    referenced,
)
from .sites import group_key as _group_key

__all__ = ["ARTIFACTS", "MANIFEST", "SCHEMA_VERSION", "WEIGHTS", "group_key", "load_bank", "locked", "read_manifest",
           "remove_saved_module", "save_bank"]

_CONTENT_NAME = re.compile(r".+\.([0-9a-f]{16})\.safetensors")
_TMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]+\.tmp")  # what mtpeft.io's atomic writes leave after a crash


def locked(path: str | Path) -> DirLock:
    """``with locked(bank_dir):``: this process is the bank's one writer until the block ends (saves inside it
    take the lock again, re-entrantly); another writer is refused at once with a message naming this one."""
    return DirLock(path, what="bank")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def group_key(module_type: str, config: dict) -> str:
    """The key ``ModuleBank.add`` gives the group of modules of this type and config (a config as a dict)."""
    return _group_key(module_type, MODULE_TYPES.get(module_type).config_cls.from_dict(dict(config)))


def _stem(owner: str, group: bool = False) -> str:
    """A file-name-safe form of a module name or group key (``lora:ab12`` -> ``lora-ab12``); two modules never
    share a stem (a hash of the name is added when characters were replaced)."""
    s = re.sub(r"[^A-Za-z0-9_.\-]", "-", owner).lstrip(".") or "_"
    return s if s == owner or group else f"{s[:80]}-{hashlib.sha1(owner.encode()).hexdigest()[:8]}"


def _serialise(tensors: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # One metadata key: safetensors writes the keys of its metadata in no fixed order, and the file
    # name is the hash of the bytes, so the same content must give the same bytes.
    return save(clean, metadata={"mtpeft": json.dumps(meta, sort_keys=True)})


def _content(folder: str, owner: str, data: bytes, group: bool = False) -> tuple[dict, tuple[str, bytes]]:
    sha = hashlib.sha256(data).hexdigest()
    rel = f"{folder}/{_stem(owner, group)}.{sha[:16]}.safetensors"
    return {"file": rel, "sha256": sha}, (rel, data)


def _intact(path: Path, ref: dict) -> bool:
    f = path / ref["file"]
    return bool(ref.get("sha256")) and f.is_file() and not f.is_symlink() and _sha256(f) == ref["sha256"]


def _put(path: Path, rel: str, data: bytes) -> None:
    """Write ``data`` at ``rel`` unless that content-named file is already there, intact."""
    f = path / rel
    if f.is_symlink() or not f.is_file() or _sha256(f) != hashlib.sha256(data).hexdigest():
        write_bytes(f, data)


# ---- what this bank object holds, as manifest entries -----------------------------------------------

_SIG_KEYS = ("type", "config", "task", "metrics", "metadata")


def _sig(e: dict | None):
    """What identifies an entry's content (file names aside): equal signatures, same module."""
    if e is None:
        return None
    core = {k: e.get(k) for k in _SIG_KEYS}
    core.update(merged=bool(e.get("merged")), finalized=bool(e.get("finalized")), sha256=e.get("sha256"),
                artifacts=(e.get("artifacts") or {}).get("sha256"), key=e.get("key"))
    return json.dumps(core, sort_keys=True, default=str)


def _memory_modules(bank, path: Path, base: dict, only) -> tuple[dict, dict]:
    """``({name: entry}, {file: bytes})`` of the bank in memory; modules not in ``only`` keep the entry they were
    loaded or last saved with when its file is intact (their weights are not serialised again)."""
    entries, data = {}, {}
    for rec in bank.records:
        e = json.loads(json.dumps(rec.__dict__))  # a plain copy, JSON-clean
        prev = base.get(rec.name)
        if only is not None and rec.name not in only and prev is not None and prev.get("sha256") \
                and (prev["type"], prev["config"], bool(prev.get("finalized"))) == (e["type"], e["config"],
                                                                                    bool(e["finalized"])) \
                and _intact(path, prev):
            e.update(file=prev["file"], sha256=prev["sha256"])
        else:
            ref, (rel, blob) = _content(WEIGHTS, rec.name, _serialise(bank.module_parameters(rec.name),
                                                                       {"module": rec.name, "type": rec.type}))
            e.update(ref)
            data[rel] = blob
        arts = bank.artifacts(rec.name)
        if arts:
            ref, (rel, blob) = _content(ARTIFACTS, rec.name, _serialise(arts, {"scope": "module", "owner": rec.name}))
            e["artifacts"] = ref
            data[rel] = blob
        entries[rec.name] = e
    return entries, data


GROUP_PARAM = "param:"  # prefix of a group-level parameter (MPT's shared prompt) in its group's artifacts file


def _group_params(bank, key: str) -> dict:
    """``{name: parameter}`` a group's stacks hold for the whole group (``stack.group_parameters()``)."""
    out = {}
    for _, stack in bank.stacks_of(bank.groups[key]):
        fn = getattr(stack, "group_parameters", None)
        out.update(fn() if fn is not None else {})
    return out


def _restore_group_params(bank, key: str, arts: dict, path: Path) -> dict:
    """Copy the saved group parameters of ``arts`` into the group's stacks; the artifacts proper are returned."""
    own = _group_params(bank, key)
    saved = {k[len(GROUP_PARAM):]: v for k, v in arts.items() if k.startswith(GROUP_PARAM)}
    if set(saved) != set(own):
        raise MtpeftError(f"bank {path}: the saved parameters of group {key!r} ({sorted(saved)}) are not those its "
                          f"modules need ({sorted(own)}); restore the group's file or re-create the bank")
    with torch.no_grad():
        for k, p in own.items():
            if tuple(saved[k].shape) != tuple(p.shape):
                raise MtpeftError(f"bank {path}: parameter {k!r} of group {key!r} has shape {tuple(saved[k].shape)}, "
                                  f"its config makes {tuple(p.shape)}; restore the group's file or re-create the bank")
            p.copy_(saved[k])
    for _, stack in bank.stacks_of(bank.groups[key]):
        stack.invalidate()
    return {k: v for k, v in arts.items() if not k.startswith(GROUP_PARAM)}


def _memory_groups(bank) -> tuple[dict, dict]:
    entries, data = {}, {}
    for key in bank.groups:
        arts = {**bank.group_artifacts(key), **{GROUP_PARAM + k: p for k, p in _group_params(bank, key).items()}}
        if arts:
            ref, (rel, blob) = _content(ARTIFACTS, key, _serialise(arts, {"scope": "group", "owner": key}), True)
            entries[key] = {"key": key, **ref}
            data[rel] = blob
    return entries, data


# ---- the three-way merge: what this bank loaded (base), what it holds (mine), what is on disk now ----------

def _conflict(path: Path, what: str, why: str) -> MtpeftError:
    return MtpeftError(f"bank {path}: {what} {why} since this bank was loaded; nothing was saved. Load the bank "
                       f"again from {path} and redo your change there, or save to another directory")


def _merge(path: Path, base: dict, mine: dict, disk: dict, order: list, kind: str) -> tuple[list, set]:
    """Entries to commit (disk's order, then this bank's additions) and the names this bank changed. Another
    writer's additions and changes are kept; a name changed on both sides is refused."""
    out, changed = {}, set()
    for name in dict.fromkeys(list(disk) + list(base) + list(mine)):
        b, m, d = base.get(name), mine.get(name), disk.get(name)
        if _sig(m) == _sig(b):  # this bank left it as it was: disk's version stands (kept, changed or removed)
            if d is not None:
                out[name] = d
            continue
        changed.add(name)
        if _sig(d) != _sig(b) and _sig(d) != _sig(m):
            how = "was added" if b is None else "was removed" if d is None else "was changed"
            raise _conflict(path, f"{kind} {name!r}", f"{how} by another writer and changed here"
                            if m is not None else f"{how} by another writer and removed here")
        if m is not None:
            out[name] = m
    if all(_sig(disk.get(n)) == _sig(base.get(n)) for n in set(disk) | set(base)):
        keys = [n for n in order if n in out] + [n for n in out if n not in order]  # no other writer: our order
    else:
        keys = [n for n in disk if n in out] + [n for n in order if n in out and n not in disk]
    return [out[n] for n in keys], changed


def _base(bank, path: Path, disk: dict | None) -> dict:
    """What this bank object last loaded from, or saved to, the bank now at ``path``; for a directory it never
    used, what it first loaded or saved when that was the same bank (the same ``bank_id``: a copy of the
    directory); else nothing, and every module it holds is its own addition."""
    saved = getattr(bank, "_mtpeft_saved", None) or {}
    if disk is None:
        return {"modules": {}, "groups": {}}
    bank_id, here = disk.get("bank_id"), saved.get(os.path.realpath(path))
    for cand in (here, saved.get("origin") if bank_id is not None else None):
        if cand is not None and cand["id"] == bank_id:
            return cand
    return {"modules": {}, "groups": {}}


def _set_base(bank, path: Path, bank_id: str | None, modules: dict, groups: dict) -> None:
    saved = dict(getattr(bank, "_mtpeft_saved", None) or {})
    saved[os.path.realpath(path)] = {"id": bank_id, "modules": modules, "groups": groups}
    saved.setdefault("origin", saved[os.path.realpath(path)])
    object.__setattr__(bank, "_mtpeft_saved", saved)


def _disk(path: Path) -> dict | None:
    if not (path / MANIFEST).exists():
        return None
    try:
        return read_manifest(path)
    except MtpeftError as e:
        raise MtpeftError(f"cannot save into {path}: its current manifest is unreadable ({e}); save to another "
                          "directory (or move the damaged bank away first)") from None


def save_bank(bank, path: str | Path, only: list[str] | None = None) -> None:
    """Write the bank to ``path`` under its lock: re-read the manifest there, apply this bank's own changes since
    it was loaded or last saved (another writer's are kept, a conflict is refused), write the new content-named
    files, commit the manifest, then delete the files the old manifest named and the new one does not.

    ``only``: just these modules changed; another module keeps its saved weights file when it is intact and of
    the same type and config (else it is written from memory)."""
    path = Path(path)
    with locked(path):
        check_folders(path)
        old = _disk(path)
        disk_mods = {e["name"]: e for e in (old or {}).get("modules", [])}
        disk_groups = {g["key"]: g for g in (old or {}).get("groups") or []}
        base = _base(bank, path, old)
        mine, data = _memory_modules(bank, path, base["modules"], only)
        mine_g, data_g = _memory_groups(bank)
        modules, _ = _merge(path, base["modules"], mine, disk_mods, bank.names, "module")
        left = {group_key(e["type"], e["config"]) for e in modules}
        groups, _ = _merge(path, base["groups"], mine_g, disk_groups, list(bank.groups), "the artifacts of group")
        groups = [g for g in groups if g["key"] in left]
        bank_id = (old or {}).get("bank_id") or ((getattr(bank, "_mtpeft_saved", None) or {}).get("origin") or {}).get(
            "id") or uuid.uuid4().hex
        manifest = {"format": "mtpeft-bank", "schema_version": SCHEMA_VERSION, "bank_id": bank_id,
                    "backbone": bank.backbone.fingerprint(), "modules": modules, "groups": groups}
        if old is not None and not bank.backbone.fingerprint_matches(old["backbone"]):
            raise MtpeftError(f"bank {path} holds modules of another backbone ({old['backbone'].get('name')!r}); "
                              "save to another directory")
        # same content as this bank's: its entry (files it can write if missing or damaged)
        manifest["modules"] = [mine.get(e["name"]) if _sig(mine.get(e["name"])) == _sig(e) else e for e in modules]
        manifest["groups"] = [mine_g.get(g["key"]) if _sig(mine_g.get(g["key"])) == _sig(g) else g for g in groups]
        needed = set(referenced(manifest))
        for rel, blob in {**data, **data_g}.items():
            if rel in needed:
                _put(path, rel, blob)
        (path / WEIGHTS).mkdir(exist_ok=True)
        write_json(path / MANIFEST, manifest)  # the commit point
        _set_base(bank, path, bank_id, mine, mine_g)
        _clean(path, old, manifest)


def _clean(path: Path, old: dict | None, new: dict) -> None:
    """Delete only what the bank itself wrote and no longer needs: the files the old manifest named and the new
    one does not, content-named files a crashed save left (their content matches their name) and temporary
    files of atomic writes. A file the bank never wrote (a user's own) is never deleted; nor is one the new
    manifest still names. Best effort: a file left behind is ignored by load, the next save retries."""
    keep = set(referenced(new))
    doomed = {f for f in referenced(old or {"modules": []}) if f not in keep}
    doomed.update(f.name for f in path.glob(f".{MANIFEST}.*.tmp"))
    for folder in (WEIGHTS, ARTIFACTS):
        d = path / folder
        if d.is_symlink() or not d.is_dir():
            continue
        for f in d.iterdir():
            rel = f"{folder}/{f.name}"
            if rel in keep or f.is_symlink() or not f.is_file():
                continue
            m = _CONTENT_NAME.fullmatch(f.name)
            if _TMP_NAME.fullmatch(f.name) or (m and _sha256(f).startswith(m.group(1))):
                doomed.add(rel)
    for rel in doomed:
        f = path / rel
        if rel in keep or f.is_symlink() or not f.is_file():
            continue
        with contextlib.suppress(OSError):
            os.unlink(f)


def _read_checked(path: Path, ref: dict, what: str, fix_missing: str, fix_bad: str) -> dict:
    f = path / ref["file"]
    if f.is_symlink() or not f.is_file():
        raise MtpeftError(f"bank {path}: {what} are missing ({f}); {fix_missing}")
    if ref.get("sha256") and _sha256(f) != ref["sha256"]:
        raise MtpeftError(f"bank {path}: {what} are corrupted (checksum mismatch in {f}); {fix_bad}")
    return read_tensors(f, what=what)


def _read_artifacts(path: Path, ref: dict, what: str) -> dict:
    tensors = _read_checked(path, ref, what, "restore the file, or drop the entry from manifest.json",
                            "restore the file or re-create the artifacts")
    for k, v in tensors.items():
        try:
            check_key(k)
        except MtpeftError as err:
            raise MtpeftError(f"bank {path}: {what} in {ref['file']}: {err}") from None
        check_finite(k, v, f"bank {path}: {what}", ref["file"])
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
    keys = set()
    for e in manifest["modules"]:  # configs first: cheap, and a bad one reads no file
        try:
            keys.add(group_key(e["type"], e["config"]))
        except (MtpeftError, TypeError, ValueError) as err:
            raise MtpeftError(f"bank {path}: module {e['name']!r} has a config its type {e['type']!r} does not "
                              f"take ({err}); fix its config in manifest.json or re-create the bank") from None
    loaded = []
    for e in manifest["modules"]:
        what = f"weights of module {e['name']!r}"
        tensors = _read_checked(path, e, what, "restore the file or remove the module from manifest.json",
                                "restore the file or retrain the module")
        check_weights(tensors, f"bank {path}: {what}", e["file"])
        arts = _read_artifacts(path, e["artifacts"], f"artifacts of module {e['name']!r}") if e.get("artifacts") else {}
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
            for k, v in _restore_group_params(bank, key, arts, path).items():
                bank.set_group_artifact(key, k, v)
        lost = [k for k in bank.groups if _group_params(bank, k) and k not in {key for key, _ in group_arts}]
        if lost:
            raise MtpeftError(f"bank {path}: group {lost[0]!r} has no saved group file (its shared parameters, e.g. "
                              "MPT's shared prompt); restore its entry in 'groups' of manifest.json or re-create the bank")
    except BaseException:
        bank.release()  # the backbone is left as it was: another bank can take it
        raise
    _set_base(bank, path, manifest.get("bank_id"), {e["name"]: e for e in manifest["modules"]},
              {g["key"]: g for g in manifest.get("groups") or []})
    return bank


def read_manifest(path: str | Path) -> dict:
    """The bank's manifest, checked (``manifest.read_manifest_json``), and every module type known."""
    path = Path(path)
    m = read_manifest_json(path)
    for e in m["modules"]:
        if e["type"] not in MODULE_TYPES:
            raise MtpeftError(f"bank {path}: module {e['name']!r} has unknown type {str(e['type'])[:80]!r}; "
                              f"known types: {', '.join(MODULE_TYPES.names())}")
    return m


def remove_saved_module(path: str | Path, name: str) -> None:
    """Drop module ``name`` (with its artifacts, and its group's when no module of the group is left) from
    the bank saved at ``path`` without loading the backbone, under the bank's lock: the manifest is rewritten
    atomically first, then the files no entry references any more go."""
    path = Path(path)
    read_manifest(path)  # a bad bank is reported as such before the lock is taken
    with locked(path):
        m = read_manifest(path)
        old = json.loads(json.dumps(m))
        entry = next((e for e in m["modules"] if e["name"] == name), None)
        if entry is None:
            raise MtpeftError(f"no module {name!r} in {path}; it has: "
                              f"{', '.join(e['name'] for e in m['modules']) or 'none'}")
        m["modules"] = [e for e in m["modules"] if e["name"] != name]
        if m.get("groups"):
            left = {_key_or_none(e) for e in m["modules"]}
            gone = _key_or_none(entry)
            m["groups"] = [g for g in m["groups"] if g["key"] != gone or gone in left]
        write_json(path / MANIFEST, m)  # the commit point
        _clean(path, old, m)


def _key_or_none(e: dict) -> str | None:
    try:
        return group_key(e["type"], e["config"])
    except (MtpeftError, TypeError, ValueError):
        return None
