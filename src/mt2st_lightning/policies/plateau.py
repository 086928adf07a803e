"""``PlateauSwitch``: drop the auxiliary heads once the primary task stops improving (beyond the paper).

MT2ST names a predefined switch point as its main limitation: nobody knows step 150 in advance, but everybody
can say "when the validation metric stops improving". This policy counts that exactly as Lightning's
``EarlyStopping`` counts it, and switches to single-task training where ``EarlyStopping`` would stop.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from mt2st_lightning.policies.base import Policy, Reducer
from mt2st_lightning.policies.params import (
    Number,
    PerTask,
    TimeBound,
    check_gamma0,
    check_time_bound,
    gamma0_per_task,
    is_int,
    is_real,
    resolve_time_bound,
)

__all__ = ["PlateauSwitch"]


class PlateauSwitch(Policy):
    r"""Drop every auxiliary head at the first step after the validation check at which ``monitor`` has not
    improved for ``patience`` checks.

    Improvement is counted as :class:`~lightning.pytorch.callbacks.EarlyStopping` counts it: a check improves
    when its value is strictly better than the best so far by more than ``min_delta``
    (``current - min_delta > best`` in ``"max"`` mode, ``current + min_delta < best`` in ``"min"`` mode);
    otherwise the wait count grows, and the switch is decided when it reaches ``patience``. With
    ``min_delta_mode="rel"`` the margin is a fraction of the best value's magnitude, ``min_delta * |best|``
    (as ``threshold_mode="rel"`` of PyTorch's ``ReduceLROnPlateau``, with ``|best|`` so that it also holds for
    negative values): one preset then fits losses of any scale. Either way ``min_delta`` is the least gain
    that counts within the wait, so it is a rate: a slow steady gain of less than ``min_delta`` per wait is a
    plateau. A wait of ``patience`` checks lasts ``patience`` times the validation cadence
    (``val_check_interval``), which differs between runs; ``patience_steps`` also makes it last a time, so
    that one setting means the same rate at any cadence. Each rank decides
    on the value it sees and the decision is then made true on every rank if it is true on any, as
    ``EarlyStopping`` does (``reduce_boolean_decision(..., all=False)``), so all ranks drop at the same step.

    Args:
        monitor: the key of a metric logged during validation, e.g. ``"val/loss"`` or
            ``"val/primary_metric"``. Under DDP make it the same on every rank (a torchmetrics metric, or
            ``self.log(..., sync_dist=True)``): each rank keeps its own best value and wait count, and a
            checkpoint holds rank 0's, as with ``EarlyStopping``.
        mode: ``"min"`` (default, as ``EarlyStopping``) or ``"max"``: the direction in which ``monitor``
            improves.
        patience: how many validation checks without improvement decide the switch (an int >= 1).
        patience_steps: with it, the wait is over only once this much time has also passed since the check
            that set the best value (an int step/epoch in the callback's ``unit``, or a float in (0, 1): a
            fraction of the run); ``None``: ``patience`` checks alone, as ``EarlyStopping``.
        min_delta: an improvement must exceed this (>= 0): an absolute margin, or with
            ``min_delta_mode="rel"`` a fraction of ``|best|`` (in [0, 1)).
        min_delta_mode: ``"abs"`` (default, as ``EarlyStopping``) or ``"rel"``: how ``min_delta`` is read.
        min_step: never drop before this time (an int step/epoch in the callback's ``unit``, or a float in
            (0, 1): a fraction of the run). A plateau found earlier drops the heads at ``min_step``, as the
            ``Trainer`` honours ``EarlyStopping``'s signal once ``min_steps`` is reached.
        max_step: drop at this time at the latest, plateau or not (same forms as ``min_step``).
        gamma0: the auxiliary weight until the switch; one value or a ``{task: value}`` mapping.

    A non-finite monitored value (NaN, inf) never becomes the best and counts as a check without
    improvement, with a warning: a diverged metric is a plateau, not progress.

    Attributes:
        decided_at: the time of the validation check that decided the switch (``None`` until then); the heads
            leave at the first step from ``max(decided_at, min_step)`` on (the callback records and logs when,
            in ``MT2STCallback.drop_times`` and ``mt2st/dropped_at/<task>``).
        best_score, wait_count: as in ``EarlyStopping``; saved in checkpoints with ``decided_at`` and
            ``best_time`` (the time of the check that set ``best_score``), so that a run resumed in the middle
            of a wait switches at the same step.
    """

    name = "plateau"
    mode_dict: ClassVar[dict[str, Any]] = {"min": torch.lt, "max": torch.gt}
    delta_modes: ClassVar[tuple[str, ...]] = ("abs", "rel")

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = "min",
        patience: int = 3,
        patience_steps: TimeBound | None = None,
        min_delta: Number = 0.0,
        min_delta_mode: str = "abs",
        min_step: TimeBound | None = None,
        max_step: TimeBound | None = None,
        gamma0: PerTask = 1.0,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                "strategy='plateau' needs monitor=<the key of a metric logged in validation>, e.g. "
                "monitor='val/loss', mode='min' or monitor='val/primary_metric', mode='max'"
            )
        if mode not in self.mode_dict:
            raise ValueError(
                f"mode must be 'min' or 'max' (the direction in which {monitor!r} improves), got {mode!r}"
            )
        if not is_int(patience) or patience < 1:
            raise ValueError(
                f"patience must be an int >= 1 (validation checks without improvement), got {patience!r}"
            )
        if not is_real(min_delta) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if min_delta_mode not in self.delta_modes:
            raise ValueError(
                f"min_delta_mode must be 'abs' (min_delta is a margin in {monitor!r}'s units) or 'rel' (a fraction "
                f"of the best value's magnitude), got {min_delta_mode!r}"
            )
        if min_delta_mode == "rel" and min_delta >= 1:
            raise ValueError(
                f"with min_delta_mode='rel', min_delta is a fraction of |best| and must be < 1 (e.g. 0.05 for 5 %), "
                f"got {min_delta!r}"
            )
        for name, value in (("patience_steps", patience_steps), ("min_step", min_step), ("max_step", max_step)):
            if value is not None:
                check_time_bound(name, value)
        if is_int(min_step) and is_int(max_step) and min_step > max_step:
            raise ValueError(f"min_step={min_step} lies after max_step={max_step}")
        check_gamma0(gamma0)
        self.monitor = monitor
        self.mode = mode
        self.patience = int(patience)
        self.patience_steps = patience_steps
        self.min_delta = float(min_delta)
        self.min_delta_mode = min_delta_mode
        self.min_step = min_step
        self.max_step = max_step
        self.gamma0 = dict(gamma0) if isinstance(gamma0, Mapping) else float(gamma0)
        # Resolved by bind().
        self._gamma0: dict[str, float] = {}
        self._min_time = 0
        self._max_time: int | None = None
        self._patience_time = 0
        self._reset()

    def _reset(self) -> None:
        self.best_score = torch.tensor(math.inf if self.mode == "min" else -math.inf)
        self.wait_count = 0
        self.best_time: int | None = None
        self.decided_at: int | None = None
        self._warned_nonfinite = False

    @property
    def monitor_op(self) -> Any:
        return self.mode_dict[self.mode]

    # ------------------------------------------------------------------ once per fit
    def bind(self, tasks: Sequence[str], total: float | None, unit: str) -> None:
        self._reset()  # a fresh count for every fit; a resumed fit loads the checkpoint's right after
        self._gamma0 = gamma0_per_task(self.gamma0, tasks)
        self._min_time = 0 if self.min_step is None else resolve_time_bound("min_step", self.min_step, total, unit)
        self._max_time = None if self.max_step is None else resolve_time_bound("max_step", self.max_step, total, unit)
        self._patience_time = (
            0 if self.patience_steps is None else resolve_time_bound("patience_steps", self.patience_steps, total, unit)
        )
        if total is not None and math.isfinite(total) and self._patience_time >= total:
            raise ValueError(
                f"patience_steps resolves to {self._patience_time} {unit}s, as long as the run or longer "
                f"({int(total)} {unit}s): no wait could end in time; lower it"
            )
        if self._max_time is not None and self._min_time > self._max_time:
            raise ValueError(
                f"min_step resolves to {unit} {self._min_time}, after max_step at {unit} {self._max_time}; "
                "lower min_step or raise max_step"
            )
        if (
            self._max_time is not None
            and total is not None
            and math.isfinite(total)
            and self._max_time >= total
        ):
            raise ValueError(
                f"max_step resolves to {unit} {self._max_time}, at or beyond the run's end ({int(total)} {unit}s, "
                f"numbered 0 to {int(total) - 1}): it would never force the switch; lower it or leave it None"
            )

    # ------------------------------------------------------------------ each optimizer-step boundary
    def weights(self, t: int, active: Sequence[str]) -> Mapping[str, float]:
        return {task: self._gamma0[task] for task in active}

    def finished(self, t: int, active: Sequence[str]) -> Collection[str]:
        plateaued = self.decided_at is not None and t >= self._min_time
        return tuple(active) if plateaued or self._forced(t) else ()

    def _forced(self, t: int) -> bool:
        return self._max_time is not None and t >= self._max_time

    # ------------------------------------------------------------------ after each validation run
    def observe_validation(self, t: int, metrics: Mapping[str, Tensor | float], reduce: Reducer) -> None:
        if self.decided_at is not None or self._forced(t):
            return  # decided (alike on every rank: the decision was reduced), or max_step took the heads already
        if self.monitor not in metrics:
            logged = ", ".join(f"'{k}'" for k in metrics) or "none"
            raise KeyError(
                f"MT2ST (plateau) monitors {self.monitor!r}, which this validation run did not log. Logged keys: "
                f"{logged}. Pass one of them as monitor=..., or log {self.monitor!r} in validation_step."
            )
        current = torch.as_tensor(metrics[self.monitor]).detach().squeeze().cpu()
        if current.numel() != 1:
            raise ValueError(
                f"MT2ST (plateau): monitor {self.monitor!r} must be a scalar, got shape {tuple(current.shape)}"
            )
        plateau = self._plateau_after(t, current)
        # Every rank must drop at the same step: a plateau on any rank is a plateau on all (as EarlyStopping).
        if reduce.any(plateau):
            self.decided_at = t
            margin = f"{self.min_delta:g}" + (" x |best|" if self.min_delta_mode == "rel" else "")
            rank_zero_info(
                f"MT2ST (plateau): {self.monitor} did not improve by more than {margin} in {self.wait_count} "
                f"validation checks (best {float(self.best_score):.6g}, at {self.best_time}); the auxiliary heads "
                f"leave at step {max(t, self._min_time)}"
            )

    def _plateau_after(self, t: int, current: Tensor) -> bool:
        """Count one check, as ``EarlyStopping._evaluate_stopping_criteria`` does, and say whether the wait is
        over: ``patience`` checks, and with ``patience_steps`` that much time since the best check."""
        if not torch.isfinite(current):
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                rank_zero_warn(
                    f"MT2ST (plateau): {self.monitor} = {float(current)} is not finite; it counts as a validation "
                    "check without improvement"
                )
        else:
            margin = self._margin(current)
            delta = margin if self.mode == "max" else -margin
            if self.monitor_op(current - delta, self.best_score):
                self.best_score = current.clone()
                self.best_time = t
                self.wait_count = 0
                return False
        self.wait_count += 1
        # Without a finite best yet there is no time to wait from: the count alone decides.
        waited = self.best_time is None or t - self.best_time >= self._patience_time
        return self.wait_count >= self.patience and waited

    def _margin(self, current: Tensor) -> Tensor | float:
        """The least gain over ``best_score`` that counts as an improvement."""
        if self.min_delta_mode == "abs":
            return self.min_delta  # a float, as EarlyStopping subtracts it (the check's dtype decides rounding)
        if not torch.isfinite(self.best_score):
            return 0.0  # no best yet: the first finite value is one
        return self.min_delta * self.best_score.to(current.dtype).abs()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_score": self.best_score.clone(),
            "wait_count": self.wait_count,
            "best_time": self.best_time,
            "decided_at": self.decided_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            raise ValueError(
                f"the checkpoint's plateau switch monitored {state.get('monitor')!r} (mode {state.get('mode')!r}); "
                f"this one monitors {self.monitor!r} (mode {self.mode!r}): resume with the settings the run started with"
            )
        self.best_score = torch.as_tensor(state["best_score"]).clone()
        self.wait_count = int(state["wait_count"])
        self.best_time = state.get("best_time")  # absent from checkpoints written before patience_steps
        self.decided_at = state["decided_at"]
