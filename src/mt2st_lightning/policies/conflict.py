"""``ConflictSwitch``: drop each auxiliary head once its gradient keeps fighting the primary's (beyond the paper).

An auxiliary task helps while its gradient on the shared representation points roughly where the primary
task's does; once the two disagree (negative cosine, as in gradient-surgery methods) for a while, it only pulls
the encoder away from the primary task, and this policy drops it, each task on its own.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from mt2st_lightning import adaptive
from mt2st_lightning.policies.base import Policy, Reducer
from mt2st_lightning.policies.params import (
    MeasuresEvery,
    Number,
    PerTask,
    check_adapt_every,
    check_gamma0,
    gamma0_per_task,
    is_int,
    is_real,
)
from mt2st_lightning.step_record import StepRecord

__all__ = ["ConflictSwitch"]


class ConflictSwitch(MeasuresEvery, Policy):
    r"""Drop an auxiliary task once ``cos(g_0, g_k) < threshold`` for ``window`` consecutive measurements, where
    ``g_k`` is the gradient of task k's loss with respect to the shared features ``h`` (and ``g_0`` the primary
    task's).

    The module must hand ``h`` over: ``return self.mt2st_loss(losses, features=h)``. A measurement takes one
    ``torch.autograd.grad`` per active task through its head only (no encoder backward), on the first
    micro-batch of every ``adapt_every``-th step (or epoch), and costs one host-device synchronisation. Dot
    products and squared norms are averaged over DDP ranks before the cosine is formed, so every rank sees the
    cosine of the global batch's gradients and drops the same task at the same step. Under ``16-mixed`` the
    losses are scaled by the ``GradScaler``'s factor before the gradients are taken (the cosine does not depend
    on it); a measurement with an overflowed or otherwise non-finite gradient is ignored, and a task whose
    gradient is exactly zero (no direction) keeps its count unchanged.

    Args:
        threshold: the cosine below which a measurement counts as a conflict, in [-1, 1] (default 0: the
            gradients point in opposing half-spaces).
        window: how many consecutive conflicting measurements drop a task (an int >= 1); one measurement at
            or above ``threshold`` resets the count.
        adapt_every: measure every this many optimizer steps (or epochs, per the callback's ``unit``); the
            name is shared with the adaptive strategies, which measure on the same cadence.
        gamma0: the auxiliary weight until a task is dropped; one value or a ``{task: value}`` mapping.

    Attributes:
        last_cosines: ``{task: cosine}`` of the latest measurement (NaN where it was undefined).
        conflict_counts: consecutive conflicting measurements per task; a task is finished once its count
            reaches ``window`` (the callback records and logs when its head left, in
            ``MT2STCallback.drop_times`` and ``mt2st/dropped_at/<task>``). Both are saved in checkpoints.
    """

    name = "conflict"

    def __init__(
        self,
        threshold: Number = 0.0,
        window: int = 3,
        adapt_every: int = 10,
        gamma0: PerTask = 1.0,
    ) -> None:
        if not is_real(threshold) or not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold!r}")
        if not is_int(window) or window < 1:
            raise ValueError(
                f"window must be an int >= 1 (consecutive conflicting measurements), got {window!r}"
            )
        check_gamma0(gamma0)
        self.threshold = float(threshold)
        self.window = int(window)
        self.adapt_every = check_adapt_every(adapt_every)
        self.gamma0 = dict(gamma0) if isinstance(gamma0, Mapping) else float(gamma0)
        self._gamma0: dict[str, float] = {}
        self._active: tuple[str, ...] = ()
        self._reset()

    def _reset(self) -> None:
        self.conflict_counts: dict[str, int] = {}
        self.last_cosines: dict[str, float] = {}
        self.measured_at: int | None = None  # a time is measured once, also across a resume inside it
        self._measured: list[str] = []  # the tasks whose cosine the latest measurement gave

    # ------------------------------------------------------------------ once per fit
    def bind(self, tasks: Sequence[str], total: float | None, unit: str) -> None:
        self._reset()  # fresh counts for every fit; a resumed fit loads the checkpoint's right after
        self._gamma0 = gamma0_per_task(self.gamma0, tasks)
        self._active = tuple(tasks)

    # ------------------------------------------------------------------ each optimizer-step boundary
    def finished(self, t: int, active: Sequence[str]) -> Collection[str]:
        return tuple(task for task in active if self.conflict_counts.get(task, 0) >= self.window)

    def weights(self, t: int, active: Sequence[str]) -> Mapping[str, float]:
        self._active = tuple(active)
        return {task: self._gamma0[task] for task in active}

    def observe_step(self, t: int, record: StepRecord, reduce: Reducer) -> None:
        self._measured = []
        if record.features is None:
            raise RuntimeError(
                "MT2ST (conflict) compares task gradients on the shared features, and training_step did not hand "
                "them over: compute h = encoder(x), apply the heads to h, and return self.mt2st_loss(losses, "
                "features=h)"
            )
        tasks = list(record.losses)  # primary first
        aux = [task for task in tasks[1:] if task in self._active]
        if not aux:
            return
        tasks = [tasks[0], *aux]
        self.measured_at = t
        scale = float(record.loss_scale)
        # Scaled as the training backward is, so that small fp16 gradients do not underflow; the cosine does
        # not depend on the scale.
        stats = adaptive.gradient_alignment(
            [record.losses[task] * scale for task in tasks],
            [record.features],
            reduce.mean,
            names=tasks,
            what="shared features",
        )
        cosines = adaptive.gradient_cosines(stats)
        # The one host-device sync of a measurement: statistics and cosines read together.
        values = torch.cat([stats.flatten().double(), cosines]).tolist()
        n = stats.numel()
        if not all(math.isfinite(v) for v in values[:n]):
            return  # overflowed: ignore this measurement, as the GradScaler skips the step
        self._measured = aux
        for task, cosine in zip(aux, values[n:]):
            self.last_cosines[task] = cosine
            if math.isnan(cosine):
                continue  # a zero gradient has no direction: neither a conflict nor an agreement
            self.conflict_counts[task] = (
                self.conflict_counts.get(task, 0) + 1 if cosine < self.threshold else 0
            )
            if self.conflict_counts[task] == self.window:
                rank_zero_info(
                    f"MT2ST (conflict): the gradient of {task!r} stayed below cosine {self.threshold} to the "
                    f"primary's for {self.window} measurements (last {cosine:.3f}); its head leaves at the next step"
                )

    def diagnostics(self) -> Mapping[str, float]:
        """``cosine/<task>``: each task's cosine with the primary in the latest measurement (an undefined one,
        from a zero gradient, is left out)."""
        return {
            f"cosine/{task}": self.last_cosines[task]
            for task in self._measured
            if not math.isnan(self.last_cosines.get(task, math.nan))
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "conflict_counts": dict(self.conflict_counts),
            "last_cosines": dict(self.last_cosines),
            "measured_at": self.measured_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.conflict_counts = {k: int(v) for k, v in state["conflict_counts"].items()}
        self.last_cosines = dict(state["last_cosines"])
        self.measured_at = state.get("measured_at")
