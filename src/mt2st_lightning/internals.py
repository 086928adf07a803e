"""Every private Lightning or PyTorch internal ``mt2st_lightning`` touches, one small function each.

Lightning and PyTorch offer no public API for a few things MT2ST needs. Each access is one function here,
named for what it does, and ``tests/test_internals.py`` has one test per function that fails when the
internal changes, so that an upgrade breaks there, by name, rather than somewhere in training. Nowhere else
in ``mt2st_lightning`` reads a private attribute of a foreign object or imports a private name.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import Strategy
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ddp_comm_hook", "is_logging_step", "logging_step", "relaunches_script", "remove_ddp_autograd_hooks"]


def remove_ddp_autograd_hooks(ddp: DistributedDataParallel) -> None:
    """PRIVATE (PyTorch): ``DistributedDataParallel._remove_autograd_hooks``. The old reducer's hooks stay on the
    parameters until it is garbage-collected, and would fire into a dead reducer; remove them now."""
    remove = getattr(ddp, "_remove_autograd_hooks", None)
    if remove is not None:  # absent before torch 2.2, where the reducer's destructor removes them
        remove()


def ddp_comm_hook(strategy: Strategy) -> Any:
    """PRIVATE (Lightning): ``DDPStrategy._ddp_comm_hook``, the communication hook the user registered."""
    return getattr(strategy, "_ddp_comm_hook", None)


def is_logging_step(trainer: pl.Trainer) -> bool:
    """PRIVATE (Lightning): ``trainer._logger_connector.should_update_logs``: whether the coming optimizer step
    is one on which Lightning writes to its loggers (every ``log_every_n_steps``), as ``LearningRateMonitor``
    asks it."""
    return trainer._logger_connector.should_update_logs


def logging_step(trainer: pl.Trainer) -> int:
    """PRIVATE (Lightning): ``trainer.fit_loop.epoch_loop._batches_that_stepped``: the step index Lightning's own
    ``self.log`` writes metrics at (``LearningRateMonitor`` uses it too)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def relaunches_script(strategy: Strategy) -> bool:
    """PRIVATE (Lightning): whether the strategy's launcher is ``_SubprocessScriptLauncher``, which starts one
    process per extra device by re-running the command line (``strategy="ddp"``), unless a cluster (SLURM)
    starts the processes itself. (The Hydra app asks it; the callback does not.)"""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    return isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher) and not (
        strategy.cluster_environment is not None and strategy.cluster_environment.creates_processes_externally
    )
