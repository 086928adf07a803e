"""``save_single_task``: the deployable primary-only model, once the auxiliary heads are gone."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl

from mt2st_lightning.mixin import MT2STMixin

__all__ = ["save_single_task"]

log = logging.getLogger("mt2st_lightning")


def save_single_task(trainer: pl.Trainer, module: MT2STMixin, path: str | Path) -> Path | None:
    """Save ``module`` without its dropped heads, loadable with ``Model.load_from_checkpoint(path, strict=False)``.

    ``path`` is absolute or relative to the run's log directory. Call it on every rank (only rank 0 writes).
    Returns where it was saved, or ``None`` (with a warning) if no head was dropped.
    """
    if not module.dropped_tasks:
        pl.utilities.rank_zero_warn(
            f"MT2STCallback(save_single_task={str(path)!r}): no auxiliary head was dropped in this run, so there is "
            "no single-task model to save"
        )
        return None
    path = Path(path)
    if not path.is_absolute():
        path = Path(trainer.log_dir or trainer.default_root_dir) / path
    checkpoint = {
        "state_dict": module.single_task_state_dict(),
        "hyper_parameters": dict(getattr(module, "hparams", {})),
        "mt2st": {"primary_task": module.primary_task, "dropped_tasks": sorted(module.dropped_tasks)},
        "pytorch-lightning_version": pl.__version__,
    }
    trainer.strategy.save_checkpoint(checkpoint, path)
    if trainer.is_global_zero:
        log.info("MT2ST: saved the single-task model to %s", path)
    return path
