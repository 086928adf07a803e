"""Carrying out a drop.

:func:`drop_heads` is the one public function that takes auxiliary heads out of a training run for good:
freeze them, free their gradients and optimizer state, optionally release their weights, and rebuild the DDP
reducer so that plain DDP stops waiting for their gradients. ``MT2STCallback`` calls it when its policy says
a task is finished, and when a resumed fit re-applies the drops its checkpoint records; nothing else drops a
head. The Lightning and PyTorch internals it needs live in :mod:`~mt2st_lightning.internals`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel

from mt2st_lightning.internals import ddp_comm_hook, remove_ddp_autograd_hooks

if TYPE_CHECKING:
    from mt2st_lightning.mixin import MT2STMixin

__all__ = ["check_can_drop", "drop_heads", "rebuild_ddp_reducer"]

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
