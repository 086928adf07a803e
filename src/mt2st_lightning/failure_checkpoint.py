"""``FailureCheckpoint``: Lightning's ``OnExceptionCheckpoint``, once training has started."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import OnExceptionCheckpoint

__all__ = ["FailureCheckpoint"]


class FailureCheckpoint(OnExceptionCheckpoint):
    """Saves the state at the moment a fit stops on an exception (Ctrl-C included), as ``OnExceptionCheckpoint``
    does, but only after the first optimizer step: an error before it (a bad config refused in ``setup``)
    leaves nothing worth keeping, and no file behind. Removed again when a fit ends normally."""

    def on_exception(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step > 0:
            super().on_exception(trainer, *args, **kwargs)
