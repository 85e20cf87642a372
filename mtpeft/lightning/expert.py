"""The LightningModule that trains bank modules with everything else frozen.

One class serves two phases: fitting one new expert on one task (every task routed to the new
module) and multitask training of one shared module over a mixture (every task routed to it).
Task ids in a batch index ``tasks``; ``module_of_task`` maps them to module ids in the bank.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..routing import Routing


class ExpertModule(L.LightningModule):
    def __init__(self, bank, scorer, tasks: Sequence, module_of_task: Sequence[int], lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__()
        self.bank = bank
        self.scorer = scorer
        self.tasks = list(tasks)
        self.register_buffer("module_of_task", torch.as_tensor(list(module_of_task), dtype=torch.long),
                             persistent=False)
        self.save_hyperparameters("lr", "weight_decay", "warmup_steps")
        n_cls = max(t.num_labels for t in self.tasks)
        self.train_acc = MulticlassAccuracy(num_classes=n_cls, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n_cls, average="micro")
        self.val_loss = MeanMetric()

    def forward(self, texts, task_ids):
        routing = Routing.one_hot(self.module_of_task[task_ids.to(self.module_of_task.device)].cpu())
        return self.scorer.logits(self.bank, texts, [self.tasks[int(i)] for i in task_ids], routing.to(self.device))

    def _common_step(self, batch, stage: str):
        logits = self(batch["text"], batch["task"])
        labels = batch["label"].to(logits.device)
        loss = F.cross_entropy(logits, labels)
        preds = logits.argmax(-1)
        bs = len(batch["text"])
        if stage == "train":
            self.train_acc(preds, labels)
            self.log("train/loss", loss, prog_bar=True, batch_size=bs)
            self.log("train/acc", self.train_acc, prog_bar=True, batch_size=bs)
        else:
            self.val_acc(preds, labels)
            self.val_loss(loss)
            self.log("val/acc", self.val_acc, prog_bar=True, batch_size=bs, add_dataloader_idx=False)
            self.log("val/loss", self.val_loss, batch_size=bs, add_dataloader_idx=False)
        return loss

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        return self._common_step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.bank.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.warmup_steps:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.hparams.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train(self, mode: bool = True):
        super().train(mode)
        self.bank.train(mode)  # keeps the frozen backbone in eval mode
        return self


class KeepBest(L.Callback):
    """Remember the trainable parameters at the best validation score; restore them at the end."""

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
            self.state = {n: copy.deepcopy(p.detach()) for n, p in pl_module.bank.named_parameters()
                          if p.requires_grad}

    def on_fit_end(self, trainer, pl_module):
        if self.state is None:
            return
        with torch.no_grad():
            params = dict(pl_module.bank.named_parameters())
            for n, v in self.state.items():
                params[n].copy_(v)
