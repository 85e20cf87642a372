"""Glue for the CLI and scripts: open or create banks with their backbone and scorer."""
from __future__ import annotations

import json
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


def load_bank_or_new(backbone_name: str, path: str | Path | None = None):
    """The bank at ``path`` if it exists (its backbone must be ``backbone_name``), else a new one."""
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
    try:
        return cls.from_dict(kw)
    except (TypeError, ValueError) as e:
        raise MtpeftError(f"bad option for {module_type}: {e}") from e
