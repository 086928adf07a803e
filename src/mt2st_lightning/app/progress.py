"""``EpochLines``: progress as one log line per epoch, for output that goes to a file rather than a terminal."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

__all__ = ["EpochLines"]

log = logging.getLogger(__name__)


class EpochLines(ProgressBar):
    """A Lightning progress bar that writes one line per epoch through Python logging (so it lands in the
    run's ``train.log`` and on the console), instead of redrawing a bar: a 12-run sweep's log stays small.

    Each line: epoch, optimizer step and the metrics logged with ``prog_bar=True`` (training loss, validation
    loss and accuracy). On rank 0 only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation ran inside the epoch already: its metrics are in the line too.
        if not self._enabled or not trainer.is_global_zero:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
        steps = trainer.estimated_stepping_batches
        total = f"/{int(steps)}" if math.isfinite(steps) else ""
        log.info(
            "epoch %d%s, step %d%s: %s", trainer.current_epoch + 1, epochs, trainer.global_step, total,
            ", ".join(f"{k} {_format(v)}" for k, v in metrics.items()),
        )

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            log.info("test: %d batches", sum(trainer.num_test_batches))


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
