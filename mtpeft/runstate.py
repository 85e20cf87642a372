"""Resumable training runs: the run state of ``mtpeft train --out BANK`` (``--resume``).

A run keeps its state in ``BANK/runs/<run-id>.json`` (JSON, written atomically, never pickle): the run's
resolved configuration (backbone, module type and options, the tasks with a fingerprint of their data,
seed, learning rate, caps, ...), the environment it ran in, and the modules finished so far, each with
the sha256 of its weights file in the bank and its result rows. It is rewritten after every finished
module; ``status`` turns from ``running`` to ``finished`` after the bank's final save. The folder is locked
(``mtpeft.lock.DirLock``) for the length of the run: one writer at a time.

``--resume`` takes the unfinished run of the bank, checks that the configuration given now equals the
saved one (a clear error names each difference), checks that every finished module is in the bank with
the recorded checksum, skips those, retrains the others from scratch (each fit's seed depends on the run's
seed and the module's name only: ``mtpeft.train.fit_seed``), and ends with the report an uninterrupted run
would have printed. A module of the run that reached the bank but not the run state (a kill between the
two writes) is trained again. Resuming a finished run prints its report again. A run stopped by a clear
error (``MtpeftError``: a NaN loss, say) rather than a kill is not left waiting for ``--resume``: its
state is removed if it finished nothing, else kept with ``status: failed`` and the error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

from .errors import MtpeftError
from .faults import phase

RUNS = "runs"
FORMAT = "mtpeft-run"
SCHEMA_VERSION = 1
MAX_STATE_BYTES = 16 << 20  # a run state is a few kB; a bigger file is not one
_SHA = re.compile(r"[0-9a-f]{64}")


# ---- the configuration of a run ---------------------------------------------------------------------
def task_fingerprint(task) -> str:
    """sha256 of what a task feeds training and evaluation: label names, templates, every split's rows."""
    h = hashlib.sha256()
    head = [task.name, list(task.label_names), task.template, task.label_template, task.prompt_suffix]
    h.update(json.dumps(head).encode())
    for split in sorted(task.splits):
        ds = task.splits[split]
        h.update(json.dumps([split, list(ds["text"]), [int(y) for y in ds["label"]]]).encode())
    return h.hexdigest()


def run_config(args, tasks, module_config, names) -> dict:
    """Everything that decides a `mtpeft train` run's results, JSON-clean (``--run-dir``, which only holds
    logs, and ``--json``, which only formats the report, are not part of it)."""
    conf = {"backbone": args.backbone, "module": args.module, "options": module_config.to_dict(),
            "tasks": [{"name": t.name, "data": task_fingerprint(t)} for t in tasks],
            "max_examples": args.max_examples, "seed": args.seed, "multitask": bool(args.multitask),
            "sampling": args.sampling, "lr": args.lr, "batch_size": args.batch_size,
            "max_epochs": args.max_epochs, "max_steps": args.max_steps, "patience": args.patience,
            "modules": list(names), "gate": bool(getattr(args, "gate", False))}
    if getattr(args, "router", None) is not None:  # skills (Poly/MHR): absent from other runs' state, as before
        conf["skills"] = {"router": args.router, "skills": args.skills, "splits": args.splits,
                          "router_lr": args.router_lr, "shared_routing": bool(args.shared_routing)}
    return json.loads(json.dumps(conf))


def environment() -> dict:
    """What results also depend on, beyond the configuration: library versions and thread count."""
    import lightning
    import torch

    from . import __version__

    return {"mtpeft": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "python": sys.version.split()[0], "threads": torch.get_num_threads(),
            "cuda": bool(torch.cuda.is_available())}


def differences(saved: dict, given: dict) -> list[str]:
    """Human-readable differences between two run configurations (empty: equal)."""
    out = []
    for key in sorted(set(saved) | set(given)):
        a, b = saved.get(key), given.get(key)
        if a == b:
            continue
        if key == "tasks" and isinstance(a, list) and isinstance(b, list):
            na = [t.get("name") for t in a if isinstance(t, dict)]
            nb = [t.get("name") for t in b if isinstance(t, dict)]
            if na != nb:
                out.append(f"tasks: saved {na}, given {nb}")
            else:
                changed = [x["name"] for x, y in zip(a, b) if x != y]
                out.append(f"the data of task(s) {changed} changed since the run started (file edited, "
                           "other --max-examples or --seed)")
        else:
            out.append(f"{key}: saved {json.dumps(a)}, given {json.dumps(b)}")
    return out


# ---- reading a run state ------------------------------------------------------------------------------
def _bad(path, why: str) -> MtpeftError:
    return MtpeftError(f"run state {path} is not a valid mtpeft run state ({why}); remove it to start the run "
                       "afresh (the modules already in the bank stay there)")


