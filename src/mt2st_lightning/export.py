"""``save_single_task``: the deployable primary-only model, once the auxiliary heads are gone."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from torch import Tensor

from mt2st_lightning import internals
from mt2st_lightning.mixin import MT2STMixin

__all__ = ["save_single_task"]

log = logging.getLogger("mt2st_lightning")


def save_single_task(trainer: pl.Trainer, module: MT2STMixin, path: str | Path) -> Path | None:
    """Save ``module`` without its dropped heads, loadable with ``Model.load_from_checkpoint(path, strict=False)``.

    ``path`` is absolute or relative to the run's log directory. Call it on every rank (only rank 0 writes).
    Under FSDP2 the file holds the full, unsharded tensors, gathered from every rank one tensor at a time and kept
    on rank 0's CPU only (the dropped heads are not gathered): an unsharded model loads it. Returns where it was
    saved, or ``None`` (with a warning) if no head was dropped.
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
    state = module.single_task_state_dict()
    sharded = any(internals.is_dtensor(v) for v in state.values())
    if sharded:
        state = _gather_on_rank_zero(trainer, state)
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": dict(getattr(module, "hparams", {})),
        "mt2st": {"primary_task": module.primary_task, "dropped_tasks": sorted(module.dropped_tasks)},
        "pytorch-lightning_version": pl.__version__,
    }
    if sharded:
        # One file, not the strategy's distributed-checkpoint folder.
        if trainer.is_global_zero:
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        trainer.strategy.barrier("mt2st_save_single_task")
    else:
        trainer.strategy.save_checkpoint(checkpoint, path)
    if trainer.is_global_zero:
        log.info("MT2ST: saved the single-task model to %s", path)
    return path


def _gather_on_rank_zero(trainer: pl.Trainer, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """FSDP2: the full, unsharded tensors of ``state``, on the CPU of rank 0 (empty on the other ranks). Every
    rank takes part in one all-gather per sharded tensor, in the same order; each full tensor lives on the
    device only until rank 0 has copied it, so no rank holds more than one of them there, and the other ranks
    keep no copy (as ``StateDictOptions(full_state_dict=True, cpu_offload=True)`` does)."""
    full = {}
    for key, value in state.items():
        tensor = value.full_tensor() if internals.is_dtensor(value) else value
        if trainer.is_global_zero:
            full[key] = tensor.cpu()
    return full
