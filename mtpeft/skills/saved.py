"""Any router saved with a bank (``BANK/routers/NAME/``): AdapterFusion or Poly/MHR skills, loaded by its kind."""
from __future__ import annotations

from pathlib import Path

from ..errors import MtpeftError
from .core import evaluate_skills, load_skills, router_dir
from .fusion import evaluate_fusion, load_fusion

KINDS = {"poly": load_skills, "fusion": load_fusion}


def load_router(bank, bank_path: str | Path, name: str):
    """The router ``name`` saved with the bank at ``bank_path`` (its kind read from ``router.json``), bound to
    ``bank``, in eval mode."""
    from ..io import read_json

    d = router_dir(bank_path, name)
    if not (d / "router.json").is_file():
        root = Path(bank_path) / "routers"
        have = sorted(p.name for p in root.iterdir() if (p / "router.json").is_file()) if root.is_dir() else []
        raise MtpeftError(f"bank {bank_path} has no router {name!r} ({d}); saved routers: {', '.join(have) or 'none'}")
    meta = read_json(d / "router.json", what="router config")
    kind = meta.get("name") if isinstance(meta, dict) else None
    if kind not in KINDS:
        raise MtpeftError(f"{d} holds a {kind!r} router; `mtpeft eval --router` takes {' or '.join(KINDS)} routers")
    return KINDS[kind](bank, bank_path, name)


def evaluate_router(bank, scorer, task, router, split: str = "test", progress: bool = False) -> dict:
    """Accuracy on ``split`` through a saved router: skills route by the task (it must be one of theirs),
    a fusion serves every example alike."""
    if router.name == "poly":
        return evaluate_skills(bank, scorer, task, router, split=split, progress=progress)
    return evaluate_fusion(bank, scorer, task, router, split=split, progress=progress)
