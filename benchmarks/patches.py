"""Proposed library fixes, applied to single objects: measured before anyone edits ``src/``.

A variant with ``patches=("name", ...)`` gets its *own* callback (or module) instance switched to a subclass
that carries the fix; every other fit in the process keeps the library as it is. So the patched row runs in
the same lockstep session as the unpatched one and the two rows are the before/after numbers. Each patch's
docstring is the change proposed for the library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.mixin import MT2STMixin


@dataclass(frozen=True)
class Patch:
    target: Literal["callback", "module"]
    owner: type  # what the target must be an instance of
    members: Callable[[type], dict[str, Any]]  # the instance's current class -> members of the patched subclass


PATCHES: dict[str, Patch] = {}


def patch(name: str, target: Literal["callback", "module"], owner: type):
    def register(members: Callable[[type], dict[str, Any]]) -> Callable[[type], dict[str, Any]]:
        PATCHES[name] = Patch(target, owner, members)
        return members

    return register


def apply(names: Sequence[str], *, callback: Any = None, module: Any = None) -> None:
    """Switch ``callback``/``module`` to subclasses that carry the named fixes (their classes stay as they are)."""
    for name in names:
        p = PATCHES[name]
        obj = callback if p.target == "callback" else module
        if not isinstance(obj, p.owner):
            raise TypeError(f"patch {name!r} applies to a {p.owner.__name__}, got {type(obj).__name__}")
        base = type(obj)
        obj.__class__ = type(base.__name__, (base,), {"__module__": base.__module__, **p.members(base)})


def describe(name: str) -> str:
    return (PATCHES[name].members.__doc__ or "").strip()


# ============================================================================== time
@patch("direct-weight-log", "callback", MT2STCallback)
def _direct_weight_log(base: type) -> dict[str, Any]:
    """callback.py, ``MT2STCallback.on_train_batch_start``: write the weights straight to the loggers, and only
    on the steps the logger connector writes (what Lightning's own ``LearningRateMonitor`` does), instead of
    four ``self.log`` calls on every step::

        -        if self.log_weights:
        +        if self.log_weights and trainer.loggers and trainer._logger_connector.should_update_logs:
                     weights = module.task_weights
                     metrics = {f"mt2st/weight/{task}": weights.get(task, 0.0) for task in module.auxiliary_tasks}
                     metrics["mt2st/active_tasks"] = float(len(weights))
        -            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        +            step = trainer.fit_loop.epoch_loop._batches_that_stepped
        +            for logger in trainer.loggers:
        +                logger.log_metrics(metrics, step=step)

    ``self.log`` costs twice: the call itself, and then on *every* later step of the epoch the logger
    connector's ``on_batch_end`` recomputes its ``metrics`` over every key logged so far; so logging through
    ``self.log`` only on logging steps still leaves much of the cost. Trade-off: the weights no longer appear
    in ``trainer.callback_metrics`` (``test_weights_are_logged`` reads the logger's CSV file and still passes).
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        log = self.log_weights
        self.log_weights = False
        try:
            base.on_train_batch_start(self, trainer, pl_module, batch, batch_idx)
        finally:
            self.log_weights = log
        if log and trainer.loggers and trainer._logger_connector.should_update_logs:
            weights = pl_module.task_weights
            metrics = {f"mt2st/weight/{task}": weights.get(task, 0.0) for task in pl_module.auxiliary_tasks}
            metrics["mt2st/active_tasks"] = float(len(weights))
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    return {"on_train_batch_start": on_train_batch_start}


@patch("finite-check-total", "callback", MT2STCallback)
def _finite_check_total(base: type) -> dict[str, Any]:
    """callback.py, ``MT2STCallback._check_finite``: test the one weighted total that is about to be
    back-propagated (``on_before_backward``'s ``loss``) instead of stacking every task loss; look at the tasks
    only when it fails::

        -            self._check_finite(trainer, losses)
        +            self._check_finite(trainer, loss, losses)
        ...
        -    def _check_finite(self, trainer, losses):
        -        stacked = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        -        local_ok = bool(stacked.isfinite().all())
        +    def _check_finite(self, trainer, loss, losses):
        +        local_ok = math.isfinite(loss.detach().float().sum().item())

    The total is ``L_0 + sum_k w_k L_k`` over the active tasks, so it is non-finite as soon as one task loss is
    (``0 * inf`` and ``0 * nan`` are nan as well); the rest (the cross-rank decision, naming the bad tasks,
    raise/skip) is unchanged. The same one host-device synchronisation per step (``.item()`` for ``bool()``);
    one more case is caught: finite task losses whose weighted sum overflows.
    """

    def on_before_backward(self, trainer, pl_module, loss):
        self._total = loss
        try:
            base.on_before_backward(self, trainer, pl_module, loss)
        finally:
            self._total = None

    def _check_finite(self, trainer, losses):
        local_ok = math.isfinite(self._total.detach().float().sum().item())
        if trainer.strategy.reduce_boolean_decision(local_ok, all=True):
            return
        bad = [t for t, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
        where = f"task(s) {bad}" if bad else "another rank's loss"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"MT2ST: non-finite loss in {where} at {self.unit} {self._last_time}. Lower the learning rate or "
                "the auxiliary weights, or pass MT2STCallback(on_nonfinite='skip') to skip such steps."
            )
        self._skip_update = True

    return {"on_before_backward": on_before_backward, "_check_finite": _check_finite}


@patch("cached-task-tuples", "module", MT2STMixin)
def _cached_task_tuples(base: type) -> dict[str, Any]:
    """mixin.py, ``MT2STMixin.tasks`` / ``active_tasks``: keep the two tuples instead of rebuilding them on each
    read (about 12 reads per step between the model, the mixin and the callback)::

             def declare_tasks(self, primary, heads):
                 ...
        +        self.__dict__["_mt2st_tasks"] = (primary, *(t for t in heads if t != primary))
        +        self.__dict__["_mt2st_active"] = self.__dict__["_mt2st_tasks"]
             def tasks(self):
                 self._require_declared()
        -        primary = ...; return (primary, *(...))
        +        return self.__dict__["_mt2st_tasks"]
             def active_tasks(self):
        -        dropped = ...; return tuple(t for t in self.tasks if t not in dropped)
        +        return self.__dict__.get("_mt2st_active", ())
             def drop_task(self, task):
                 ...
                 self.__dict__["_mt2st_dropped"].add(task)
        +        self.__dict__["_mt2st_active"] = tuple(t for t in self.tasks if t not in self.__dict__["_mt2st_dropped"])
    """

    def tasks(self):
        cached = self.__dict__.get("_mt2st_tasks_cache")
        if cached is None:
            cached = self.__dict__["_mt2st_tasks_cache"] = base.tasks.fget(self)
        return cached

    def active_tasks(self):
        cached = self.__dict__.get("_mt2st_active_cache")
        if cached is None:
            cached = self.__dict__["_mt2st_active_cache"] = base.active_tasks.fget(self)
        return cached

    def drop_task(self, task):
        params = base.drop_task(self, task)
        self.__dict__.pop("_mt2st_active_cache", None)
        return params

    return {"tasks": property(tasks), "active_tasks": property(active_tasks), "drop_task": drop_task}


# ============================================================================== memory
@patch("release-dropped-heads", "module", MT2STMixin)
def _release_dropped_heads(base: type) -> dict[str, Any]:
    """mixin.py, ``MT2STMixin.drop_task``: release the storage of a dropped head's parameters, which nothing
    reads again during training (their gradients and optimizer state are freed already)::

             for p in params:
                 p.requires_grad_(False)
                 p.grad = None
        +        p.data = p.data.new_empty((0,))  # the head has left the computation: free its weights too

    plus, for checkpoints: ``on_save_checkpoint`` drops the dropped heads' keys from ``checkpoint["state_dict"]``
    and ``on_load_checkpoint`` (which runs before Lightning loads the state dict) drops the tasks first and puts
    the module's own empty tensors under those keys, so that a strict load still matches. Without the fix a
    dropped head still holds one copy of its weights (its gradient and both AdamW moments are freed).
    """

    def drop_task(self, task):
        params = base.drop_task(self, task)
        for p in params:
            p.data = p.data.new_empty((0,))
        return params

    def _dropped_keys(self):
        dropped = {id(t) for task in self.dropped_tasks for t in self.__dict__["_mt2st_heads"][task].parameters()}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if id(v) in dropped}

    def on_save_checkpoint(self, checkpoint):
        base.on_save_checkpoint(self, checkpoint)
        for key in self._dropped_keys():
            checkpoint["state_dict"].pop(key, None)

    def on_load_checkpoint(self, checkpoint):
        base.on_load_checkpoint(self, checkpoint)  # drops the checkpoint's dropped tasks here (drop_task above)
        checkpoint["state_dict"].update({k: v.detach() for k, v in self._dropped_keys().items()})

    return {"drop_task": drop_task, "_dropped_keys": _dropped_keys, "on_save_checkpoint": on_save_checkpoint,
            "on_load_checkpoint": on_load_checkpoint}


__all__ = ["PATCHES", "apply", "describe"]
