"""The saved state of one (strategy, seed) run of a continual run directory, checked on every read.

``OUT/runs/<strategy>/seed<k>/state.json`` names the checkpoint its bank and memory are in
(``ckpt/step<n>/bank``, ``ckpt/step<n>/memory``: the state after ``n`` finished tasks). A step's checkpoint
is written in full into a new folder before the state that names it is committed (one atomic rename), and
older checkpoints are deleted only after: a kill at any instant leaves a state whose checkpoint is whole.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..errors import MtpeftError
from .matrix import AccuracyMatrix

FORMAT, VERSION = "mtpeft-continual-state", 1
_CKPT = re.compile(r"step[0-9]{1,6}")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def check_strategy_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MtpeftError(f"strategy name {name!r}: use lowercase letters, digits and '-' (e.g. expert-router)")
    return name


def run_dir(out: Path, strategy: str, seed: int) -> Path:
    return Path(out) / "runs" / check_strategy_name(strategy) / f"seed{int(seed)}"


def _bad(path: Path, why: str) -> MtpeftError:
    return MtpeftError(f"continual run state {path} {why}; restore it, or delete that folder "
                       f"({path.parent}) to run this strategy and seed again from the start")


def read_state(path: Path, strategy: str, seed: int, tasks: list[str]) -> dict:
    """The state at ``path``, checked against the run it belongs to."""
    from ..io import read_json

    s = read_json(path, what="continual run state")
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        raise _bad(path, f"is not a continual run state (format {FORMAT!r} expected)")
    if s.get("version") != VERSION:
        raise _bad(path, f"has version {s.get('version')!r}; this mtpeft reads version {VERSION}")
    if s.get("strategy") != strategy or s.get("seed") != seed:
        raise _bad(path, f"belongs to strategy {s.get('strategy')!r} seed {s.get('seed')!r}, not {strategy!r} "
                         f"seed {seed}")
    if s.get("tasks") != tasks:
        raise _bad(path, f"was made for the tasks {s.get('tasks')!r}, this run's stream is {tasks}")
    done = s.get("done")
    if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= len(tasks):
        raise _bad(path, f"has done = {done!r}; expected 0..{len(tasks)}")
    if not isinstance(s.get("finished"), bool) or not isinstance(s.get("timings"), list) \
            or not isinstance(s.get("state", {}), dict):
        raise _bad(path, "has a malformed finished/timings/state field")
    ck = s.get("ckpt")
    if ck is not None and (not isinstance(ck, str) or not _CKPT.fullmatch(ck)):
        raise _bad(path, f"names the checkpoint {ck!r}; checkpoints are named step<N>")
    if s.get("matrix") is not None:
        try:
            m = AccuracyMatrix.from_dict(s["matrix"])
        except MtpeftError as e:
            raise _bad(path, f"holds a bad accuracy matrix ({e})") from None
        if m.tasks != tasks or len(m.R) != done:
            raise _bad(path, f"holds a matrix of {len(m.R)} rows over {m.tasks} for {done} finished tasks of {tasks}")
    return s


def write_state(path: Path, state: dict) -> None:
    from ..io import write_json

    write_json(path, {"format": FORMAT, "version": VERSION, **state})


def prune_checkpoints(folder: Path, keep: str | None) -> None:
    """Delete every ``ckpt/step<N>`` but ``keep`` (after the state naming ``keep`` is committed)."""
    root = folder / "ckpt"
    if not root.is_dir() or root.is_symlink():
        return
    for p in root.iterdir():
        if p.name != keep and _CKPT.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
