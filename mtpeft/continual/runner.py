"""``run_continual``: learn a stream task after task with each strategy and seed, evaluating every task after
every task, and write the run directory the report is rendered from.

Layout (every file written atomically, no pickle)::

    OUT/run.json                         the resolved config, stream, strategies, seeds, baselines
    OUT/untrained/seed<k>.json           the bare backbone's accuracies (the matrix's ``b``), once per seed
    OUT/runs/<strategy>/seed<k>/state.json, ckpt/step<n>/{bank,memory}, logs/
    OUT/report.json, report.md, plots/   (``report.write_report``)

Each (strategy, seed) runs on a fresh backbone. After each task the bank, the memory and the state (the
matrix so far, timings, the strategy's own state) are saved; ``resume=True`` continues every unfinished
(strategy, seed) from its last finished task, and ends with the report of an uninterrupted run: every fit's
seed derives from the run's seed and the fit's name, and the memory saves its random state.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import MtpeftError
from ..faults import crash_point, phase
from ..lock import LOCK_NAME
from .matrix import AccuracyMatrix
from .rundir import RUN_FORMAT, read_run, read_state, read_untrained, run_folder, safe_name
from .rundir import VERSION as RUN_VERSION
from .state import prune_checkpoints, write_state
from .stream import Stream, load_stream


def _stream(conf: dict, seed: int) -> Stream:
    return load_stream(conf["stream"], conf["tasks"], conf["scenario"], max_train=conf["max_train"],
                       max_eval=conf["max_eval"], seed=seed)


def _train_config(conf: dict, seed: int, logs: Path | None, parallel=None):
    from ..train import TrainConfig

    par = {} if parallel is None else parallel.fields()
    return TrainConfig(lr=conf["lr"], batch_size=conf["batch_size"], max_epochs=conf["max_epochs"],
                       max_steps=conf["max_steps"], patience=conf["patience"], seed=seed, progress=False,
                       run_dir=None if logs is None else str(logs), **par)


# Config keys that say what to run, or where, not how: a resumed run may add strategies and seeds, and run on
# any number of processes.
WHAT_TO_RUN = ("strategy", "compare", "seeds", "devices", "num_nodes", "dist_strategy", "accelerator")


class ContinualRun:
    """One run directory: ``run(strategies, seeds)`` trains and evaluates whatever is not finished yet.

    ``parallel`` (``mtpeft.distributed.Parallel``): every fit on several processes (Lightning DDP). Every
    rank runs the same run; every rank evaluates its share of each accuracy-matrix row (the counts summed
    over the ranks), and rank zero alone holds the lock and writes (run file, states, checkpoints, report).
    The replay memory is replicated: every rank inserts the same examples with the same seeded policy, so
    every rank holds the same memory."""

    def __init__(self, conf: dict, out: str | Path, *, resume: bool = False, command: str = "",
                 progress: bool = True, log: Callable[[str], None] | None = None, parallel=None):
        from ..distributed import Parallel, global_rank

        self.conf, self.out, self.resume, self.command = conf, Path(out), resume, command
        self.parallel = parallel or Parallel()
        self.writer = not self.parallel.distributed or global_rank(self.parallel.devices) == 0
        self.progress = progress and self.writer
        self.log = (log if self.writer else None) or (lambda s: None)
        self._streams: dict[int, Stream] = {}
        self._cells: dict[int, dict] = {}  # seed -> evaluated cells that cannot change (see evaluate.row)
        self._shared: dict[int, dict] = {}  # seed -> fits the strategies of that seed share (Context.shared)
        self._pooled: dict[int, dict] = {}  # seed -> the frozen backbone's pooled test batches (evaluate.py)

    # ---- the run file ------------------------------------------------------------------------------
    def _open(self, strategies: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
        from ..io import write_json

        path = self.out / "run.json"
        if path.exists():
            if not self.resume:
                raise MtpeftError(f"{self.out} already holds a continual run; continue it with --resume, or give a "
                                  "new --out")
            saved = read_run(self.out)
            have = saved.get("config") or {}
            diff = sorted(k for k in set(self.conf) | set(have)
                          if k not in WHAT_TO_RUN and self.conf.get(k) != have.get(k))
            if diff:
                raise MtpeftError(f"--resume: the run in {self.out} was made with a different config (keys {diff} "
                                  "differ); resume with the same config and caps, or give a new --out")
            strategies = list(dict.fromkeys([*saved.get("strategies", []), *strategies]))
            seeds = list(dict.fromkeys([*saved.get("seeds", []), *seeds]))
        elif any(p.name != LOCK_NAME and not _temp_of_run_file(p.name) for p in self.out.iterdir()):
            # the lock is this run's own; a run killed before run.json's first commit leaves only a temp file
            raise MtpeftError(f"{self.out} is not empty and holds no continual run; give a new or empty --out")
        stream = self.stream(seeds[0])
        self.run_file = {"format": RUN_FORMAT, "version": RUN_VERSION, "stream": stream.describe(),
                         "strategies": strategies, "seeds": seeds, "config": self.conf, "command": self.command,
                         "baselines": {"majority": {t.name: t.majority_baseline("test") for t in stream.tasks}}}
        write_json(path, self.run_file)
        return strategies, seeds

    def stream(self, seed: int) -> Stream:
        if seed not in self._streams:
            self._streams[seed] = _stream(self.conf, seed)
        return self._streams[seed]

    # ---- the whole run -----------------------------------------------------------------------------
    def run(self, strategies: Sequence[str], seeds: Sequence[int]) -> dict:
        from ..lock import DirLock
        from .strategies import STRATEGIES

        strategies = [safe_name(s) for s in strategies]
        for s in strategies:
            STRATEGIES.get(s)  # unknown names fail before anything runs
        if not self.writer:
            return self._follow(list(strategies), list(seeds))
        self.out.mkdir(parents=True, exist_ok=True)
        with DirLock(self.out, what="continual run"):
            strategies, seeds = self._open(list(strategies), list(seeds))
            total = sum(len(self.stream(s)) for s in seeds) * len(strategies)
            bar = _bar(total, self.progress)
            try:
                for seed in seeds:
                    untrained = self.untrained(seed)
                    for name in strategies:
                        self.run_one(name, seed, untrained, bar)
            finally:
                bar.close()
            from .report import write_report

            return write_report(self.out)

    def _follow(self, strategies: list[str], seeds: list[int]) -> dict:
        """A rank other than zero: the same fits and evaluations (its share) as rank zero, in the same order,
        writing nothing. Rank zero's ``_open`` decides what runs; this reads the same inputs (the saved run file
        when resuming) and makes the same decision."""
        if self.resume and (self.out / "run.json").exists():
            saved = read_run(self.out)
            strategies = list(dict.fromkeys([*saved.get("strategies", []), *strategies]))
            seeds = list(dict.fromkeys([*saved.get("seeds", []), *seeds]))
        stream = self.stream(seeds[0])
        self.run_file = {"format": RUN_FORMAT, "version": RUN_VERSION, "stream": stream.describe(),
                         "strategies": strategies, "seeds": seeds, "config": self.conf, "command": self.command,
                         "baselines": {"majority": {t.name: t.majority_baseline("test") for t in stream.tasks}}}
        bar = _bar(0, False)
        for seed in seeds:
            # every rank holds the untrained row (the cells a later row may take from the cache must be the
            # same on every rank); it is computed whole, before the first fit makes a process group
            untrained = self.untrained(seed)
            for name in strategies:
                self.run_one(name, seed, untrained, bar)
        return {}

    # ---- the untrained row -------------------------------------------------------------------------
    def untrained(self, seed: int) -> list[float]:
        from ..io import write_json
        from .evaluate import row

        stream = self.stream(seed)
        cells = self._cells.setdefault(seed, {})
        path = self.out / "untrained" / f"seed{seed}.json"
        if path.exists():
            accs = read_untrained(self.out, self.run_file, seed)
            for t, a in zip(stream.tasks, accs):
                space = stream.eval_space(-1, t)
                cells[(("bare",), t.name, None if space is None else space.key)] = a
            return accs
        bank, scorer = self._fresh()
        accs = row(bank, scorer, stream, -1, lambda t: None, cache=cells)
        if self.writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"tasks": stream.names, "accuracies": accs})
        return accs

    def _fresh(self, bank_dir: Path | None = None):
        from ..backbone import load_backbone
        from ..bank import ModuleBank
        from ..scorer import make_scorer

        bb = load_backbone(self.conf["backbone"], seed=0)
        bank = ModuleBank(bb) if bank_dir is None else ModuleBank.load(bank_dir, bb)
        return bank, make_scorer(bb)

    # ---- one strategy and seed ---------------------------------------------------------------------
    def run_one(self, name: str, seed: int, untrained: list[float], bar) -> None:
        from .strategies import STRATEGIES

        stream = self.stream(seed)
        folder = run_folder(self.out, name, seed)
        state = read_state(self.out, self.run_file, name, seed)
        if state is not None and state["finished"]:
            bar.update(len(stream))
            return
        done = 0 if state is None else state["done"]
        ckpt = None if state is None else state.get("ckpt")
        bank, scorer = self._fresh(None if ckpt is None else folder / "ckpt" / ckpt / "bank")
        cls = STRATEGIES.get(name)
        memory = None
        if cls.uses_memory:
            memory = self._memory(bank, seed, None if ckpt is None else folder / "ckpt" / ckpt / "memory")
        from .strategies import Context

        ctx = Context(bank, scorer, stream, self.conf["module"], dict(self.conf["options"]),
                      _train_config(self.conf, seed, folder / "logs", self.parallel), seed, memory, folder, self.progress,
                      shared=self._shared.setdefault(seed, {}))
        strategy = cls(ctx, **self.conf["strategies"].get(name, {}))
        if state is not None:
            strategy.load_state_dict(state.get("state", {}))
        matrix = AccuracyMatrix(stream.names, rows=state["matrix"].R if state and "matrix" in state else [],
                                untrained=untrained)
        timings = [] if state is None else list(state["timings"])
        bar.update(done)
        if not cls.sequential:
            self._run_joint(strategy, folder, stream, matrix, bar)
            return
        for step in range(done, len(stream)):
            task = stream.tasks[step]
            bar.set_description(f"{name} seed {seed}: {task.name}")
            timings.append(self._step(strategy, step, task, matrix))
            if not self.writer:
                continue
            self._commit(strategy, folder, step + 1, matrix, timings, len(stream))
            bar.update(1)
            self.log(f"{name} seed {seed}: after {task.name}: "
                     + " ".join(f"{t}={a:.3f}" for t, a in zip(stream.names, matrix.R[-1])))

    def _memory(self, bank, seed: int, path: Path | None):
        from ..memory import ReplayMemory

        if path is not None and (path / "manifest.json").exists():
            return ReplayMemory.load(path)
        m = self.conf["memory"]
        return ReplayMemory(bank.backbone.hidden_size, m["capacity"], m["policy"], seed=seed)

    def _step(self, strategy, step: int, task, matrix: AccuracyMatrix) -> dict:
        from .evaluate import row

        ctx = strategy.ctx
        ctx.timings = {"memory_s": 0.0}
        phase("continual-train", f"{strategy.name}:{task.name}")
        t0 = time.perf_counter()
        strategy.before_task(step, task)
        crash_point(f"continual {strategy.name} {task.name}: before training")
        fit = strategy.train_task(step, task) or {}
        crash_point(f"continual {strategy.name} {task.name}: trained")
        strategy.after_task(step, task)
        train_s = time.perf_counter() - t0 - ctx.timings["memory_s"]
        t1 = time.perf_counter()
        def key_of(t):
            k = strategy.eval_key(step, t)
            return None if k is None else (strategy.name, k)

        from ..distributed import eval_shard

        scored: dict = {}  # every rank scores its share of the row's cells; one sum gives each the whole row
        matrix.add_row(row(ctx.bank, ctx.scorer, ctx.stream, step, lambda t: strategy.eval_router(step, t),
                           task_id=strategy.uses_task_id, key_of=key_of, cache=self._cells.setdefault(ctx.seed, {}),
                           pooled=self._pooled.setdefault(ctx.seed, {}), shard=eval_shard(), scored=scored))
        return {"task": task.name, "train_s": round(train_s, 3), "eval_s": round(time.perf_counter() - t1, 3),
                "eval_examples": scored.get("examples", 0),
                "memory_s": round(ctx.timings["memory_s"], 3), "steps": fit.get("steps"),
                "best_val_acc": fit.get("best_val_acc"), **({"reused": True} if fit.get("reused") else {}),
                **{k: round(v, 3) for k, v in ctx.timings.items() if k.startswith("local_adapt")}}

    def _commit(self, strategy, folder: Path, done: int, matrix, timings, n: int, accuracies=None) -> None:
        ctx = strategy.ctx
        name = f"step{done}"
        phase("continual-save", f"{strategy.name}:{name}")
        ckpt = folder / "ckpt" / name
        if ckpt.exists():  # left by a run killed before its state named it: write it again in full
            import shutil

            shutil.rmtree(ckpt)
        ctx.bank.save(ckpt / "bank")
        if ctx.memory is not None:
            ctx.memory.save(ckpt / "memory")
        write_state(folder / "state.json", {
            "strategy": strategy.name, "seed": ctx.seed, "scenario": ctx.stream.scenario, "tasks": ctx.stream.names,
            "done": done, "finished": done == n, "ckpt": name,
            "matrix": None if accuracies is not None else matrix.to_dict(), "accuracies": accuracies,
            "timings": timings, "state": strategy.state_dict()})
        prune_checkpoints(folder, name)

    def _run_joint(self, strategy, folder: Path, stream: Stream, matrix, bar) -> None:
        from .evaluate import task_accuracy

        ctx = strategy.ctx
        bar.set_description(f"{strategy.name} seed {ctx.seed}: all tasks")
        t0 = time.perf_counter()
        fit = strategy.train_stream() or {}
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        last = len(stream) - 1
        from ..distributed import eval_shard

        shard = eval_shard()  # every rank scores its share of each task; the counts are summed
        accs = {t.name: task_accuracy(ctx.bank, ctx.scorer, t, strategy.eval_router(last, t),
                                      stream.eval_space(last, t), shard=shard) for t in stream.tasks}
        if not self.writer:  # rank zero writes
            return
        timing = {"task": "joint", "train_s": round(train_s, 3), "eval_s": round(time.perf_counter() - t1, 3),
                  "memory_s": 0.0, "steps": fit.get("steps"), "best_val_acc": fit.get("best_val_acc")}
        self._commit(strategy, folder, len(stream), matrix, [timing], len(stream), accuracies=accs)
        bar.update(len(stream))
        self.log(f"{strategy.name} seed {ctx.seed}: " + " ".join(f"{t}={a:.3f}" for t, a in accs.items()))


def _temp_of_run_file(name: str) -> bool:
    """A temporary file an atomic write of run.json leaves when killed before its rename (``mtpeft.io``)."""
    return name.startswith(".run.json.") and name.endswith(".tmp")


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="continual", unit="task", disable=not enabled, leave=True)


def run_continual(conf: dict, out: str | Path, strategies: Sequence[str], seeds: Sequence[int], *,
                  resume: bool = False, command: str = "", progress: bool = True, log=None, parallel=None) -> dict:
    """Run ``strategies`` x ``seeds`` on the config's stream into ``out``; returns the report (``report.json``;
    ``{}`` on a rank other than zero of a distributed run, see ``ContinualRun``)."""
    return ContinualRun(conf, out, resume=resume, command=command, progress=progress, log=log,
                        parallel=parallel).run(strategies, seeds)


__all__ = ["ContinualRun", "run_continual"]
