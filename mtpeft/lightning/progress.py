"""The training progress bar: on stderr (stdout holds the command's table or JSON alone), named after the
fit and its tasks, epochs counted from 1."""
from __future__ import annotations

import contextlib
import sys

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

from ..display import printable


class FitProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, written to stderr, its description ``NAME (TASKS) epoch E/N``."""

    def __init__(self, name: str, tasks=(), max_epochs: int = -1):
        super().__init__()
        shown = ", ".join(t.name for t in tasks)
        label = name if not shown or shown in name else f"{name} ({shown[:60]}{'...' if len(shown) > 60 else ''})"
        self.label = printable(label)
        self.max_epochs = max_epochs

    @property
    def train_description(self) -> str:
        return self.label

    @property
    def validation_description(self) -> str:
        return f"{self.label} validation"

    @property
    def sanity_check_description(self) -> str:
        return f"{self.label} sanity check"

    # Lightning builds each bar with file=sys.stdout, read when the bar is made: point it at stderr then.
    def _on_stderr(self, make):
        with contextlib.redirect_stdout(sys.stderr):
            return make()

    def init_sanity_tqdm(self):
        return self._on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self):
        return self._on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self):
        return self._on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self):
        return self._on_stderr(super().init_test_tqdm)

    def init_predict_tqdm(self):
        return self._on_stderr(super().init_predict_tqdm)

    def on_train_epoch_start(self, trainer, *args) -> None:
        # Lightning's, with our description set before the bar first draws (its own says "Epoch 0")
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        of = f"/{self.max_epochs}" if self.max_epochs and self.max_epochs > 0 else ""
        bar.set_description(f"{self.label} epoch {trainer.current_epoch + 1}{of}", refresh=False)
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if self.has_dataloader_changed(dataloader_idx):  # Lightning's, without its "DataLoader 0"
            self.val_progress_bar.reset(total=convert_inf(self.total_val_batches_current_dataloader))
            self.val_progress_bar.initial = 0
