"""File I/O with atomic writes and validated reads. JSON and safetensors only: never pickle."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import MtpeftError
from .faults import crash_point

__all__ = ["MtpeftError"]  # re-exported: older code imports it from here


def cache_dir() -> Path:
    """Where mtpeft caches derived artefacts (split datasets, dequantised weights).

    ``MTPEFT_CACHE`` wins; otherwise the user cache directory.
    """
    env = os.environ.get("MTPEFT_CACHE")
    if env:
        path = Path(env)
    else:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("mtpeft"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable_dir(path: str | Path, what: str) -> None:
    """Fail fast, before any work, when ``path`` cannot be (or become) a directory this process writes in:
    it, or its nearest existing ancestor, must be a directory where a file can be created. ``what`` names
    it in the error (e.g. ``--out``)."""
    path = Path(path)
    probe = path
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        raise MtpeftError(f"{what} {path}: {probe} is a broken symbolic link; remove it or choose another {what}")
    if not probe.is_dir():
        if probe == path:
            raise MtpeftError(f"{what} {path} exists and is not a directory; choose a new {what} (a directory)")
        raise MtpeftError(f"{what} {path} lies under {probe}, which is a file, not a directory; choose a new {what} "
                          "outside it")
    where = "" if probe == path else f" (its nearest existing folder {probe})"
    fix = f"choose a {what} you can write to, or change the folder's permissions"
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MtpeftError(f"{what} {path}{where} is not writable by this user; {fix}")
    try:  # access() does not see read-only mounts, pseudo file systems (/proc) or a full quota
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".mtpeft-write-check-")
    except OSError as e:
        raise MtpeftError(f"{what} {path}{where}: a file cannot be created there ({e.strerror}); {fix}") from e
    os.close(fd)
    os.unlink(tmp)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or an unlink in directory ``path`` durable, where the platform allows it."""
    if os.name == "nt":  # Windows cannot open a directory for fsync
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it where the platform allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but no file is created meanwhile)
    os.umask(old)
    return old


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new temporary directory in ``parent`` with the mode a plain ``mkdir`` would give it (``mkdtemp``
    makes 0700 whatever the umask), for folders that are renamed into place."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` a temporary file beside ``path``, flush it to disk, rename it over ``path`` and flush
    the directory: after a crash ``path`` holds the old content or the new one, never a part. The file gets
    the mode of the one it replaces, or of a new file under the umask (``mkstemp`` alone gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after: a writer may re-create the file (safetensors does, 0600 again)
        _fsync_file(tmp)
        crash_point(f"before-rename {path.parent.name}/{path.name}")  # fault injection for tests (inert)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    crash_point(f"after-rename {path.parent.name}/{path.name}")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically (temporary file, fsync, rename, fsync of the directory)."""

    def _w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(Path(path), _w)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temporary file in the same directory, fsync, rename, fsync of the directory)."""

    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic(Path(path), _w)


def read_json(path: str | Path, what: str = "file") -> Any:
    return _read_data(path, what, "JSON", json.load, (json.JSONDecodeError,), "restore it or re-create it")


def read_config(path: str | Path, what: str = "config") -> Any:
    """A JSON file, or YAML for ``.yaml`` / ``.yml`` (safe loading only: plain data, no objects)."""
    # beyond the parsers' own errors: values they cannot build (a date 2001-13-45, `!!float fast`) raise
    # ValueError, and nesting thousands deep raises RecursionError
    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        return _read_data(path, what, "JSON", json.load, (ValueError, RecursionError), "restore it or re-create it")
    import yaml

    return _read_data(path, what, "YAML", yaml.safe_load, (yaml.YAMLError, ValueError, TypeError, RecursionError),
                      "fix the line named above")


def _read_data(path, what: str, fmt: str, parse, errors: tuple, fix: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MtpeftError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f)
    except (*errors, UnicodeDecodeError) as e:
        raise MtpeftError(f"{what} {path} is not valid {fmt} ({e}); {fix}") from e


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(clean, tmp, metadata=metadata))


def read_tensors(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MtpeftError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MtpeftError(f"{what} {path} is corrupted or not safetensors ({e}); re-create it") from e


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing may fail or be slow);
    None when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
