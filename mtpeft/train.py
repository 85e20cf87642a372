"""High-level phases: any phase that trains (``fit_phase``: a router, what trains, an objective), one expert,
a shared multitask module; evaluation with task-id routing."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import MtpeftError
from .routing import Routing


@dataclass
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 16
    max_epochs: int = 3
    max_steps: int = -1
    patience: int = 2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    val_check_interval: float | int | None = None
    seed: int = 0  # the run's seed; each fit derives its own from it and the fit's name (fit_seed)
    progress: bool = True
    run_dir: str | None = None  # Lightning's CSV logs of each fit under <run_dir>/<fit name>/ (None: no logs)
    # where each fit runs (mtpeft.distributed.Parallel): devices processes on each of num_nodes nodes;
    # batch_size stays the global batch (each of the N ranks takes batch_size / N)
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto (DDP on several processes) or ddp
    accelerator: str = "auto"  # auto, cpu, gpu, cuda

    def parallel(self):
        from .distributed import Parallel

        return Parallel(self.devices, self.num_nodes, self.strategy, self.accelerator)


def fit_seed(seed: int, name: str) -> int:
    """The seed of one fit: a stable hash of the run's seed and the fit's name (the same on every machine and
    run, different for each fit), for ``seed_everything`` and the data order."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _trainer(cfg: TrainConfig, callbacks, seed: int, name: str, tasks: Sequence = (), find_unused: bool = True):
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from .lightning.progress import FitProgressBar

    L.seed_everything(seed, workers=True, verbose=False)
    # checked after each validation, not at the end of each training epoch: a run capped by max_steps
    # before its first validation has no val/acc yet, and that must not stop (or crash) the fit
    cb = [EarlyStopping(monitor="val/acc", mode="max", patience=cfg.patience, check_on_train_epoch_end=False),
          *callbacks]
    if cfg.progress:  # on stderr, named after the fit and its tasks, epochs from 1
        cb.append(FitProgressBar(name, tasks, cfg.max_epochs))
    kw = {}
    if cfg.val_check_interval is not None:
        kw["val_check_interval"] = cfg.val_check_interval
        if isinstance(cfg.val_check_interval, int):  # every N steps, across epoch boundaries
            kw["check_val_every_n_epoch"] = None
    logger = False
    if cfg.run_dir is not None:
        from lightning.pytorch.loggers import CSVLogger

        # version "": the files land in <run_dir>/<name>/ itself (metrics.csv, hparams.yaml), one row per step
        logger = CSVLogger(save_dir=os.fspath(cfg.run_dir), name=name, version="")
        kw["log_every_n_steps"] = 1
    return L.Trainer(max_epochs=cfg.max_epochs, max_steps=cfg.max_steps, callbacks=cb, logger=logger,
                     enable_checkpointing=False, enable_progress_bar=cfg.progress, enable_model_summary=False,
                     num_sanity_val_steps=0, deterministic=False, **cfg.parallel().trainer_kwargs(find_unused), **kw)


