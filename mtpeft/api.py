"""Glue for the CLI and scripts: open or create banks with their backbone and scorer."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

from .io import MtpeftError


def new_bank(backbone_name: str = "minilm", seed: int = 0):
    from .backbone import load_backbone
    from .bank import ModuleBank
    from .scorer import make_scorer
    from .train import default_threads

    default_threads()
    bb = load_backbone(backbone_name, seed=seed)
    return ModuleBank(bb), make_scorer(bb)


def open_bank(path: str | Path, trainable: bool = False):
    """Load a bank directory and the backbone it was built on."""
    from .backbone import load_backbone
    from .bank import ModuleBank, read_manifest
    from .scorer import make_scorer
    from .train import default_threads

    default_threads()
    m = read_manifest(path)
    name = m["backbone"].get("name")
    if not name:
        raise MtpeftError(f"{path}/manifest.json does not name its backbone; re-create the bank")
    bb = load_backbone(name)
    return ModuleBank.load(path, bb, trainable=trainable), make_scorer(bb)


def _uncommitted_bank(path: Path) -> bool:
    """``path`` (no manifest) holds nothing but what a bank's first save or a run leaves before the manifest's
    first commit (run states, lock, content-named weights, temporary files): a new bank may go there."""
    import re

    ours = re.compile(r"(.+\.[0-9a-f]{16}\.safetensors|\..+\.tmp)")
    for p in path.iterdir():
        if p.name in ("runs", ".mtpeft.lock") or re.fullmatch(r"\.manifest\.json\..+\.tmp", p.name):
            continue
        if p.name in ("modules", "artifacts") and p.is_dir() and not p.is_symlink() \
                and all(ours.fullmatch(f.name) and f.is_file() and not f.is_symlink() for f in p.iterdir()):
            continue
        return False
    return True


def check_bank_target(path: str | Path) -> None:
    """``path`` is a bank, or new, or an empty directory (no torch: checked before the bank is locked)."""
    if Path(path).exists() and not (Path(path) / "manifest.json").exists():
        if not Path(path).is_dir():
            raise MtpeftError(f"{path} exists and is not a directory; choose a new --out for the bank")
        if not _uncommitted_bank(Path(path)):
            raise MtpeftError(f"{path} is not empty and is not a bank (no manifest.json); choose a new or empty "
                              "directory for the bank")


def load_bank_or_new(backbone_name: str, path: str | Path | None = None):
    """The bank at ``path`` if it exists (its backbone must be ``backbone_name``), else a new one."""
    if path is not None:
        check_bank_target(path)
    if path is not None and (Path(path) / "manifest.json").exists():
        from .bank import read_manifest

        have = read_manifest(path)["backbone"].get("name")
        if have != backbone_name:
            raise MtpeftError(f"bank {path} is built on backbone {have!r}, not {backbone_name!r}: "
                              f"pass --backbone {have} or choose another --out")
        return open_bank(path)
    return new_bank(backbone_name)


def parse_options(module_type: str, options: list[str]):
    """``["r=16", "alpha=32"]`` -> the module type's config (values parsed as JSON when they parse)."""
    from .modules import MODULE_TYPES

    cls = MODULE_TYPES.get(module_type).config_cls
    kw = {}
    for opt in options:
        if "=" not in opt:
            raise MtpeftError(f"option {opt!r} is not KEY=VALUE; e.g. --option r=16. Options of {module_type}: "
                              f"{', '.join(cls.help())}")
        k, v = opt.split("=", 1)
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
        if not _finite(kw[k]):  # JSON's NaN / Infinity: a module of NaN weights, trained and saved silently
            raise MtpeftError(f"option {opt!r} of {module_type}: {v} is not a finite number; give a finite value, "
                              f"e.g. --option {k}=0.5")
        hint = _option_types(cls).get(k)
        if hint is not None:  # unknown keys are reported by from_dict, with the known ones
            kw[k] = _coerce_option(module_type, k, v, kw[k], hint)
    try:
        return cls.from_dict(kw)
    except (TypeError, ValueError) as e:
        raise MtpeftError(f"bad option for {module_type}: {e}") from e


def _finite(value) -> bool:
    """No NaN or infinity anywhere in a parsed JSON value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(x) for x in value)
    if isinstance(value, dict):
        return all(_finite(x) for x in value.values())
    return True


_TYPE_NAMES = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _option_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def _coerce_option(module_type: str, key: str, raw: str, value, hint):
    """``value`` (``raw`` parsed as JSON) as the field's type wants it, or an MtpeftError naming the type."""
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    is_list = lambda t: typing.get_origin(t) is list
    if not all(t in _TYPE_NAMES or is_list(t) for t in arms):
        return value  # a type this check does not know: the config's own validation decides
    for t in arms:
        if (t is type(None) and value is None) or (t is bool and isinstance(value, bool)) \
                or (t is int and isinstance(value, int) and not isinstance(value, bool)) \
                or (t is str and isinstance(value, str)) \
                or (is_list(t) and isinstance(value, list) and all(isinstance(x, str) for x in value)):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    if str in arms:  # e.g. init_text=123: the text as written
        return raw
    want = " or ".join("a JSON list of names" if is_list(t) else _TYPE_NAMES[t] for t in arms)
    example = next((e for t, e in ((int, "8"), (float, "0.5"), (bool, "true")) if t in arms), """'["query","value"]'""")
    raise MtpeftError(f"option {key}={raw!r} of {module_type}: {key} takes {want}, not {raw!r}; "
                      f"e.g. --option {key}={example}")


def check_input_room(bank, scorer, module_type: str, config) -> None:
    """Refuse, before training, virtual tokens (prompt, p-tuning, prefix ``n_tokens``) that leave no room
    for the inputs in an encoder with absolute positions: ``n_tokens`` plus the longest input the scorer
    keeps (``scorer.max_length``, inputs are truncated to it) must fit the backbone's positions."""
    n = getattr(config, "n_tokens", None)
    max_pos = getattr(bank.model.config, "max_position_embeddings", None)
    longest = getattr(scorer, "max_length", None)
    if bank.family != "encoder" or not isinstance(n, int) or not max_pos or not longest:
        return
    if n + longest > max_pos:
        raise MtpeftError(f"option n_tokens={n} of {module_type}: {n} virtual tokens plus inputs of up to {longest} "
                          f"tokens (longer inputs are truncated) exceed the {max_pos} positions of the backbone "
                          f"{getattr(bank.backbone, 'name', '')!r}; give --option n_tokens={max_pos - longest} "
                          "or fewer")
