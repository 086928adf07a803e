"""``StepRecord``: what one training step's ``mt2st_loss`` saw, handed explicitly to the policy.

The mixin builds it; ``MT2STCallback`` reads it between forward and backward (the only moment the losses
still hold their graph) and passes it to the policy when the policy observes that step. Nothing else carries
per-step data from the module to the callback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

__all__ = ["StepRecord"]


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