@contextlib.contextmanager
def _quiet_lightning():
    """Silence Lightning's banner lines and known-harmless warnings for the length of one fit."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for msg in (r".*module\(s\) in eval mode.*", r".*LeafSpec.*", r".*does not have many workers.*",
                    r".*litlogger.*", r".*smaller than the logging interval.*"):
            warnings.filterwarnings("ignore", message=msg)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def fit_phase(bank, scorer, tasks: Sequence, router, cfg: TrainConfig | None = None, *, objective=None,
              router_lr: float | None = None, name: str = "phase", sampling: str = "proportional", labels=None,
              callbacks: Sequence = (), datamodule=None) -> dict:
    """Train whatever has ``requires_grad`` among the bank's modules and ``router``'s parameters on ``tasks``,
    routed by ``router``, minimising ``objective`` (default cross-entropy); keep the best validation state.

    ``name`` names the fit: its seed is ``fit_seed(cfg.seed, name)`` and, with ``cfg.run_dir``, its logs
    go to ``<run_dir>/<name>/metrics.csv``. On a failed or interrupted fit every trainable parameter is put
    back as it was. ``callbacks``: more Lightning callbacks (run before the one that keeps the best state).
    ``datamodule``: the batches (default: a ``TaskDataModule`` over ``tasks`` with ``sampling``); the task
    ids of its batches index ``tasks``. Returns best_val_acc, best_epoch, steps, train_seconds, seed.
    """
    from .lightning import KeepBest, PhaseModule, TaskDataModule
    from .lightning.phase import NonFiniteLoss

    cfg = cfg or TrainConfig()
    tasks = list(tasks)
    parallel = cfg.parallel()
    parallel.check_batch(cfg.batch_size)
    if parallel.distributed and datamodule is not None and not _splits_itself(datamodule):
        from .lightning.data import RankShards

        datamodule = RankShards(datamodule)  # each rank its slice of the module's own batches
    torch.set_num_threads(max(1, torch.get_num_threads()))
    module = PhaseModule(bank, scorer, tasks, router, objective=objective, lr=cfg.lr, router_lr=router_lr,
                         weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, labels=labels)
    module.param_groups()  # nothing to train: say so before Lightning starts
    seed = fit_seed(cfg.seed, name)
    dm = datamodule or TaskDataModule(tasks, batch_size=cfg.batch_size, sampling=sampling, seed=seed)
    steps_per_epoch = max(1, len(dm.train_dataloader()))
    if cfg.val_check_interval is None and cfg.max_steps > 0:
        # validate about once an epoch, at steps that land on the cap, so the last steps are not thrown away
        n_val = -(-cfg.max_steps // steps_per_epoch)
        cfg = dataclasses.replace(cfg, val_check_interval=max(1, cfg.max_steps // n_val))
    keep = KeepBest()
    before = module.snapshot()
    t0 = time.perf_counter()
    try:
        with _quiet_lightning():
            trainer = _trainer(cfg, [*callbacks, keep], seed, name, tasks, find_unused=_may_leave_out(bank, router))
            trainer.fit(module, datamodule=dm)
        _check_finite(module, name, trainer.global_step)
    except NonFiniteLoss as e:
        module.load_state_dict(before, strict=False)
        raise MtpeftError(f"training of {name!r} stopped at step {e.step}: the loss is {e.loss}, not a finite "
                          f"number; nothing of {name!r} is kept (the rest of the bank and the saved files are as "
                          "they were). Lower the learning rate (--lr, e.g. 10 times lower) or check the inputs") from e
    except BaseException:
        module.load_state_dict(before, strict=False)  # what trains is as it was before the fit
        raise
    return {"best_val_acc": None if keep.best is None else round(keep.best, 6), "best_epoch": keep.best_epoch, "steps": trainer.global_step,
            "train_seconds": round(time.perf_counter() - t0, 2), "seed": seed}


def _splits_itself(datamodule) -> bool:
    """A ``TaskDataModule`` whose batches and evaluation splits are its own: they split over ranks already."""
    from .lightning import TaskDataModule

    t = type(datamodule)
    return all(getattr(t, f, None) is getattr(TaskDataModule, f) for f in ("train_dataloader", "_eval"))


def _may_leave_out(bank, router) -> bool:
    """Whether a step may use only some of what trains (DDP must then look for unused parameters): more
    than one bank module trains, or the router trains alongside bank modules."""
    training = [n for n in bank.names if any(p.requires_grad for p in bank.module_parameters(n).values())]
    router_trains = any(p.requires_grad for p in router.parameters())
    return len(training) > 1 or (router_trains and bool(training))


def _check_finite(module, name: str, steps: int) -> None:
    """A fit whose kept weights hold NaN or infinity (an overflowing update) counts as a non-finite loss."""
    from .lightning.phase import NonFiniteLoss

    for pname, p in module.trainable_parameters().items():
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteLoss(steps, float("nan")) from MtpeftError(f"{pname} of {name!r} is not finite")


def fit_expert(bank, scorer, task, name: str | None = None, module_type: str = "lora", config=None,
               cfg: TrainConfig | None = None) -> dict:
    """Add a module for ``task`` to the bank and train it alone (everything else frozen); freeze it after."""
    from .routers import TaskIdRouter

    cfg = cfg or TrainConfig()
    name = name or f"{task.name}-{module_type}"
    bank.freeze()
    bank.add(name, module_type, config, task=task.name, seed=cfg.seed)
    try:
        metrics = fit_phase(bank, scorer, [task], TaskIdRouter({task.name: name}), cfg, name=name)
    except BaseException:
        bank.remove(name)  # a failed or interrupted fit leaves the bank as it was
        raise
    finalize = getattr(bank, "finalize", None)
    if finalize is not None:
        finalize(name)
    bank.freeze(name)
    bank.record(name).metrics.update(metrics)
    return metrics


def fit_multitask(bank, scorer, tasks: Sequence, name: str = "multitask", module_type: str = "lora", config=None,
                  cfg: TrainConfig | None = None, sampling: str = "proportional") -> dict:
    """Train one shared module on a mixture of tasks."""
    from .routers import TaskIdRouter

    cfg = cfg or TrainConfig()
    tasks = list(tasks)
    bank.freeze()
    bank.add(name, module_type, config, task=None, seed=cfg.seed,
             metadata={"tasks": [t.name for t in tasks], "sampling": sampling})
    try:
        metrics = fit_phase(bank, scorer, tasks, TaskIdRouter({t.name: name for t in tasks}), cfg, name=name,
                            sampling=sampling)
    except BaseException:
        bank.remove(name)
        raise
    bank.freeze(name)
    bank.record(name).metrics.update(metrics)
    return metrics


@torch.no_grad()
def predict(bank, scorer, task, routing_for_batch=None, split: str = "test", batch_size: int = 64,
            progress: bool = False, shard: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels on a split. ``routing_for_batch(n) -> Routing`` (None: bare backbone).
    ``shard=(r, n)``: only the examples r, r+n, r+2n, ... (rank r of n's share)."""
    from tqdm.auto import tqdm

    ds = task.splits[split]
    if shard is not None:
        ds = ds.select(range(shard[0], len(ds), shard[1]))
    texts, labels = ds["text"], torch.tensor(ds["label"])
    preds = []
    bank.eval()
    starts = range(0, len(texts), batch_size)
    from .display import printable

    for s in tqdm(starts, desc=printable(f"{task.name}/{split}"), disable=not progress, leave=False):
        chunk = texts[s: s + batch_size]
        routing = routing_for_batch(len(chunk)) if routing_for_batch is not None else None
        if routing is None:
            with bank.disabled():
                logits = scorer.logits(bank, chunk, task)
        else:
            logits = scorer.logits(bank, chunk, task, routing)
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long), labels


