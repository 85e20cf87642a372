"""Writing the state of one (strategy, seed) run of a continual run directory (``rundir.py`` reads it back,
checked).

``OUT/runs/<strategy>/seed<k>/state.json`` names the checkpoint its bank and memory are in
(``ckpt/step<n>/bank``, ``ckpt/step<n>/memory``: the state after ``n`` finished tasks). A step's checkpoint
is written in full into a new folder before the state that names it is committed (one atomic rename), and
older checkpoints are deleted only after: a kill at any instant leaves a state whose checkpoint is whole.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .rundir import _CKPT, STATE_FORMAT, VERSION


def write_state(path: Path, state: dict) -> None:
    from ..io import write_json

    write_json(path, {"format": STATE_FORMAT, "version": VERSION, **state})


def prune_checkpoints(folder: Path, keep: str | None) -> None:
    """Delete every ``ckpt/step<N>`` but ``keep`` (after the state naming ``keep`` is committed)."""
    root = folder / "ckpt"
    if not root.is_dir() or root.is_symlink():
        return
    for p in root.iterdir():
        if p.name != keep and _CKPT.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
