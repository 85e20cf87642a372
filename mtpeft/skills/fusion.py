"""AdapterFusion over a bank's bottleneck adapters: build the fusion layers, train them on a target task (the
adapters and the backbone frozen, cross-entropy plus 0.01 ``||V - I||^2``), keep them with the bank
(``BANK/routers/NAME/``: ``router.json`` + ``router.safetensors``, as the skills routers) and score with them.

The fusion is a router (``mtpeft.routers.fusion.FusionRouter``), not a module of the bank: it reads the outputs of
several of the bank's modules at once, which no single module type can. ``mtpeft eval``-style scoring goes through
``evaluate_fusion``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..io import MtpeftError
from ..routers.fusion import ADAPTER_TYPES, FusionRouter
from .core import router_dir

DEFAULT_REG = 0.01  # weight of ||V - I||^2, as adapter-hub/adapters


def fusable(bank, names: Sequence[str] | None = None) -> list[str]:
    """The bottleneck adapters among ``names`` (default: the bank's modules), in order."""
    names = bank.names if names is None else list(names)
    return [n for n in names if bank.record(n).type in ADAPTER_TYPES]


def check_adapters(bank, adapters: Sequence[str]) -> list[str]:
    """``adapters`` as fusable: at least one, all bottleneck adapters of one group; else a clear error."""
    adapters = list(adapters)
    if not adapters:
        have = ", ".join(f"{r.name} ({r.type})" for r in bank.records) or "no modules"
        raise MtpeftError(f"AdapterFusion fuses bottleneck adapters ({', '.join(ADAPTER_TYPES)}); none to fuse (the "
                          f"bank has {have}): train some first, e.g. `mtpeft train --module pfeiffer --task T --out "
                          "BANK`, or name them with --experts")
    odd = [f"{n} ({bank.record(n).type})" for n in adapters if bank.record(n).type not in ADAPTER_TYPES]
    if odd:
        raise MtpeftError(f"AdapterFusion fuses bottleneck adapters ({', '.join(ADAPTER_TYPES)}); {odd} are not")
    keys = {bank.group_of(n).key for n in adapters}
    if len(keys) > 1:
        raise MtpeftError(f"AdapterFusion fuses adapters of one type and config; {adapters} have {len(keys)} "
                          "different ones: choose adapters of one configuration with --experts")
    return adapters


def add_fusion(bank, adapters: Sequence[str], dropout: float = 0.1, seed: int = 0) -> FusionRouter:
    """Fusion layers over ``adapters`` at every site they act on (Q, K random, V the identity), bound to ``bank``;
    every module of the bank is frozen, the fusion layers train."""
    adapters = check_adapters(bank, adapters)
    group = bank.group_of(adapters[0])
    hidden = {stack.d_out for _, stack in bank.stacks_of(group)}
    if len(hidden) != 1:
        raise MtpeftError(f"the adapters {adapters} write {sorted(hidden)} wide outputs at different sites; "
                          "AdapterFusion needs one width")
    bank.freeze()
    router = FusionRouter(adapters, list(group.sites), hidden.pop(), dropout=dropout, seed=seed)
    router.check_bank(bank)
    return router.to(bank.device)


def fit_fusion(bank, scorer, tasks, router: FusionRouter, cfg=None, *, reg_weight: float = DEFAULT_REG,
               name: str = "fusion") -> dict:
    """Train the fusion layers on ``tasks`` (cross-entropy + ``reg_weight * ||V - I||^2``), every module of the bank
    frozen. The router's learning rate is ``cfg.lr``. Returns fit_phase's metrics; the router is left in eval
    mode with its parameters frozen."""
    from ..lightning.objectives import Regularised
    from ..train import fit_phase

    bank.freeze()
    router.requires_grad_(True)
    try:
        return fit_phase(bank, scorer, list(tasks), router, cfg, objective=Regularised(reg_weight), name=name)
    finally:
        router.requires_grad_(False)
        router.eval()


def trainable(router: FusionRouter) -> int:
    """Parameters of the fusion layers (3 d^2 + 2 d per site)."""
    return sum(p.numel() for p in router.parameters())


def save_fusion(router: FusionRouter, bank_path: str | Path, name: str) -> Path:
    """Write the fusion layers to ``BANK/routers/NAME/`` (save the bank itself with ``bank.save``). Returns the dir."""
    d = router_dir(bank_path, name)
    router.save(d)
    return d


def load_fusion(bank, bank_path: str | Path, name: str) -> FusionRouter:
    """The fusion ``name`` saved with the bank at ``bank_path``, bound to ``bank`` (eval mode, frozen)."""
    d = router_dir(bank_path, name)
    if not (d / "router.json").is_file():
        raise MtpeftError(f"bank {bank_path} has no fusion {name!r} ({d}); train one with `mtpeft adapt --methods "
                          "fusion --keep`, or save it with mtpeft.skills.fusion.save_fusion")
    router = FusionRouter.load(d)
    router.check_bank(bank)
    router.requires_grad_(False)
    return router.to(bank.device).eval()


def evaluate_fusion(bank, scorer, task, router: FusionRouter, split: str = "test", batch_size: int = 64,
                    progress: bool = False) -> dict:
    """Accuracy on ``split`` with every example through the fused adapters."""
    from ..train import split_accuracy

    router.eval()
    return split_accuracy(bank, scorer, task, lambda n: router, split, batch_size, progress)
