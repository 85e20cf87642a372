"""Reading the directory `mtpeft continual --out OUT` writes, every file checked before it is used.

``OUT/run.json`` names the stream, the strategies and the seeds; ``OUT/runs/<strategy>/seed<k>/state.json``
holds one (strategy, seed) run: its accuracy matrix so far (``joint``: its accuracies), how many tasks are
done and whether it finished. A state file not written yet is a run not started (``None`` here), not an
error: the report of a run in progress lists it as partial.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import MtpeftError
from .matrix import AccuracyMatrix

RUN_FORMAT, STATE_FORMAT, VERSION = "mtpeft-continual-run", "mtpeft-continual-state", 1
SCENARIOS = ("domain-il", "task-il", "class-il")
JOINT = "joint"
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_CKPT = re.compile(r"step[0-9]{1,6}")
_RERUN = "re-run `mtpeft continual` with this --out to re-create it"


def safe_name(name, what: str = "strategy name") -> str:
    """``name`` when it is safe as a file-name part (``[a-z0-9-]+``), else an MtpeftError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MtpeftError(f"{what} {name!r} is not allowed: names are lower-case letters, digits and '-' only "
                          "(they become file names); rename it")
    return name


def _check(ok: bool, path: Path, problem: str, fix: str = _RERUN) -> None:
    if not ok:
        raise MtpeftError(f"{path}: {problem}; {fix}")


def _header(d, path: Path, fmt: str, what: str) -> None:
    _check(isinstance(d, dict) and d.get("format") == fmt, path,
           f"not a {what} (format {fmt!r} expected, found {d.get('format') if isinstance(d, dict) else d!r})",
           f"give the --out directory of `mtpeft continual`, or {_RERUN}")
    _check(d.get("version") == VERSION, path, f"{what} version {d.get('version')!r}; this mtpeft reads "
           f"version {VERSION}", f"report it with the mtpeft that wrote it, or {_RERUN}")


def _is_acc(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 1.0


def _accs(d, tasks: list[str], path: Path, what: str) -> dict[str, float]:
    """A mapping task -> accuracy (fraction in [0, 1]) over known tasks."""
    _check(isinstance(d, dict), path, f"{what} must be an object task -> accuracy, not {type(d).__name__}")
    for t, a in d.items():
        _check(t in tasks, path, f"{what} names task {t!r}, which is not in the stream {tasks}")
        _check(_is_acc(a), path, f"{what}[{t!r}] is {a!r}; accuracies are fractions in [0, 1]")
    return {t: float(d[t]) for t in tasks if t in d}


def read_run(run_dir: str | Path) -> dict:
    """run.json of ``run_dir``, checked (format, version, types)."""
    from ..io import read_json

    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise MtpeftError(f"run directory {run_dir} not found; give the --out directory of `mtpeft continual`")
    if not path.is_file():
        raise MtpeftError(f"{run_dir} has no run.json, so it is not a `mtpeft continual` run directory; give the "
                          "--out of `mtpeft continual` (run.json is written when the run starts)")
    run = read_json(path, what="continual run file")
    _header(run, path, RUN_FORMAT, "continual run file")
    s = run.get("stream")
    _check(isinstance(s, dict) and isinstance(s.get("name"), str), path, "'stream' must be an object with a 'name'")
    _check(s.get("scenario") in SCENARIOS, path, f"stream scenario {s.get('scenario')!r} is not one of {SCENARIOS}")
    tasks = s.get("tasks")
    _check(isinstance(tasks, list) and tasks and all(isinstance(t, str) and t for t in tasks)
           and len(set(tasks)) == len(tasks), path, f"stream tasks must be distinct task names, not {tasks!r}")
    strategies = run.get("strategies")
    _check(isinstance(strategies, list) and strategies and len(set(map(str, strategies))) == len(strategies), path,
           f"'strategies' must be a non-empty list of distinct names, not {strategies!r}")
    for name in strategies:
        safe_name(name, f"{path}: strategy")
    seeds = run.get("seeds")
    _check(isinstance(seeds, list) and seeds and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                                                       for k in seeds) and len(set(seeds)) == len(seeds),
           path, f"'seeds' must be a non-empty list of distinct non-negative integers, not {seeds!r}")
    _check(isinstance(run.get("command"), str), path, "'command' (the command line of the run) is missing")
    _check(isinstance(run.get("config", {}), dict), path, "'config' must be an object (the resolved config)")
    base = run.get("baselines", {})
    _check(isinstance(base, dict), path, "'baselines' must be an object")
    base["majority"] = _accs(base.get("majority", {}), tasks, path, "baselines.majority")
    return {**run, "baselines": base}


def run_folder(run_dir: str | Path, strategy: str, seed: int) -> Path:
    """``OUT/runs/<strategy>/seed<k>``: one (strategy, seed) run's state, checkpoints and logs."""
    return Path(run_dir) / "runs" / safe_name(strategy) / f"seed{int(seed)}"