def read_state(path: str | Path) -> dict:
    """A run state file, checked field by field before anything uses it."""
    from .io import read_json

    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise _bad(path, "not a plain file")
    if path.stat().st_size > MAX_STATE_BYTES:
        raise _bad(path, f"larger than {MAX_STATE_BYTES >> 20} MB")
    s = read_json(path, what="run state")
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        raise _bad(path, f"no 'format': {FORMAT!r}")
    if s.get("schema_version") != SCHEMA_VERSION:
        raise _bad(path, f"schema version {s.get('schema_version')!r}, this mtpeft reads {SCHEMA_VERSION}")
    if s.get("status") not in ("running", "finished", "failed"):
        raise _bad(path, f"status {s.get('status')!r} is not 'running', 'finished' or 'failed'")
    for key, typ in (("run_id", str), ("started", str), ("config", dict), ("environment", dict), ("units", list)):
        if not isinstance(s.get(key), typ):
            raise _bad(path, f"{key!r} missing or not a {typ.__name__}")
    planned = s["config"].get("modules")
    if not (isinstance(planned, list) and all(isinstance(n, str) for n in planned)):
        raise _bad(path, "config 'modules' is not a list of names")
    seen = set()
    for u in s["units"]:
        ok = (isinstance(u, dict) and isinstance(u.get("name"), str) and u["name"] in planned
              and u["name"] not in seen and isinstance(u.get("modules"), dict) and isinstance(u.get("rows"), list)
              and all(isinstance(k, str) and isinstance(v, str) and _SHA.fullmatch(v)
                      for k, v in u["modules"].items())
              and all(isinstance(r, dict) for r in u["rows"]))
        if not ok:
            raise _bad(path, f"a finished-module entry is malformed or not one of the run's modules: {str(u)[:200]}")
        seen.add(u["name"])
    return s


def _states(runs: Path) -> list[tuple[Path, dict]]:
    if not runs.is_dir():
        return []
    found = [(p, read_state(p)) for p in sorted(runs.glob("*.json"))]
    return sorted(found, key=lambda ps: (ps[1]["started"], len(ps[0].name), ps[0].name))  # "-2" after its base


def _describe(path: Path, s: dict) -> str:
    return (f"{path} (started {s['started']}, {len(s['units'])} of {len(s['config']['modules'])} module(s) "
            f"finished: {', '.join(u['name'] for u in s['units']) or 'none'})")


