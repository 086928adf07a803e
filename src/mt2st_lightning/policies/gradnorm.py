"""``GradNormPolicy`` (``strategy="gradnorm"``, MT2ST eq. 13): weights ``||g_0|| / ||g_k||``."""

from __future__ import annotations

import torch
from torch import Tensor

from mt2st_lightning import adaptive
from mt2st_lightning.policies.measured import GradientPolicy

__all__ = ["GradNormPolicy"]


class GradNormPolicy(GradientPolicy):
    """Envelope x ``budget``-normalised ``||g_0|| / ||g_k||`` (eq. 13), ``g`` each task's gradient on the shared
    representation (or parameters, ``measure_on="parameters"``). Normalising cancels ``||g_0||``, so tasks with
    large gradients are damped; ``budget=None`` keeps the raw ratios."""

    name = "gradnorm"
    raw_factors_allowed = True

    def factors_from(self, primary_sq: Tensor | None, aux_sq: Tensor, budget: float | None) -> Tensor | None:
        if budget is not None:  # ||g_0|| cancels: a zero primary gradient must not zero every ratio
            return adaptive.grad_norm_ratio_weights(torch.ones((), dtype=aux_sq.dtype), aux_sq, budget)
        if primary_sq is None:
            return None  # the raw ratios need ||g_0||, and it was never measured non-zero
        return adaptive.grad_norm_ratio_weights(primary_sq, aux_sq, None)
