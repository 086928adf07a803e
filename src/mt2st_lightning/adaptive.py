"""Adaptive auxiliary-weight factors (MT2ST eqs. 13-15): pure tensor functions.

Each function turns per-task statistics into one factor per auxiliary task. They know nothing of
Lightning: the cross-rank reduction is passed in as a function, and the smoothing state lives in the
callback. All of them return non-negative factors that sum to ``budget`` (``lambda`` in the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ema",
    "fisher_trace_weights",
    "grad_norm_ratio_weights",
    "inverse_variance_weights",
    "squared_grad_norms",
]

Reduce = Callable[[Tensor], Tensor]


def _normalise(raw: Tensor, budget: float) -> Tensor:
    total = raw.sum()
    if not torch.isfinite(total) or total <= 0:
        # Nothing measured yet (or all zero): share the budget equally rather than divide by zero.
        return torch.full_like(raw, budget / raw.numel())
    return raw / total * budget  # not raw * (budget / total): that overflows for a tiny total


def grad_norm_ratio_weights(
    primary_sq_norm: Tensor, aux_sq_norms: Tensor, budget: float | None = 1.0, eps: float = 1e-12
) -> Tensor:
    """Eq. 13: ``gamma_k = ||g_0|| / (||g_k|| + eps)``, rescaled so that ``sum_k gamma_k = budget``.

    With a budget the primary norm cancels out and ``gamma_k`` is proportional to ``1 / ||g_k||``: tasks with
    large encoder gradients are damped. ``budget=None`` returns the raw ratios.
    """
    ratios = primary_sq_norm.clamp_min(0).sqrt() / (aux_sq_norms.clamp_min(0).sqrt() + eps)
    return ratios if budget is None else _normalise(ratios, budget)


def fisher_trace_weights(traces: Tensor, budget: float = 1.0) -> Tensor:
    """Eq. 14: ``gamma_k = budget * F_k / sum_j F_j`` from each auxiliary task's Fisher-trace estimate."""
    return _normalise(traces.clamp_min(0), budget)


def inverse_variance_weights(variances: Tensor, budget: float = 1.0, eps: float = 1e-8) -> Tensor:
    """Eq. 15: ``gamma_k ∝ 1 / (sigma_k^2 + eps)``, normalised to sum to ``budget``."""
    return _normalise(1.0 / (variances.clamp_min(0) + eps), budget)


def squared_grad_norms(losses: Sequence[Tensor], params: Sequence[Tensor], reduce: Reduce | None = None) -> Tensor:
    """``||d loss_i / d params||^2`` for each loss, without touching ``.grad`` (the graph is retained).

    The squared norm of the mini-batch gradient is the empirical Fisher-trace estimate used for eq. 14 and
    the gradient norm of eq. 13. ``reduce`` averages the result over ranks, so that every rank derives the
    same weights.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable shared parameters to measure task gradients on")
    out = []
    for loss in losses:
        if not loss.requires_grad:  # e.g. a constant 0 for a batch with no labels of that task
            out.append(loss.new_zeros((), dtype=torch.float32))
            continue
        grads = torch.autograd.grad(loss.float(), params, retain_graph=True, allow_unused=True)
        sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        out.append(torch.stack(sq).sum() if sq else loss.new_zeros((), dtype=torch.float32))
    norms = torch.stack(out)
    return reduce(norms) if reduce is not None else norms


def ema(previous: Tensor | None, value: Tensor, decay: float) -> Tensor:
    """Exponential moving average; the first value is taken as it is."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    return value.detach().clone() if previous is None else decay * previous + (1.0 - decay) * value.detach()
