"""Carrying out a drop, and every private Lightning or PyTorch internal the library touches.

:func:`drop_heads` is the one public function that takes auxiliary heads out of a training run for good:
freeze them, free their gradients and optimizer state, optionally release their weights, and rebuild the DDP
reducer so that plain DDP stops waiting for their gradients. ``MT2STCallback`` calls it when its policy says
a task is finished; nothing else drops a head.

Lightning and PyTorch offer no public API for a few things MT2ST needs. Each such access is one small
function here, named for what it does, and ``tests/test_internals.py`` has one test per function that fails
when the internal changes. Nowhere else in ``mt2st_lightning`` reads a private attribute of a foreign object.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from mt2st_lightning.mixin import MT2STMixin

__all__ = [
    "check_can_drop",
    "drop_heads",
    "is_logging_step",
    "logging_step",
    "rebuild_ddp_reducer",
    "relaunches_script",
]

log = logging.getLogger("mt2st_lightning")


# ---------------------------------------------------------------------------------------- the public drop
def drop_heads(trainer: pl.Trainer, module: MT2STMixin, tasks: Iterable[str], release: bool = False) -> list[str]:
    """Take the heads of ``tasks`` out of training for good; returns the tasks dropped.

    Freezes each head's parameters (``requires_grad=False``, ``.grad = None``), frees their optimizer state
    in every optimizer of ``trainer``, with ``release`` also frees their weights and buffers, and rebuilds the
    DDP reducer (under DDP) so that it only waits for the parameters that still train. Call it at an
    optimizer-step boundary, on every rank at the same step. A task already dropped is released if asked
    (e.g. ``release=True`` resuming a checkpoint saved without it), otherwise left alone.
    """
    tasks = [t for t in tasks if t not in module.dropped_tasks or (release and t not in module.released_tasks)]
    if not tasks:
        return []
    params = {id(p): p for task in tasks for p in module.drop_task(task, release=release)}
    for optimizer in trainer.optimizers:
        for p in params.values():
            optimizer.state.pop(p, None)
    rebuild_ddp_reducer(trainer.strategy)
    if trainer.is_global_zero:
        log.info("MT2ST: the heads of %s left the computation; active tasks: %s", tasks, list(module.active_tasks))
    return tasks


def check_can_drop(strategy: Strategy) -> None:
    """Refuse, before training, a strategy under which a head cannot be dropped."""
    sharded = "DeepSpeed" in type(strategy).__name__  # a DDPStrategy subclass that shards parameters
    if not (isinstance(strategy, SingleDeviceStrategy) or (isinstance(strategy, DDPStrategy) and not sharded)):
        raise RuntimeError(
            f"MT2STCallback drops auxiliary heads under single-device training and DDP "
            f"(strategy='ddp', 'ddp_spawn', ...); {type(strategy).__name__} is not supported."
        )
    if ddp_comm_hook(strategy) is not None:
        # A stateful hook (PowerSGD's error feedback) is keyed by gradient bucket, and a drop changes the buckets.
        raise RuntimeError(
            "MT2STCallback rebuilds the DDP reducer when it drops a head, which DDP communication hooks "
            "(DDPStrategy(ddp_comm_hook=...)) do not survive; train without the hook"
        )


def rebuild_ddp_reducer(strategy: Strategy) -> bool:
    """Re-wrap the module in DDP so that its reducer only waits for parameters that still need gradients.

    DDP fixes the set of parameters to reduce when it is built; after a head is frozen, plain DDP
    (``find_unused_parameters=False``) would wait for its gradients forever. Rebuilding at a step boundary
    costs one broadcast of the module's state, once per drop, and nothing on later steps. Returns whether a
    DDP wrapper was rebuilt.
    """
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return False
    old = strategy.model
    remove_ddp_autograd_hooks(old)
    strategy.model = old.module
    strategy.configure_ddp()
    return True


# ---------------------------------------------------------------------------------------- the private internals
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
    starts the processes itself."""
    return isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher) and not (
        strategy.cluster_environment is not None and strategy.cluster_environment.creates_processes_externally
    )
