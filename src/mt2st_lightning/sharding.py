"""Sharding an MT2ST module with FSDP2 so that a drop frees something.

FSDP2 (``torch.distributed.fsdp.fully_shard``) groups parameters into *units*: each ``fully_shard`` call makes
one, which all-gathers its parameters before forward and reduce-scatters their gradients after backward, as a
whole. A dropped auxiliary head stops costing anything only if its parameters form units of their own: then
the head is not called, its unit neither all-gathers nor reduce-scatters, and its shards can be freed.
:func:`fully_shard_tasks` shards a :class:`~mt2st_lightning.mixin.MT2STMixin` module that way (each given
encoder block, each task head, then the LightningModule itself as the one root unit, whose step methods FSDP2
treats as forwards); :func:`check_head_units` refuses, before training, a module sharded otherwise (by FSDP2 or
by Lightning's FSDP1 auto-wrap), where a drop could free nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mt2st_lightning import internals
from mt2st_lightning.mixin import MT2STMixin, mt2st_module

__all__ = ["check_head_units", "fully_shard_tasks", "root_kept_gathered"]


# The LightningModule methods Lightning calls instead of ``forward`` (ModelParallelStrategy calls them on the module
# itself, unwrapped): FSDP2 gathers the root unit's parameters around each, as around a forward.
_STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def fully_shard_tasks(
    module: nn.Module, *, mesh: Any = None, encoder_units: Iterable[nn.Module] = (), **fully_shard_kwargs: Any
) -> None:
    """Shard an ``MT2STMixin`` LightningModule with FSDP2 so that a drop can free something.

    Each module in ``encoder_units`` (e.g. the transformer blocks) becomes a unit of its own, each declared task
    head (the primary's too) a unit of its own, and then the LightningModule itself the root unit, which holds
    every parameter no other unit does (e.g. embeddings, positions, a final norm, parameters registered on the
    module itself). Call it from the module's ``configure_model`` under Lightning's ``ModelParallelStrategy``::

        def configure_model(self):
            fully_shard_tasks(self, encoder_units=self.encoder.layers)

    Lightning calls ``training_step`` (and ``validation_step``, ``test_step``, ``predict_step``) on the module
    itself, not its ``forward``: each is registered as a forward method of the root
    (``torch.distributed.fsdp.register_fsdp_forward_method``). So every step enters through the one root, whose
    parameters are gathered for the whole step, and every inner unit (each encoder unit, each head) gathers its
    parameters when it is called and frees them again after its forward (FSDP2 reshards every unit but the root
    after forward) and after its backward: between forward and backward a rank holds only the root's and the
    running unit's full parameters, not the whole model's. A head that is not called (a dropped one) gathers
    nothing.

    Args:
        module: the LightningModule, after ``declare_tasks``.
        mesh: the data-parallel device mesh; by default the ``"data_parallel"`` dimension of the strategy's mesh
            (``self.device_mesh``), or, without one, PyTorch's default (all ranks).
        encoder_units: submodules to shard as units of their own, e.g. an encoder's blocks.
        **fully_shard_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``, ``mp_policy``, ...).

    Units are sharded innermost first, as FSDP2 requires; a unit that is already an FSDP2 unit (e.g. a head the
    user sharded first) is left as it is, and so is a module sharded by an earlier call: a second call (Lightning
    calls ``configure_model`` again before testing) changes nothing.
    """
    mixin = mt2st_module(module)
    fully_shard, _ = internals.fully_shard_api()
    if internals.is_fsdp2_module(module):  # sharded by an earlier call: configure_model must be idempotent
        return
    if mesh is None:
        mesh = _data_parallel_mesh(module)
    depth = {id(sub): name.count(".") + 1 if name else 0 for name, sub in module.named_modules(remove_duplicate=False)}
    units = [*encoder_units, *(mixin.task_head(task) for task in mixin.tasks)]
    for unit in units:
        if id(unit) not in depth:
            raise ValueError(f"fully_shard_tasks: {type(unit).__name__} is not a submodule of {type(module).__name__}")
        if unit is module:
            raise ValueError("fully_shard_tasks: list submodules of the module as units, not the module itself")
    # Innermost first: a unit's parameters are those of its subtree that no unit sharded before it holds.
    for unit in sorted(units, key=lambda u: -depth[id(u)]):
        held = {id(p) for m in internals.fsdp2_modules(unit) for p in m.parameters()}
        if not internals.is_fsdp2_module(unit) and any(id(p) not in held for p in unit.parameters()):
            fully_shard(unit, mesh=mesh, **fully_shard_kwargs)
    fully_shard(module, mesh=mesh, **fully_shard_kwargs)  # the root: what is left
    for name in _STEP_METHODS:
        internals.register_fsdp_forward_method(module, name)


@contextlib.contextmanager
def root_kept_gathered(module: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 root's own parameters gathered through backward passes run before the step's own (the
    policies' measurements of each task's gradient, ``torch.autograd.grad`` of each task's loss).

    Every backward ends with FSDP2's root post-backward callback, which reshards each unit. An inner unit gathers
    its parameters again for the next backward (its hook is on its output), but the root's are gathered by its
    pre-forward only (its backward hook is on the step's output, the summed loss), so a second backward through
    them (the text transformer's embedding, for one) would read freed storage. Kept gathered, they are freed by
    the step's own backward, as without a measurement. Nothing to do for a module that is not an FSDP2 root."""
    if not internals.is_fsdp2_module(module):
        yield
        return
    reshards = internals.fsdp2_reshards_after_backward(module)
    module.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        module.set_reshard_after_backward(reshards, recurse=False)


