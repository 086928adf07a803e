"""``FailureCheckpoint``: Lightning's ``OnExceptionCheckpoint``, once training has started."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from mt2st_lightning.guards import NonFiniteLossError

__all__ = ["FailureCheckpoint"]


class FailureCheckpoint(OnExceptionCheckpoint):
    """Saves the state at the moment a fit stops on an exception (Ctrl-C included), as ``OnExceptionCheckpoint``
    does, but only after the first optimizer step: an error before it (a bad config refused in ``setup``)
    leaves nothing worth keeping, and no file behind. Nor after MT2ST's non-finite guard stops a fit: the weights
    have taken the damaged updates since, and the last checkpoint before them is the one to resume from.
    Removed again when a fit ends normally."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.global_step > 0 and not isinstance(exception, NonFiniteLossError):
            super().on_exception(trainer, pl_module, exception)
