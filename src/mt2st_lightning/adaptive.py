"""Adaptive auxiliary-weight factors (MT2ST eqs. 13-15): pure tensor functions.

Each function turns per-task statistics into one factor per auxiliary task, or measures those statistics
(task-gradient norms and alignments). They know nothing of Lightning: the cross-rank reduction is passed in as a
function, and the smoothing state lives in the policies (``policies/measured.py``). The factor functions return
non-negative factors that sum to ``budget`` (``lambda`` in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mt2st_lightning import internals

__all__ = [
    "ema",
    "fisher_trace_weights",
    "grad_norm_ratio_weights",
    "gradient_alignment",
    "gradient_cosines",
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


def _measurable(inputs: Sequence[Tensor], what: str) -> list[Tensor]:
    """The inputs that take gradients; an error if there are none."""
    inputs = [x for x in inputs if x.requires_grad]
    if not inputs:
        raise ValueError(f"no {what} that require grad to measure task gradients on")
    if any(internals.is_dtensor(x) for x in inputs):
        # FSDP2 registers each parameter's shard; forward runs on the gathered parameters, which it frees again.
        raise ValueError(
            f"the {what} are FSDP2 shards, which the forward pass does not use (it runs on gathered copies), so "
            "task gradients cannot be measured on them: measure on the shared features instead (pass features=h "
            "to mt2st_loss, and measure_on='representation' or 'auto')"
        )
    return inputs


def _task_gradient(loss: Tensor, inputs: Sequence[Tensor], name: str | None, what: str) -> list[Tensor | None] | None:
    """``d loss / d inputs`` (detached, float32; ``None`` for an input the loss does not reach), with the graph
    retained and ``.grad`` untouched; ``None`` when the loss takes no gradient at all (it does not require grad,
    or, without a ``name``, reaches no input). With a ``name``, a loss that requires grad but reaches no input is
    an error naming its task."""
    if not loss.requires_grad:
        return None
    raw = torch.autograd.grad(loss.float(), inputs, retain_graph=True, allow_unused=True)
    if all(g is None for g in raw):
        if name is not None:
            raise ValueError(
                f"the loss of task {name!r} does not depend on the {what} it is measured on; pass the tensor "
                "the heads were applied to, not a detached copy"
            )
        return None
    return [None if g is None else g.detach().float() for g in raw]


def squared_grad_norms(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    reduce: Reduce | None = None,
    names: Sequence[str] | None = None,
    what: str = "shared parameters",
) -> Tensor:
    """``||d loss_i / d inputs||^2`` for each loss, without touching ``.grad`` (the graph is retained).

    ``inputs`` are the shared parameters, or the shared representation ``h`` itself: autograd then runs only
    the part of the graph between each loss and ``h``, that is one task head's backward per loss, and never
    the encoder's. The squared norm of the mini-batch gradient is the empirical Fisher-trace estimate used for
    eq. 14 and the gradient norm of eq. 13. A loss that does not require grad (e.g. a constant 0 for a batch
    with no labels of that task) has norm 0. With ``names``, a loss that requires grad but does not reach
    any input is an error naming its task (a detached ``h``, a head applied to something else). ``reduce``
    averages the result over ranks, so that every rank derives the same weights.
    """
    inputs = _measurable(inputs, what)
    out = []
    for i, loss in enumerate(losses):
        # One call per task: each one runs that task's own part of the graph only. A single batched call
        # (is_grads_batched) would run every task's part once per task.
        grads = _task_gradient(loss, inputs, names[i] if names is not None else None, what)
        sq = [g.pow(2).sum() for g in grads or () if g is not None]
        out.append(torch.stack(sq).sum() if sq else loss.new_zeros((), dtype=torch.float32))
    norms = torch.stack(out)
    return reduce(norms) if reduce is not None else norms


def ema(previous: Tensor | None, value: Tensor, decay: float) -> Tensor:
    """Exponential moving average; the first value is taken as it is."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")
    return value.detach().clone() if previous is None else decay * previous + (1.0 - decay) * value.detach()


def gradient_alignment(
    losses: Sequence[Tensor],
    inputs: Sequence[Tensor],
    reduce: Reduce | None = None,
    names: Sequence[str] | None = None,
    what: str = "shared representation",
) -> Tensor:
    """How each loss's gradient lines up with the first one's: a ``(2, n)`` float32 tensor whose row 0 holds
    ``<g_0, g_i>`` and row 1 ``||g_i||^2``, with ``g_i = d losses[i] / d inputs`` (graph retained, ``.grad``
    untouched).

    With ``inputs = [h]``, the shared representation, autograd runs each task head's backward only. Dot
    products and squared norms are reduced *before* any cosine is formed, so ``reduce`` (a mean over ranks)
    gives every rank the cosine of the gradients over the global batch. A loss that does not require grad
    has a zero gradient; with ``names``, one that requires grad but does not reach ``inputs`` is an error
    naming its task.
    """
    inputs = _measurable(inputs, what)
    zero = torch.zeros((), dtype=torch.float32, device=inputs[0].device)
    first: list[Tensor | None] | None = None
    columns = []
    for i, loss in enumerate(losses):
        grads = _task_gradient(loss, inputs, names[i] if names is not None else None, what)
        if i == 0:
            first = grads
        pairs = [(a, b) for a, b in zip(first or (), grads or ()) if a is not None and b is not None]
        dot = torch.stack([(a * b).sum() for a, b in pairs]).sum() if pairs else zero
        squares = [g.pow(2).sum() for g in grads or () if g is not None]
        columns.append(torch.stack([dot, torch.stack(squares).sum() if squares else zero]))
    stats = torch.stack(columns, dim=1)
    return reduce(stats) if reduce is not None else stats


def gradient_cosines(stats: Tensor) -> Tensor:
    """``cos(g_0, g_i)`` for ``i >= 1`` from :func:`gradient_alignment`'s statistics, in float64; NaN where
    either gradient is zero (it has no direction)."""
    stats = stats.double()
    norms = stats[1].clamp_min(0).sqrt()
    denominator = norms[0] * norms[1:]  # the product of the norms, not of the squares: that overflows first
    cosines = stats[0, 1:] / denominator
    return torch.where(denominator > 0, cosines.clamp(-1.0, 1.0), torch.full_like(cosines, math.nan))
