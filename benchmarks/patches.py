"""Proposed library fixes, as monkeypatches applied only around the fits of the variants that name them.

This is how a fix is measured before anyone edits ``src/``: a variant with ``patches=("name",)`` runs in the
same interleaved rounds as the unpatched one, so the two rows give the before/after numbers. Each patch's
docstring is the change proposed for the library.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any


from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.mixin import MT2STMixin

# name -> (owner, attribute, factory(original) -> replacement)
PATCHES: dict[str, tuple[Any, str, Callable[[Any], Any]]] = {}


def patch(name: str, owner: Any, attribute: str):
    def register(factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
        PATCHES[name] = (owner, attribute, factory)
        return factory

    return register


@contextlib.contextmanager
def applied(names: Sequence[str]) -> Iterator[None]:
    saved = []
    try:
        for name in names:
            owner, attribute, factory = PATCHES[name]
            original = owner.__dict__[attribute]
            saved.append((owner, attribute, original))
            setattr(owner, attribute, factory(original))
        yield
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


@patch("lazy-weight-log", MT2STCallback, "on_train_batch_start")
def _lazy_weight_log(original):
    """callback.py, ``MT2STCallback.on_train_batch_start``: log the weights only on the steps whose metrics the
    logger connector writes (what Lightning's own ``LearningRateMonitor`` does)::

        -        if self.log_weights:
        +        if self.log_weights and trainer._logger_connector.should_update_logs:

    Every logged step still gets the weights in force at that step; the 4 ``self.log`` calls (and the
    connector's per-step processing of 4 more step metrics) leave the other steps.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.log_weights or trainer._logger_connector.should_update_logs:
            return original(self, trainer, pl_module, batch, batch_idx)
        self.log_weights = False
        try:
            return original(self, trainer, pl_module, batch, batch_idx)
        finally:
            self.log_weights = True

    return on_train_batch_start


@patch("release-dropped-heads", MT2STMixin, "drop_task")
def _release_dropped_heads(original):
    """mixin.py, ``MT2STMixin.drop_task``: release the storage of a dropped head's parameters, which nothing
    reads again during training (their gradients and optimizer state are freed already)::

             for p in params:
                 p.requires_grad_(False)
                 p.grad = None
        +        p.data = p.data.new_empty((0,))  # the head left the computation: free its weights too

    (and ``on_save_checkpoint``/``on_load_checkpoint`` must then skip the dropped heads' keys; see the report).
    """

    def drop_task(self, task):
        params = original(self, task)
        for p in params:
            p.data = p.data.new_empty((0,))
        return params

    return drop_task


def describe(name: str) -> str:
    owner, attribute, factory = PATCHES[name]
    return (factory.__doc__ or "").strip()


__all__ = ["PATCHES", "applied", "describe"]
