"""Every private Lightning or PyTorch internal ``mt2st_lightning`` touches, one small function each.

Lightning and PyTorch offer no public API for a few things MT2ST needs. Each access is one function here,
named for what it does, and ``tests/test_internals.py`` has one test per function that fails when the
internal changes, so that an upgrade breaks there, by name, rather than somewhere in training. Nowhere else
in ``mt2st_lightning`` reads a private attribute of a foreign object or imports a private name.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "ddp_comm_hook",
    "fsdp2_modules",
    "fsdp2_reshards_after_backward",
    "fsdp2_units",
    "fully_shard_api",
    "is_dtensor",
    "is_fsdp2_module",
    "is_logging_step",
    "logging_step",
    "register_fsdp_forward_method",
    "register_load_state_dict_pre_hook",
    "register_state_dict_post_hook",
    "relaunches_script",
    "remove_ddp_autograd_hooks",
    "saves_distributed_checkpoint",
]


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


# ---------------------------------------------------------------------------------------- FSDP2 (fully_shard)
def _fsdp2_names(*names: str, what: str) -> tuple[Any, ...]:
    """``names`` from ``torch.distributed.fsdp``, public from torch 2.6; PRIVATE (PyTorch) before, in
    ``torch.distributed._composable.fsdp`` (torch 2.4, 2.5). ``what`` needs them: the error names it."""
    import importlib

    for path in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            module = importlib.import_module(path)
        except ImportError:
            continue
        if all(hasattr(module, name) for name in names):
            return tuple(getattr(module, name) for name in names)
    # torch < 2.4, or a build without torch.distributed
    raise ImportError(
        f"{what} needs torch>=2.4 built with torch.distributed, as Lightning's ModelParallelStrategy does; "
        f"this is torch {torch.__version__}: pip install 'torch>=2.4'"
    )


def fully_shard_api() -> tuple[Any, type]:
    """``(fully_shard, FSDPModule)``: public in ``torch.distributed.fsdp`` from torch 2.6; PRIVATE (PyTorch) before,
    in ``torch.distributed._composable.fsdp`` (torch 2.4, 2.5)."""
    fully_shard, fsdp_module = _fsdp2_names("fully_shard", "FSDPModule", what="FSDP2 (fully_shard)")
    return fully_shard, fsdp_module


def register_fsdp_forward_method(module: nn.Module, method_name: str) -> None:
    """Have FSDP2 gather ``module``'s parameters around ``module.<method_name>(...)`` as around its ``forward``
    (``torch.distributed.fsdp.register_fsdp_forward_method``, public from torch 2.6; PRIVATE (PyTorch) before, in
    ``torch.distributed._composable.fsdp``, torch 2.4, 2.5). A no-op on a module that is not an FSDP2 unit."""
    (register,) = _fsdp2_names("register_fsdp_forward_method", what="FSDP2's register_fsdp_forward_method")
    register(module, method_name)


def _own_param_groups(state: Any) -> list[Any]:
    # An FSDP2 state's parameter groups: `_fsdp_param_groups`; older torch: one `_fsdp_param_group`.
    found = getattr(state, "_fsdp_param_groups", None)
    if found is None:
        found = [g for g in (getattr(state, "_fsdp_param_group", None),) if g is not None]
    return list(found)


def is_fsdp2_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` made ``module`` an FSDP2 unit (an ``FSDPModule``, see :func:`fully_shard_api`);
    never on a torch without FSDP2, where nothing can be sharded with it."""
    try:
        _, fsdp_module = fully_shard_api()
    except ImportError:
        return False
    return isinstance(module, fsdp_module)


def fsdp2_modules(module: nn.Module) -> list[nn.Module]:
    """``module`` and those of its submodules that are FSDP2 units (:func:`is_fsdp2_module`), outermost first."""
    return [sub for sub in module.modules() if is_fsdp2_module(sub)]


def _fsdp2_param_groups(module: nn.Module) -> list[Any]:
    # Each FSDP2 state's parameter groups, once each (a state is shared by the modules of fully_shard([a, b])).
    groups: dict[int, Any] = {}
    for sub in fsdp2_modules(module):
        fully_shard, _ = fully_shard_api()
        groups.update((id(g), g) for g in _own_param_groups(fully_shard.state(sub)))
    return list(groups.values())


def fsdp2_reshards_after_backward(unit: nn.Module) -> bool:
    """PRIVATE (PyTorch): ``fully_shard.state(unit)._fsdp_param_groups[i].reshard_after_backward``: whether the
    FSDP2 unit ``unit`` (its own parameters, not its inner units') frees its gathered parameters after a backward,
    which the public ``FSDPModule.set_reshard_after_backward`` sets and nothing public reads."""
    fully_shard, _ = fully_shard_api()
    return all(group.reshard_after_backward for group in _own_param_groups(fully_shard.state(unit)))


def fsdp2_units(module: nn.Module) -> list[list[nn.Parameter]]:
    """PRIVATE (PyTorch): ``fully_shard.state(m)._fsdp_param_groups[i].fsdp_params[j].sharded_param``: the
    parameters of each FSDP2 unit (what one ``fully_shard`` call groups) under ``module``. A unit all-gathers and
    reduce-scatters its parameters together, so a head can only leave the computation alone if it has units of
    its own."""
    return [[fsdp_param.sharded_param for fsdp_param in group.fsdp_params] for group in _fsdp2_param_groups(module)]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 shard): public in ``torch.distributed.tensor`` from torch 2.5;
    PRIVATE (PyTorch) before, in ``torch.distributed._tensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5, or a build without torch.distributed
        try:
            from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
        except ImportError:
            return False
    return isinstance(tensor, DTensor)


def saves_distributed_checkpoint(strategy: Strategy) -> bool:
    """PRIVATE (Lightning): ``ModelParallelStrategy._save_distributed_checkpoint``, its
    ``save_distributed_checkpoint`` argument: whether its checkpoints are folders of shards (the default) or one
    file of full tensors, which it loads tensor by tensor, without the module's extra state."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", True))


def register_load_state_dict_pre_hook(module: nn.Module, hook: Any) -> Any:
    """``module.register_load_state_dict_pre_hook(hook)``, public from torch 2.5; PRIVATE (PyTorch) before:
    ``module._register_load_state_dict_pre_hook(hook, with_module=True)``. ``hook(module, state_dict, prefix,
    local_metadata, strict, missing_keys, unexpected_keys, error_msgs)`` runs before ``module`` loads its own
    tensors and its submodules theirs."""
    public = getattr(module, "register_load_state_dict_pre_hook", None)
    if public is not None:
        return public(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


def register_state_dict_post_hook(module: nn.Module, hook: Any) -> Any:
    """``module.register_state_dict_post_hook(hook)``, public from torch 2.5; PRIVATE (PyTorch) before:
    ``module._register_state_dict_hook(hook)``. ``hook(module, state_dict, prefix, local_metadata)`` runs once
    ``module`` and its submodules have written their entries, and may change them in place."""
    public = getattr(module, "register_state_dict_post_hook", None)
    if public is not None:
        return public(hook)
    return module._register_state_dict_hook(hook)
