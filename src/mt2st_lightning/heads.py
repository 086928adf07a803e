"""Carrying out a drop.

:func:`drop_heads` is the one public function that takes auxiliary heads out of a training run for good:
freeze them, free their gradients and optimizer state, optionally release their weights, and rebuild the DDP
reducer so that plain DDP stops waiting for their gradients (under FSDP2 a head that is not called runs no
collective, so there is nothing to rebuild). ``MT2STCallback`` calls it when its policy says
a task is finished, and when a resumed fit re-applies the drops its checkpoint records; nothing else drops a
head. The Lightning and PyTorch internals it needs live in :mod:`~mt2st_lightning.internals`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from mt2st_lightning.internals import ddp_comm_hook, remove_ddp_autograd_hooks, saves_distributed_checkpoint

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


def check_can_drop(strategy: Strategy, release_heads: bool = False) -> None:
    """Refuse, before training, a strategy under which a head cannot be dropped, saying what to use instead.

    Supported: single-device training, DDP, FSDP2 through ``ModelParallelStrategy`` with
    ``tensor_parallel_size=1`` (shard the module with :func:`~mt2st_lightning.sharding.fully_shard_tasks`), and
    Lightning's FSDP1 (``strategy="fsdp"``) with ``use_orig_params=True``, without ``release_heads``. How the
    heads are sharded is checked once the module is (:func:`~mt2st_lightning.sharding.check_head_units`).
    """
    name = type(strategy).__name__
    if "DeepSpeed" in name:  # a DDPStrategy subclass; DeepSpeed itself may not be installed
        raise RuntimeError(
            "MT2STCallback does not drop heads under DeepSpeed: ZeRO partitions flattened groups of parameters "
            "across ranks, so one head can neither stop training alone nor give its memory back. Shard with FSDP2 "
            "instead: strategy=ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1), and "
            "call mt2st_lightning.sharding.fully_shard_tasks(self) in the module's configure_model"
        )
    if isinstance(strategy, ModelParallelStrategy):
        _check_fsdp2(strategy)
        return
    if isinstance(strategy, FSDPStrategy):
        _check_fsdp1(strategy, release_heads)
        return
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise RuntimeError(
            f"MT2STCallback drops auxiliary heads under single-device training, DDP (strategy='ddp', "
            f"'ddp_spawn', ...), FSDP2 (ModelParallelStrategy) and FSDP1 (strategy='fsdp'); {name} is not supported."
        )
    if ddp_comm_hook(strategy) is not None:
        # A stateful hook (PowerSGD's error feedback) is keyed by gradient bucket, and a drop changes the buckets.
        raise RuntimeError(
            "MT2STCallback rebuilds the DDP reducer when it drops a head, which DDP communication hooks "
            "(DDPStrategy(ddp_comm_hook=...)) do not survive; train without the hook"
        )


def _check_fsdp2(strategy: ModelParallelStrategy) -> None:
    # FSDP2 data parallelism only; a full-file checkpoint loses what a resume needs (warned).
    mesh = strategy.device_mesh  # built in setup_environment, before the callback's setup
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise RuntimeError(
            f"MT2STCallback under ModelParallelStrategy supports FSDP2 data parallelism only: tensor parallelism "
            f"(tensor_parallel_size={mesh['tensor_parallel'].size()}) is not supported or tested with head drops. "
            f"Use ModelParallelStrategy(data_parallel_size={mesh.size()}, tensor_parallel_size=1)"
        )
    if not saves_distributed_checkpoint(strategy):
        rank_zero_warn(
            "MT2STCallback under ModelParallelStrategy(save_distributed_checkpoint=False): a checkpoint saved "
            "after a drop cannot be resumed, since Lightning loads such a file's optimizer state before the drops "
            "can be carried out again (it loads the module tensor by tensor, without the state that carries "
            "them). Keep the default save_distributed_checkpoint=True to resume runs"
        )


def _check_fsdp1(strategy: FSDPStrategy, release_heads: bool) -> None:
    # A head can be frozen alone only with use_orig_params=True, and its weights cannot be freed.
    if not strategy.kwargs.get("use_orig_params", False):
        raise RuntimeError(
            "MT2STCallback under strategy='fsdp' (FSDP1) needs FSDPStrategy(use_orig_params=True): with "
            "flattened parameters a unit's parameters must all train or all be frozen, so a head cannot be "
            "frozen alone. Or shard with FSDP2 (ModelParallelStrategy + fully_shard_tasks)"
        )
    if release_heads:
        raise RuntimeError(
            "MT2STCallback(release_heads=True) is not supported under strategy='fsdp' (FSDP1): a head's "
            "weights live in its unit's flat parameter, which FSDP1 does not let go of. Use FSDP2 "
            "(ModelParallelStrategy + fully_shard_tasks), whose shards are freed, or release_heads=False"
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
