"""A module's size, known before anything is allocated: configs are bounded before ``ModuleBank.add`` builds them.

``planned_shapes(bank, type, config)`` builds one expert of each of the module's stacks on the ``meta`` device
(no memory, no change to the backbone: the targeted layers are found as ``_install`` finds them, but not
wrapped) and returns ``{site.param: shape}``, the names ``module_parameters`` gives. ``check_size`` refuses a
config whose integer sizes exceed what the backbone could use, or whose module would hold more parameters
than ``MAX_MODULE_FACTOR`` times the backbone's (``MIN_BUDGET`` at least), with the config named and the fix.
``check_fits`` compares saved weights with the planned shapes, so a bad config or a bad file is refused
before the module is built.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import MtpeftError
from ..modules.base import MODULE_TYPES, ModuleConfig, match_targets
from .layers import BankedLinear
from .sites import is_head

MAX_MODULE_FACTOR = 2.0  # a module may hold up to this many times the backbone's parameters
MIN_BUDGET = 1 << 24  # ... and at least this many (16M: tiny test backbones still take big adapters)
SIZE_FACTOR = 16  # an integer size (rank, tokens, hidden width) up to this times the backbone's largest width


def _widest(bank) -> int:
    model = bank.model
    widths = [int(s) for p in model.parameters() for s in p.shape[-2:]]
    vocab = model.get_input_embeddings().weight.shape[0]
    widths = [w for w in widths if w != vocab] or [1]
    pos = getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0
    return max(max(widths), int(pos) if isinstance(pos, int) else 0)


def _numel_backbone(bank) -> int:
    return sum(p.numel() for p in bank.model.parameters())


def _sizes(config: ModuleConfig) -> dict[str, int]:
    return {k: v for k, v in config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)}


def _linear_sites(bank, mtype, config) -> list[tuple[str, nn.Linear]]:
    mods = dict(bank.model.named_modules())
    cands = [n for n, m in mods.items() if isinstance(m, (nn.Linear, BankedLinear)) and not n.endswith(".base")
             and not is_head(n, bank.family)]
    sites = match_targets(cands, mtype.targets(bank.family, config))
    if not sites:
        raise MtpeftError(f"target_modules {mtype.targets(bank.family, config)} match no linear layer of "
                          f"this {bank.family} backbone; examples of layer names: {cands[:6]}")
    return [(s, mods[s].base if isinstance(mods[s], BankedLinear) else mods[s]) for s in sites]


def _plan(bank, mtype, config, out: dict) -> None:
    if mtype.level == "composite":
        for ptype, pconfig in mtype.parts(config):
            _plan(bank, ptype, pconfig, out)
        return
    if mtype.level in ("input", "attention"):
        stacks = [(f"<{mtype.level}>", mtype.make_stack(config, None, bank.backbone))]
    else:
        stacks = [(s, mtype.make_stack(config, lin, bank.backbone)) for s, lin in _linear_sites(bank, mtype, config)]
    for site, stack in stacks:
        for pname, p in stack.new_expert(None).named_parameters():
            out[f"{site}.{pname}"] = tuple(p.shape)


def planned_shapes(bank, module_type: str, config: ModuleConfig) -> dict[str, tuple[int, ...]]:
    """``{site.param: shape}`` of a new module of this type and config (as added, not finalized); nothing is
    allocated and the bank is not changed."""
    out: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        _plan(bank, MODULE_TYPES.get(module_type), config, out)
    return out


def check_size(bank, name: str, module_type: str, config: ModuleConfig) -> dict[str, tuple[int, ...]]:
    """Refuse a config too big for the backbone, before anything is built; returns the planned shapes."""
    limit = SIZE_FACTOR * _widest(bank)
    big = {k: v for k, v in _sizes(config).items() if v > limit}
    if big:
        k, v = next(iter(big.items()))
        raise MtpeftError(f"module {name!r} ({module_type}): {k}={v} is far beyond this backbone's sizes (its widest "
                          f"layer or context is {limit // SIZE_FACTOR}; at most {limit} is taken); give a smaller "
                          f"{k}, e.g. --option {k}=8")
    shapes = planned_shapes(bank, module_type, config)
    n = sum(_prod(s) for s in shapes.values())
    budget = max(int(MAX_MODULE_FACTOR * _numel_backbone(bank)), MIN_BUDGET)
    if n > budget:
        sizes = ", ".join(f"{k}={v}" for k, v in _sizes(config).items()) or "its config"
        raise MtpeftError(f"module {name!r} ({module_type}, {sizes}) would hold {n:,} parameters, more than the "
                          f"{budget:,} a module may hold on this backbone ({MAX_MODULE_FACTOR:g}x its parameters); "
                          "give smaller sizes or fewer target_modules")
    return shapes


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def check_fits(shapes: Mapping[str, tuple], tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """The saved ``tensors`` must be exactly the planned parameters, shape for shape."""
    if set(shapes) != set(tensors):
        raise MtpeftError(f"{what}: the weights do not fit its config (missing {sorted(set(shapes) - set(tensors))[:3]}, "
                          f"unexpected {sorted(set(tensors) - set(shapes))[:3]}); the file or the config in "
                          "manifest.json was changed: restore it or retrain the module")
    for k, s in shapes.items():
        if tuple(tensors[k].shape) != tuple(s):
            raise MtpeftError(f"{what}: {k} has shape {tuple(tensors[k].shape)}, its config makes {tuple(s)}; the "
                              "file or the config in manifest.json was changed: restore it or retrain the module")
