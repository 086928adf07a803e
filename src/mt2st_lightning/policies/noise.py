"""``NoisePolicy`` (``strategy="noise"``, MT2ST eq. 15): weights inversely proportional to each task's loss
variance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mt2st_lightning import adaptive
from mt2st_lightning.policies.base import Reducer
from mt2st_lightning.policies.measured import MeasuredPolicy
from mt2st_lightning.step_record import StepRecord

__all__ = ["NoisePolicy"]


class NoisePolicy(MeasuredPolicy):
    """Envelope x ``budget``-normalised ``1 / (sigma_k^2 + eps)`` (eq. 15), ``sigma_k^2`` the variance of task
    k's loss over the measuring steps, smoothed with ``adapt_decay``: ``E[L^2] - E[L]^2`` under the
    exponential average. No extra backward.

    ``adapt_decay=0`` (no smoothing) cannot use that estimate (one sample has variance 0), so it takes the
    variance of the last two measurements, ``((L - L_prev) / 2)^2``; until the second one the shares are equal.
    """

    name = "noise"

    def measure(self, primary: str, aux: Sequence[str], record: StepRecord, reduce: Reducer) -> Tensor:
        values = torch.stack([record.losses[t].detach().float().reshape(()) for t in aux])
        return reduce.mean(values).to("cpu", torch.float64)

    def update(self, primary: str, aux: Sequence[str], values: Tensor) -> None:
        if self.adapt_decay == 0:
            previous = [self.stats.get(f"last/{task}") for task in aux]
            for task, value in zip(aux, values):
                self.stats[f"last/{task}"] = value.clone()
            measured = [task for task, p in zip(aux, previous) if p is not None]
            variances = [((v - p) / 2) ** 2 for v, p in zip(values, previous) if p is not None]
        else:
            for task, value in zip(aux, values):
                self._smooth(f"mean/{task}", value)
                self._smooth(f"sq/{task}", value * value)
            measured = list(aux)
            variances = [self.stats[f"sq/{t}"] - self.stats[f"mean/{t}"] ** 2 for t in aux]
        if measured:
            var = torch.stack(variances)
            self._set_factors(measured, aux, lambda budget: adaptive.inverse_variance_weights(var, budget))
