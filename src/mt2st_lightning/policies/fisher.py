"""``FisherPolicy`` (``strategy="fisher"``, MT2ST eq. 14): weights proportional to each task's Fisher trace."""

from __future__ import annotations

from torch import Tensor

from mt2st_lightning import adaptive
from mt2st_lightning.policies.measured import GradientPolicy

__all__ = ["FisherPolicy"]


class FisherPolicy(GradientPolicy):
    """Envelope x ``budget * F_k / sum_j F_j`` (eq. 14), ``F_k`` the squared norm of task k's mini-batch
    gradient on the shared representation (or parameters): an empirical Fisher-trace estimate."""

    name = "fisher"

    def factors_from(self, primary_sq: Tensor | None, aux_sq: Tensor, budget: float | None) -> Tensor:
        assert budget is not None
        return adaptive.fisher_trace_weights(aux_sq, budget)