def state_path(run_dir: str | Path, strategy: str, seed: int) -> Path:
    return run_folder(run_dir, strategy, seed) / "state.json"


def read_state(run_dir: str | Path, run: dict, strategy: str, seed: int) -> dict | None:
    """The state of one (strategy, seed) run, checked against run.json; None when not started (no file).
    For a sequential strategy ``matrix`` is an :class:`AccuracyMatrix`; for ``joint``, ``accuracies``."""
    from ..io import read_json

    path = state_path(run_dir, strategy, seed)
    if not path.exists():
        return None
    st = read_json(path, what="continual state file")
    _header(st, path, STATE_FORMAT, "continual state file")
    tasks, n = run["stream"]["tasks"], len(run["stream"]["tasks"])
    _check(st.get("strategy") == strategy and st.get("seed") == seed, path, f"it holds strategy "
           f"{st.get('strategy')!r} seed {st.get('seed')!r}, but lies where {strategy!r} seed {seed} belongs",
           "put it back where it was written")
    _check(st.get("scenario") == run["stream"]["scenario"] and st.get("tasks") == tasks, path,
           f"its scenario/tasks ({st.get('scenario')!r}, {st.get('tasks')!r}) differ from run.json's", _RERUN)
    done, finished = st.get("done"), st.get("finished")
    _check(isinstance(done, int) and not isinstance(done, bool) and 0 <= done <= n, path,
           f"'done' is {done!r}; it counts the tasks finished, 0..{n}")
    _check(isinstance(finished, bool) and (not finished or done == n), path,
           f"'finished' is {finished!r} with {done} of {n} tasks done")
    ckpt, inner = st.get("ckpt"), st.get("state", {})
    _check(ckpt is None or (isinstance(ckpt, str) and bool(_CKPT.fullmatch(ckpt))), path,
           f"it names the checkpoint {ckpt!r}; checkpoints are named step<N>")
    _check(isinstance(inner, dict), path, "its strategy 'state' must be an object")
    out = {"strategy": strategy, "seed": seed, "done": done, "finished": finished, "ckpt": ckpt, "state": inner,
           "timings": _timings(st.get("timings", []), path)}
    if strategy == JOINT:
        _check(st.get("matrix") is None, path, "a joint run has 'accuracies', not a 'matrix'")
        out["accuracies"] = _accs(st.get("accuracies") or {}, tasks, path, "accuracies")
        _check(not finished or len(out["accuracies"]) == n, path, "a finished joint run needs every task's accuracy")
        return out
    try:
        m = AccuracyMatrix.from_dict(st.get("matrix"))
    except MtpeftError as e:
        raise MtpeftError(f"{path}: its 'matrix' is unreadable ({e}); {_RERUN}") from e
    _check(m.steps == tasks and sorted(m.tasks) == sorted(tasks), path,
           f"its matrix's tasks {m.tasks} / steps {m.steps} are not the stream's {tasks}")
    _check(len(m.R) == done, path, f"its matrix has {len(m.R)} rows but 'done' is {done}")
    out["matrix"] = m if m.tasks == tasks else _reorder(m, tasks)
    return out


def _timings(ts, path: Path) -> list[dict]:
    _check(isinstance(ts, list) and all(isinstance(t, dict) and isinstance(t.get("task"), str) for t in ts), path,
           "'timings' must be a list of objects, each with a 'task'")
    for t in ts:
        for k in ("train_s", "eval_s", "memory_s"):
            v = t.get(k, 0.0)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, path,
                   f"timings of {t['task']!r}: {k} is {v!r}; seconds are finite and >= 0")
    return ts


def _reorder(m: AccuracyMatrix, tasks: list[str]) -> AccuracyMatrix:
    """``m`` with its columns in stream order."""
    idx = [m.tasks.index(t) for t in tasks]
    re_ = lambda v: None if v is None else [v[i] for i in idx]
    return AccuracyMatrix(tasks, m.steps, [re_(r) for r in m.R], re_(m.untrained), re_(m.joint))


def read_untrained(run_dir: str | Path, run: dict, seed: int) -> list[float] | None:
    """``OUT/untrained/seed<k>.json`` (the bare backbone's accuracy per task, written before any strategy
    runs), checked; None when absent. The report falls back on it while no state of the seed exists yet."""
    from ..io import read_json

    path = Path(run_dir) / "untrained" / f"seed{int(seed)}.json"
    if not path.exists():
        return None
    d, tasks = read_json(path, what="untrained accuracies"), run["stream"]["tasks"]
    _check(isinstance(d, dict) and d.get("tasks") == tasks and isinstance(d.get("accuracies"), list)
           and len(d["accuracies"]) == len(tasks), path, f"not the untrained accuracies of the tasks {tasks}",
           "delete it: `mtpeft continual --resume` measures it again")
    _check(all(a is None or _is_acc(a) for a in d["accuracies"]), path,
           f"accuracies {d['accuracies']!r} are not fractions in [0, 1]", "delete it: --resume measures it again")
    return [float("nan") if a is None else float(a) for a in d["accuracies"]]
