"""The one LightningModule every phase that trains runs on.

A phase is a bank, a scorer, the tasks of its data, a router (which modules each example goes to) and an
objective (what is minimised). What trains is whatever has ``requires_grad`` among the bank's modules
and the router's parameters: a new expert with task-id routing (``fit_expert``), one shared module
(``fit_multitask``), gates, routing logits, a selector or fusion weights with the bank frozen, or both.
Bank and router parameters are two optimiser groups, each with its own learning rate.

Checkpoints (``state_dict``, ``trainer.save_checkpoint``) hold the trainable parameters only, never the
frozen backbone, and load back strictly. Task ids in a batch index ``tasks``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..faults import step_fault
from ..io import MtpeftError
from ..modules.base import Stack
from ..routers import Router
from ..routing import RouteContext
from .objectives import make_objective

STAGES = ("train", "val", "test")


class PhaseModule(L.LightningModule):
    def __init__(self, bank, scorer, tasks: Sequence, router: Router, *, objective=None, lr: float = 1e-3,
                 router_lr: float | None = None, weight_decay: float = 0.0, warmup_steps: int = 0, labels=None):
        super().__init__()
        if not isinstance(router, Router):
            raise MtpeftError(f"a phase routes with a router (mtpeft.routers, e.g. TaskIdRouter({{task: module}})), "
                              f"got {type(router).__name__}")
        for name, v in (("lr", lr), ("router_lr", router_lr)):
            if v is not None and not v > 0:
                raise MtpeftError(f"{name} must be a positive learning rate, got {v!r}")
        if not tasks:
            raise MtpeftError("a phase needs at least one task")
        self.bank = bank
        self.router = router  # a submodule: its parameters are the phase's
        self.scorer = scorer
        self.tasks = list(tasks)
        self.objective = make_objective(objective)
        self.labels = labels
        self.save_hyperparameters({"lr": lr, "router_lr": router_lr, "weight_decay": weight_decay,
                                   "warmup_steps": warmup_steps, "router": router.name or type(router).__name__,
                                   "objective": {"name": self.objective.name, **self.objective.get_config()}})
        self._targets = None
        if labels is not None:  # task-local label -> global id, one row per task
            ids = [labels.ids_of(t) for t in self.tasks]
            table = torch.full((len(ids), max(len(i) for i in ids)), -1, dtype=torch.long)
            for k, i in enumerate(ids):
                table[k, : len(i)] = torch.as_tensor(i, dtype=torch.long)
            self._targets = table
        n_cls = len(labels) if labels is not None else max(t.num_labels for t in self.tasks)
        for s in STAGES:  # attributes, not a ModuleDict: "train" is a method name
            setattr(self, f"{s}_acc", MulticlassAccuracy(num_classes=n_cls, average="micro"))
            if s != "train":
                setattr(self, f"{s}_loss", MeanMetric())

    # ---- what trains -------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of everything that trains (bank modules and router), names as in the state dict."""
        out = {}
        for prefix, m in (("bank.", self.bank), ("router.", self.router)):
            out.update({prefix + n: p for n, p in m.named_parameters() if p.requires_grad})
        return out

    def param_groups(self) -> list[dict]:
        """Optimiser groups: bank parameters at ``lr``, router parameters at ``router_lr`` (default ``lr``)."""
        hp = self.hparams
        seen: set[int] = set()
        groups = []
        for name, module, lr in (("bank", self.bank, hp.lr), ("router", self.router, hp.router_lr or hp.lr)):
            params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"name": name, "params": params, "lr": lr})
        if not groups:
            raise MtpeftError("nothing to train: every module of the bank is frozen and the router has no trainable "
                              "parameters (bank.unfreeze(name), or give a router with parameters)")
        return groups

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.param_groups(), weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        if not warmup:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- forward and steps -------------------------------------------------------------------
    def forward(self, texts: Sequence[str], task_ids: Tensor) -> Tensor:
        tasks = [self.tasks[i] for i in task_ids.tolist()]  # one device sync, not one per example
        ctx = RouteContext.for_tasks([t.name for t in tasks], texts=list(texts))
        kw = {"labels": self.labels} if self.labels is not None else {}
        with self.bank.route(self.router, ctx):
            return self.scorer.logits(self.bank, texts, tasks, **kw)

    def targets(self, batch) -> Tensor:
        """Each example's class as a column of the logits (its global id when scoring over a label space)."""
        labels = batch["label"]
        if self._targets is None:
            return labels
        return self._targets[batch["task"].cpu(), labels.cpu()].to(labels.device)

    def _common_step(self, batch, stage: str):
        batch = {**batch, "target": self.targets(batch)}
        with self.objective.capture(self, batch):
            logits = self(batch["text"], batch["task"])
        loss, extra = self.objective(self, batch, logits)
        target = batch["target"].to(logits.device)
        bs = len(batch["text"])
        acc = getattr(self, f"{stage}_acc")
        acc(logits.argmax(-1), target)
        kw = {"batch_size": bs, "add_dataloader_idx": False}
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, **kw)
        else:
            mean = getattr(self, f"{stage}_loss")
            mean(loss)
            self.log(f"{stage}/loss", mean, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=True, **kw)
        for k, v in extra.items():
            self.log(f"{stage}/{k}", v, **kw)
        return loss

    def training_step(self, batch, batch_idx):
        step_fault(self.global_rank)  # inert unless MTPEFT_FAIL_RANK asks (mtpeft.faults)
        loss = self._common_step(batch, "train")
        if not torch.isfinite(loss):  # before backward: a NaN step would make every weight NaN
            raise NonFiniteLoss(self.global_step + 1, float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._common_step(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._common_step(batch, "test")

    def on_fit_start(self):
        # Lightning keeps the train/eval mode it finds: a bank evaluated before (a previous fit's test
        # accuracy) would train in eval mode, without its modules' dropout, so a fit's result would depend
        # on what the process did before it (and a resumed run would differ from an uninterrupted one)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.bank.train(mode)  # keeps the frozen backbone in eval mode
        return self

    # ---- checkpoints of the trainable parameters only -----------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = OrderedDict() if destination is None else destination
        for n, p in self.trainable_parameters().items():
            out[prefix + n] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Copy saved trainable parameters back. Strict (the default): the keys must be exactly what trains now."""
        own = self.trainable_parameters()
        missing = sorted(set(own) - set(state_dict))
        unknown = sorted(set(state_dict) - set(own))
        if strict and (missing or unknown):
            raise MtpeftError(
                f"checkpoint does not fit this phase: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                f"unexpected {unknown[:3]}{' ...' if len(unknown) > 3 else ''} ({len(missing)} missing, "
                f"{len(unknown)} unexpected); load it into a phase with the same bank modules trainable and the "
                "same router")
        for k in set(own) & set(state_dict):
            if tuple(state_dict[k].shape) != tuple(own[k].shape):
                raise MtpeftError(f"checkpoint tensor {k} has shape {tuple(state_dict[k].shape)}, this phase's "
                                  f"has {tuple(own[k].shape)}")
        with torch.no_grad():
            for k in set(own) & set(state_dict):
                own[k].copy_(state_dict[k])
        for m in self.bank.modules():  # stacked copies of frozen experts are cached: drop them
            if isinstance(m, Stack):
                m.invalidate()
        return nn.modules.module._IncompatibleKeys(missing, unknown)

    def snapshot(self) -> dict[str, Tensor]:
        """A detached copy of every trainable parameter (``load_state_dict`` puts it back)."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters().items()}


class NonFiniteLoss(MtpeftError):
    """A training step's loss is NaN or infinite (``step`` counts from 1); the fit stops there."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"the training loss is {loss} at step {step}, not a finite number; lower the learning "
                         "rate (e.g. 10 times) or check the inputs")
        self.step, self.loss = step, loss


class KeepBest(L.Callback):
    """Remember what trains (bank and router parameters) at the best validation score; restore it at fit end."""

    def __init__(self, monitor: str = "val/acc"):
        self.monitor = monitor
        self.best: float | None = None
        self.state: dict | None = None
        self.best_epoch = -1

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        score = float(score)
        if self.best is None or score > self.best:
            self.best, self.best_epoch = score, trainer.current_epoch
            self.state = pl_module.snapshot()

    def on_fit_end(self, trainer, pl_module):
        if self.state is not None:
            pl_module.load_state_dict(self.state)

    def state_dict(self):
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state_dict):
        self.best, self.best_epoch, self.state = state_dict["best"], state_dict["best_epoch"], state_dict["state"]
