"""``StepRecord``: what one training step's ``mt2st_loss`` saw, handed explicitly to the policy.

The mixin builds it; ``MT2STCallback`` reads it between forward and backward (the only moment the losses
still hold their graph) and passes it to the policy when the policy observes that step. Nothing else carries
per-step data from the module to the callback. The checks the callback makes on it (is it the loss Lightning
backpropagates? did ``training_step`` build one at all?) live here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["StepRecord", "as_backpropagated", "backpropagates", "missing_record_error", "warn_missing_record"]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One micro-batch's per-task losses, attached to the autograd graph. Immutable;
    ``dataclasses.replace(record, loss_scale=...)`` makes a changed copy.

    Attributes:
        losses: the loss of every active task, primary first, exactly as given to ``mt2st_loss``.
        features: the shared representation ``h`` the heads were applied to, if the module passed
            ``mt2st_loss(losses, features=h)``; gradient-based policies then measure with respect to it
            (through the heads only) instead of the shared parameters.
        total: the weighted float32 total that ``mt2st_loss`` returned (the tensor Lightning backpropagates).
        loss_scale: the mixed-precision loss scale of this step (``GradScaler.get_scale()`` under
            ``16-mixed``, else 1.0). Gradient-based policies multiply the losses by it before taking
            gradients and divide it out again, so that small fp16 gradients do not underflow; it never
            changes a weight. Filled in by the callback, not the module.
    """

    losses: Mapping[str, Tensor]
    features: Optional[Tensor]
    total: Tensor
    loss_scale: float = 1.0


# ---------------------------------------------------------------------------------------- the callback's checks
def as_backpropagated(
    record: StepRecord, loss: Tensor, trainer: Any, automatic_optimization: bool, who: str
) -> StepRecord:
    """``record`` as a policy observes it: checked to describe the ``loss`` Lightning backpropagates, with the
    step's mixed-precision loss scale filled in. ``who`` names the strategy in the error.

    Checked on measuring steps only: the value comparison reads the device."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    accumulate = trainer.accumulate_grad_batches if automatic_optimization else 1
    if not backpropagates(loss, record.total, scale, accumulate):
        raise RuntimeError(
            f"MT2ST ({who}) measures the task losses given to mt2st_loss, but the loss Lightning "
            "backpropagates is not the total mt2st_loss returned: return self.mt2st_loss(losses) unchanged "
            "from training_step (put any extra loss term into `losses` as a task of its own)"
        )
    # Under fp16 the policy scales the losses as the training backward does, and divides the scale out.
    return record if scale == 1.0 else replace(record, loss_scale=scale)


def backpropagates(loss: Tensor, total: Tensor, scale: float, accumulate: int) -> bool:
    """Whether ``loss`` is ``total`` as Lightning backpropagates it: itself, or divided by the gradient
    accumulation factor and multiplied by the GradScaler's scale, at most two operations above it in the graph."""
    if loss is total:
        return True
    target, frontier, derived = total.grad_fn, [loss.grad_fn], False
    for _ in range(2):
        frontier = [f for fn in frontier if fn is not None for f, _ in fn.next_functions]
        derived |= target is not None and any(f is target for f in frontier)
    expected = total.detach().float() * (scale / max(int(accumulate), 1))
    return derived and bool(torch.allclose(loss.detach().float(), expected, rtol=1e-4, atol=0.0, equal_nan=True))


def missing_record_error(who: str) -> RuntimeError:
    """A policy that observes steps, and a ``training_step`` that did not call ``mt2st_loss``."""
    return RuntimeError(
        f"MT2ST ({who}) observes this step's task losses, but training_step did not compute its loss with "
        "self.mt2st_loss(losses): return self.mt2st_loss(losses) (the weighted total) from training_step"
    )


def warn_missing_record(module: Any) -> None:
    """Weights that do not reach the loss: said once per fit (the callback keeps count)."""
    rank_zero_warn(
        f"{type(module).__name__}.training_step did not call self.mt2st_loss(losses), so MT2ST's auxiliary "
        "weights are not applied to its loss; return self.mt2st_loss(losses) from training_step"
    )