def evaluate(bank, scorer, task, module: str | int | None = None, split: str = "test", batch_size: int = 64,
             progress: bool = False, shard: tuple[int, int] | None = None) -> dict:
    """Accuracy on ``split``: with task-id routing to ``module`` (a name or id), or the bare backbone (None).
    ``shard=(rank, world)``: a collective over the process group: each rank predicts its share and the
    counts are summed, so every rank returns the accuracy on the whole split."""
    routing_for_batch = None
    if module is not None:
        mid = module if isinstance(module, int) else bank.index(module)
        routing_for_batch = lambda n: Routing.one_hot([mid] * n).to(bank.device)
    return split_accuracy(bank, scorer, task, routing_for_batch, split, batch_size, progress, shard)


def split_accuracy(bank, scorer, task, routing_for_batch=None, split: str = "test", batch_size: int = 64,
                   progress: bool = False, shard: tuple[int, int] | None = None) -> dict:
    """The row ``evaluate`` returns (task, split, accuracy, n, majority) for any ``routing_for_batch(n)``
    (a Routing or a router; None: the bare backbone); ``shard`` as in ``evaluate``."""
    preds, labels = predict(bank, scorer, task, routing_for_batch, split, batch_size, progress, shard)
    correct, n = int((preds == labels).sum()), len(labels)
    if shard is not None:
        from .distributed import all_sum

        correct, n = all_sum([correct, n])
    # from integer counts, as a Python float: 47/100 is 0.47, not float32's 0.4699999988079071
    acc = correct / n if n else 0.0
    return {"task": task.name, "split": split, "accuracy": acc, "n": n,
            "majority": task.majority_baseline(split)}


def default_threads() -> None:
    """Use every core for intra-op parallelism (the default on some builds is fewer), unless the user set
    OMP_NUM_THREADS: that count is kept (results are bit-reproducible only at one thread count, and a
    shared machine is much faster with fewer threads than cores)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return
    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)


def expert_vs_zero_shot(bank, scorer, task, module_type: str = "lora", config=None,
                        cfg: TrainConfig | None = None, split: str = "test") -> dict:
    """Zero-shot accuracy of the bare backbone, then a new expert trained on ``task`` and routed by task id.

    One row of the quickstart and README table: task, n, majority, zero_shot, expert, steps, train_s.
    """
    zero = evaluate(bank, scorer, task, None, split=split)
    fit = fit_expert(bank, scorer, task, f"{task.name}-{module_type}", module_type, config, cfg)
    ex = evaluate(bank, scorer, task, f"{task.name}-{module_type}", split=split)
    bank.record(f"{task.name}-{module_type}").metrics.update({"test_acc": ex["accuracy"], "test_n": ex["n"]})
    return {"task": task.name, "n": ex["n"], "labels": task.num_labels, "majority": round(ex["majority"], 4),
            "zero_shot": round(zero["accuracy"], 4), "expert": round(ex["accuracy"], 4),
            "best_val": fit["best_val_acc"], "steps": fit["steps"], "train_s": fit["train_seconds"]}