# ---- a run --------------------------------------------------------------------------------------------
class Run:
    """The run state of one `mtpeft train --out BANK` run; use as a context manager (holds the lock)."""

    def __init__(self, bank_dir: str | Path, config: dict, resume: bool = False):
        from .lock import DirLock

        self.bank_dir = Path(bank_dir)
        self.runs = self.bank_dir / RUNS
        self.config = config
        self.resume = resume
        self._lock = DirLock(self.runs, what=f"run state folder of bank {self.bank_dir}")
        self.path: Path | None = None
        self.state: dict = {}

    # context manager: the lock is held from open to close
    def __enter__(self):
        if self.runs.is_symlink() or (self.runs.exists() and not self.runs.is_dir()):
            raise MtpeftError(f"{self.runs} is a symbolic link or a file; a bank keeps its run states in a real "
                              f"{RUNS}/ folder: move it out of the way")
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, MtpeftError) and self.path is not None \
                    and self.state.get("status") == "running":
                self._fail(str(exc))
        finally:
            self._lock.release()

    def _fail(self, message: str) -> None:
        """A run stopped by a clear error (a NaN loss, say), not by a kill: it does not wait for --resume. With
        nothing finished its state goes (the bank is as before); else it is kept, marked failed, for the record."""
        if not self.state.get("units"):
            self.path.unlink(missing_ok=True)
            return
        self.state["status"] = "failed"
        self.state["error"] = message[:2000]
        self._write()

    def _open(self) -> None:
        for tmp in self.runs.glob(".*.json.*.tmp"):  # left by a kill during a write (we hold the lock)
            tmp.unlink(missing_ok=True)
        states = _states(self.runs)
        running = [(p, s) for p, s in states if s["status"] == "running"]
        if len(running) > 1:
            raise MtpeftError(f"bank {self.bank_dir} has {len(running)} unfinished runs: "
                              + "; ".join(_describe(p, s) for p, s in running)
                              + "; remove all but the one to resume, then run again with --resume")
        if not self.resume:
            if running:
                p, s = running[0]
                raise MtpeftError(f"bank {self.bank_dir} has an unfinished training run: {_describe(p, s)}; "
                                  "pass --resume (with the same settings) to finish it, or remove that file to "
                                  "start afresh")
            return  # the state is written by begin(), once the run's checks have passed
        if running:
            self.path, self.state = running[0]
        else:
            done = [(p, s) for p, s in states if not differences(s["config"], self.config)]
            if not done:
                raise MtpeftError(f"--resume: bank {self.bank_dir} has no unfinished run to resume"
                                  + (f" ({len(states)} finished run(s) in {self.runs}, none with these settings)"
                                     if states else f" (no run state in {self.runs})")
                                  + "; drop --resume to start a new run")
            self.path, self.state = done[-1]  # finished already: its report is printed again
        diff = differences(self.state["config"], self.config)
        if diff:
            raise MtpeftError(f"--resume: the settings given differ from those of the run to resume "
                              f"({self.path}): {'; '.join(diff)}; give the same flags (or --config) as the "
                              "interrupted run, or remove that file to start afresh")
        self._verify_bank()
        self._note_environment()

    def _start(self) -> None:
        base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
        run_id, n = base, 1
        while (self.runs / f"{run_id}.json").exists():  # two runs of one process in one second (API, tests)
            n += 1
            run_id = f"{base}-{n}"
        self.path = self.runs / f"{run_id}.json"
        self.state = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "run_id": run_id, "status": "running",
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": self.config,
                      "environment": environment(), "units": []}
        self._write()

    def _write(self) -> None:
        from .io import write_json

        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        phase("state")
        write_json(self.path, self.state)

    def _manifest_sums(self) -> dict[str, str]:
        from .bank import read_manifest

        if not (self.bank_dir / "manifest.json").is_file():
            return {}
        return {e["name"]: e.get("sha256") for e in read_manifest(self.bank_dir)["modules"]}

    def _verify_bank(self) -> None:
        sums = self._manifest_sums()
        for u in self.state["units"]:
            for name, sha in u["modules"].items():
                if sums.get(name) != sha:
                    what = "is no longer in the bank" if name not in sums else "has changed in the bank"
                    raise MtpeftError(f"--resume: module {name!r}, finished by the run {self.path}, {what} "
                                      f"{self.bank_dir} (expected weights sha256 {sha[:16]}...); the bank changed "
                                      "since the run: remove that run state file and train again into a new --out")

    def _note_environment(self) -> None:
        was, now = self.state["environment"], environment()
        changed = [f"{k} {was.get(k)} -> {now.get(k)}" for k in now if was.get(k) != now.get(k)]
        if changed:
            print(f"mtpeft: warning: resuming {self.path} in another environment ({', '.join(changed)}): the "
                  "modules trained now may differ from those an uninterrupted run would have trained",
                  file=sys.stderr)
        if self.state["status"] == "finished":
            print(f"mtpeft: the run {self.path} finished already; its report follows", file=sys.stderr)
        elif self.state["units"]:
            print(f"mtpeft: resuming {_describe(self.path, self.state)}", file=sys.stderr)

    # ---- what the training loop asks -------------------------------------------------------------
    def rows(self, name: str) -> list[dict] | None:
        """The result rows of module ``name`` if the run finished it (then it is skipped), else None."""
        for u in self.state["units"]:
            if u["name"] == name:
                return [dict(r) for r in u["rows"]]
        return None

    def owns(self, name: str) -> bool:
        """Module ``name`` is one this (resumed) run trains: being in the bank is not a clash."""
        return self.resume and name in self.state["config"]["modules"]

    def begin(self, bank) -> None:
        """Before the first module trains: a new run writes its state; a resumed one takes out of ``bank``
        (in memory) the run's modules it holds but the run did not record as finished (a kill between the
        bank's save and the run state's): they are trained again from scratch."""
        if not self.resume:
            self._start()
            return
        for name in self.state["config"]["modules"]:
            if name in bank.names and self.rows(name) is None:
                print(f"mtpeft: module {name!r} reached the bank but the run did not record it as finished: "
                      "training it again", file=sys.stderr)
                bank.remove(name)

    def finished(self, name: str, rows: list[dict]) -> None:
        """Record module ``name`` (already saved to the bank) as finished, with its checksum and rows."""
        sums = self._manifest_sums()
        if not sums.get(name):
            raise MtpeftError(f"module {name!r} is not in the saved bank {self.bank_dir}; report this as an "
                              "mtpeft bug")
        self.state["units"].append({"name": name, "modules": {name: sums[name]},
                                    "rows": json.loads(json.dumps(rows))})
        self._write()

    def close(self, report: dict) -> None:
        """The run is finished: the bank's final save is done."""
        self.state["status"] = "finished"
        self.state["report"] = json.loads(json.dumps(report))
        self._write()
        phase("done")


class RunView(Run):
    """The run as a rank other than zero of a distributed run sees it: the same decisions as rank zero's
    ``Run`` (which modules are finished and skipped, which to train again) from the same state file, with
    no lock and no writes (rank zero holds the lock and writes). Rank zero checks the settings and the bank;
    this view trusts them."""

    def __enter__(self):
        if not self.resume:
            return self
        states = _states(self.runs)
        running = [(p, s) for p, s in states if s["status"] == "running"]
        done = [(p, s) for p, s in states if not differences(s["config"], self.config)]
        if running:
            self.path, self.state = running[0]
        elif done:
            self.path, self.state = done[-1]
        else:
            self.state = {"units": [], "config": self.config}
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None

    def rows(self, name: str) -> list[dict] | None:
        return super().rows(name) if self.state else None

    def begin(self, bank) -> None:
        """Take out of ``bank`` (in memory) what rank zero's ``Run.begin`` takes out; write nothing."""
        if not self.resume:
            return
        for name in self.state["config"]["modules"]:
            if name in bank.names and self.rows(name) is None:
                bank.remove(name)

    def finished(self, name: str, rows: list[dict]) -> None:
        return None

    def close(self, report: dict) -> None:
        return None
