"""Reading a bank's ``manifest.json`` without torch: every field checked, every file kept inside the bank.

``read_manifest_json(path)`` is what ``mtpeft bank ls`` needs (it loads no torch); ``persist.read_manifest``
adds the checks that need the module registry (known types). Nothing here allocates more than the manifest's
own size or touches the bank.

Checked: the format and schema; ``backbone`` an object; each module entry an object with a usable ``name``
(a non-empty string, no control characters, no path separators, no leading dot, listed once), ``type`` a
string, ``config``, ``metrics`` and ``metadata`` objects, ``task`` a string or null, ``merged`` and
``finalized`` booleans, ``file`` relative and directly inside ``modules/`` (artifacts: ``artifacts/``), no
``..``, no absolute path, no symlink; ``sha256`` 64 hex digits; no two entries naming one file; the bank's
``modules/``, ``artifacts/`` and ``manifest.json`` real (not symlinks).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import MtpeftError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS, ARTIFACTS = "modules", "artifacts"
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KB per module; anything near this is not one
_SHA = re.compile(r"[0-9a-f]{64}")


def bad_name_reason(name) -> str | None:
    """Why ``name`` cannot name a module (None: it can). Names end up in file names and terminals."""
    if not isinstance(name, str):
        return f"is not a string (a {type(name).__name__})"
    if not name or name != name.strip():
        return "is empty or starts or ends with blanks"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "holds a control character"
    if "/" in name or "\\" in name or name.startswith("."):
        return "holds a path separator or starts with a dot"
    if len(name) > 200:
        return "is longer than 200 characters"
    return None


def check_name(name, where: str = "") -> None:
    reason = bad_name_reason(name)
    if reason is not None:
        raise MtpeftError(f"{where}module name {name!r} {reason}; a module name is used in file names: use "
                          "letters, digits, '-', '_' and '.' (not first)")


def check_folders(path: Path) -> None:
    """``modules/``, ``artifacts/`` and ``manifest.json`` of the bank must be real, not symlinks: a bank never
    reads or deletes through a link."""
    for part in (WEIGHTS, ARTIFACTS, MANIFEST):
        p = path / part
        if p.is_symlink():
            raise MtpeftError(f"bank {path}: {part} is a symbolic link (to {p.resolve()}); a bank keeps its files "
                              f"in a real {part} inside it and never follows links out: replace the link by the "
                              "real folder or file (the bank is left as it is)")
        if part != MANIFEST and p.exists() and not p.is_dir():
            raise MtpeftError(f"bank {path}: {part} is not a directory; move it out of the way")


def check_file(path: Path, rel, folder: str, what: str) -> None:
    """``rel`` must name a file directly inside ``folder/`` of the bank, and stay inside once resolved."""
    bad = (not isinstance(rel, str) or "\\" in rel or "\0" in rel or rel.startswith("/")
           or len(rel.split("/")) != 2 or rel.split("/")[0] != folder or rel.split("/")[1] in ("", ".", "..")
           or any(ord(c) < 32 for c in rel))
    if not bad:
        root = (path / folder).resolve()
        try:
            (path / rel).resolve().relative_to(root)
            bad = not root.is_relative_to(path.resolve()) or (path / rel).is_symlink()
        except (ValueError, OSError):
            bad = True
    if bad:
        raise MtpeftError(f"bank {path}: {what} names file {rel!r}, which is not a file inside the bank's "
                          f"{folder}/ folder (absolute paths, '..' and symlinks out of the bank are refused); "
                          f"fix the entry in {MANIFEST} to '{folder}/<file name>' with the file in {path / folder}, "
                          "or re-create the bank")


def _r(v) -> str:
    """A value for a message: its repr, cut short (a manifest is read from anywhere)."""
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _fail(path: Path, msg: str) -> MtpeftError:
    return MtpeftError(f"{path / MANIFEST}: {msg}; fix the entry or re-create the bank")


def _check_sha(path: Path, sha, what: str, required: bool) -> None:
    if sha is None and not required:
        return
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise _fail(path, f"{what}: sha256 must be 64 lowercase hex digits, got {_r(sha)}")


def _check_ref(path: Path, ref, folder: str, what: str) -> None:
    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
        raise _fail(path, f"{what} must be {{'file': ..., 'sha256': ...}}, got {_r(ref)}")
    _check_sha(path, ref.get("sha256"), what, required=True)
    check_file(path, ref["file"], folder, what)


_TYPES = {"config": (dict,), "metrics": (dict,), "metadata": (dict,), "task": (str, type(None)),
          "merged": (bool,), "finalized": (bool,), "type": (str,)}


def _check_module(path: Path, e, names: set) -> None:
    if not isinstance(e, dict):
        raise _fail(path, f"a module entry is {_r(e)}, not an object")
    missing = {"name", "type", "config", "file"} - set(e)
    if missing:
        raise _fail(path, f"a module entry lacks {sorted(missing)}")
    reason = bad_name_reason(e["name"])
    if reason is not None or e["name"] in names:
        raise _fail(path, f"module name {_r(e['name'])} {reason or 'is listed twice'}")
    names.add(e["name"])
    what = f"module {e['name']!r}"
    for key, types in _TYPES.items():
        if key in e and not isinstance(e[key], types):
            want = " or ".join("null" if t is type(None) else {"dict": "an object", "str": "a string",
                                                                 "bool": "true or false"}[t.__name__] for t in types)
            raise _fail(path, f"{what}: '{key}' must be {want}, got {_r(e[key])}")
    check_file(path, e["file"], WEIGHTS, what)
    _check_sha(path, e.get("sha256"), what, required=False)
    if e.get("artifacts") is not None:
        _check_ref(path, e["artifacts"], ARTIFACTS, f"the artifacts of {what}")


def _check_groups(path: Path, groups) -> None:
    if not isinstance(groups, list):
        raise _fail(path, "'groups' must be a list")
    seen = set()
    for g in groups:
        key = g.get("key") if isinstance(g, dict) else None
        if not isinstance(key, str) or not key or key in seen or any(ord(c) < 32 for c in key):
            raise _fail(path, f"a 'groups' entry has no usable key, or a key listed twice ({_r(key)})")
        seen.add(key)
        _check_ref(path, g, ARTIFACTS, f"the artifacts of group {key!r}")


def referenced(m: dict) -> list[str]:
    """Every file a (checked) manifest names, in order, duplicates kept."""
    out = []
    for e in m["modules"]:
        out.append(e["file"])
        if e.get("artifacts"):
            out.append(e["artifacts"]["file"])
    out.extend(g["file"] for g in m.get("groups") or [])
    return out


def _load_json(path: Path):
    f = path / MANIFEST
    try:
        size = f.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise MtpeftError(f"{f} is {size} bytes, too big for a bank manifest; re-create the bank")
        with open(f, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise MtpeftError(f"bank manifest {f} is not valid JSON ({str(e)[:200]}); restore it or re-create it "
                          "(the bank)") from None
    except OSError as e:
        raise MtpeftError(f"bank manifest {f} cannot be read ({e}); check its permissions") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def read_manifest_json(path: str | Path) -> dict:
    """The bank's manifest, every field checked (see the module doc); module types are not looked up."""
    path = Path(path)
    if not path.is_dir():
        raise MtpeftError(f"bank directory not found: {path}; give the directory a bank was saved to "
                          "(e.g. by `mtpeft train --out DIR`)")
    check_folders(path)
    if not (path / MANIFEST).is_file():
        raise MtpeftError(f"{path} is not an mtpeft bank: its {MANIFEST} was not found; give the directory a bank "
                          "was saved to (e.g. by `mtpeft train --out DIR`)")
    m = _load_json(path)
    if not isinstance(m, dict) or m.get("format") != "mtpeft-bank":
        raise MtpeftError(f"{path / MANIFEST} is not an mtpeft bank manifest")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise MtpeftError(f"bank {path} has schema version {_r(m.get('schema_version'))}; this mtpeft reads "
                          f"version {SCHEMA_VERSION}: upgrade mtpeft or re-create the bank")
    if not isinstance(m.get("modules"), list) or not isinstance(m.get("backbone"), dict):
        raise MtpeftError(f"{path / MANIFEST} lacks 'modules' (a list) or 'backbone' (an object); re-create the bank")
    if m.get("bank_id") is not None and not (isinstance(m["bank_id"], str) and re.fullmatch(r"[0-9a-f]{8,64}", m["bank_id"])):
        raise _fail(path, f"'bank_id' must be 8 to 64 hex digits, got {_r(m['bank_id'])}")
    if not isinstance(m["backbone"].get("name") or "", str):
        raise _fail(path, f"the backbone's 'name' must be a string, got {_r(m['backbone'].get('name'))}")
    names: set = set()
    for e in m["modules"]:
        _check_module(path, e, names)
    if m.get("groups") is not None:
        _check_groups(path, m["groups"])
    files = referenced(m)
    shared = sorted({f for f in files if files.count(f) > 1})
    if shared:
        raise _fail(path, f"file {shared[0]!r} is named by two entries (each module and each group has its own "
                    "file; removing one would delete the other's)")
    return m