def _data_parallel_mesh(module: nn.Module) -> Any:
    # LightningModule.device_mesh: set by ModelParallelStrategy before configure_model (None otherwise).
    mesh = getattr(module, "device_mesh", None)
    if mesh is None:
        return None
    dims = mesh.mesh_dim_names or ()
    if "tensor_parallel" in dims and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "fully_shard_tasks shards over the data-parallel dimension only, and tensor parallelism is not "
            "supported with MT2ST: use ModelParallelStrategy(tensor_parallel_size=1)"
        )
    return mesh["data_parallel"] if "data_parallel" in dims else mesh


def check_head_units(module: MT2STMixin, trained: nn.Module | None = None) -> None:
    """Refuse a module in which an auxiliary head shares an FSDP unit (FSDP2, or FSDP1's wrapped modules) with
    anything else: the encoder, the primary head or another head. Dropping it could then neither stop the unit's
    all-gather and reduce-scatter nor free its shards. A module that is not sharded passes.

    ``trained``: what the strategy trains (``trainer.strategy.model``), when it wraps ``module`` (FSDP1's root
    unit, which holds every parameter no inner wrapper does).
    """
    if not torch.distributed.is_available():  # a build without torch.distributed shards nothing
        return
    outer = trained if trained is not None else module
    units = internals.fsdp2_units(outer) + _fsdp1_units(outer)  # type: ignore[arg-type]
    if not units:
        return
    owner = {id(p): task for task in module.auxiliary_tasks for p in module.head_parameters(task)}
    names = {id(p): name for name, p in module.named_parameters()}  # type: ignore[attr-defined]
    for params in units:
        tasks = {owner.get(id(p)) for p in params}
        if len(tasks) < 2 or tasks == {None}:
            continue
        task = sorted(t for t in tasks if t is not None)[0]
        others = [names.get(id(p), "?") for p in params if owner.get(id(p)) != task]
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise RuntimeError(
            f"MT2ST cannot drop the auxiliary head {task!r}: it is sharded in one FSDP unit together with {shown}, "
            "so a drop could neither stop that unit's all-gather and reduce-scatter nor free its shards. Shard "
            "each task head as a unit of its own: call mt2st_lightning.sharding.fully_shard_tasks(self, "
            "encoder_units=...) in configure_model (or fully_shard(head) on each head before fully_shard on its "
            "parents); under "
            "strategy='fsdp', wrap each head module (auto_wrap_policy={..., <the head's class>})"
        )


def _fsdp1_units(module: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters each FSDP1 wrapper (``use_orig_params=True``) manages itself, without its nested wrappers."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrappers = [m for m in module.modules() if isinstance(m, FullyShardedDataParallel)]
    units = []
    for wrapper in wrappers:
        nested = {id(p) for w in wrapper.modules() if w is not wrapper and isinstance(w, FullyShardedDataParallel)
                  for p in w.parameters()}
        units.append([p for p in wrapper.parameters() if id(p) not in nested])
    return units
