"""The shared base of the adaptive policies: an envelope schedule times a factor measured during training.

``MeasuredPolicy`` owns everything the adaptive strategies (MT2ST eqs. 13-15) have in common: when to measure
(the first batch of every ``adapt_every``-th unit of time), equal shares of the budget before the first
measurement, factors that change only at the next step boundary, smoothed statistics that never take a
non-finite value, and ``state_dict``. ``GradientPolicy`` adds what ``gradnorm`` and ``fisher`` share: squared
gradient norms of each task's loss, with respect to the shared representation or the shared parameters.
A subclass only says how statistics become factors.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor

from mt2st_lightning import adaptive
from mt2st_lightning.policies.base import Reducer
from mt2st_lightning.policies.params import MeasuresEvery, Number, PerTask, check_accepted, check_adapt_every
from mt2st_lightning.policies.scheduled import SchedulePolicy
from mt2st_lightning.schedules import Schedule, as_number
from mt2st_lightning.step_record import StepRecord

__all__ = ["GradientPolicy", "MeasureOn", "MeasuredPolicy"]

MeasureOn = Literal["auto", "representation", "parameters"]
#: ``budget``: a number > 0, or ``"raw"`` (``gradnorm`` only: the raw eq. 13 ratios). A ``str``, not a
#: ``Literal``: the policy refuses any other string itself, with its own message.
Budget = Union[int, float, str, None]


def _check_budget(strategy: str, budget: Any, allow_none: bool) -> float | None:
    budget = as_number(budget)
    if budget is None or budget == "raw":  # "raw": the spelling a config file or MT2STCallback can pass
        if not allow_none:
            raise ValueError(
                f"budget='raw' (or None: raw eq. 13 ratios) applies to strategy='gradnorm' only, not {strategy!r}; "
                "give a number > 0"
            )
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    return float(budget)


def _check_decay(adapt_decay: Any) -> float:
    adapt_decay = as_number(adapt_decay)
    if isinstance(adapt_decay, bool) or not isinstance(adapt_decay, (int, float)) or not 0.0 <= adapt_decay < 1.0:
        raise ValueError(f"adapt_decay must be a number in [0, 1), got {adapt_decay!r}")
    return float(adapt_decay)


class MeasuredPolicy(MeasuresEvery, SchedulePolicy):
    """``weight_k(t) = envelope_k(t) * factor_k``, the factors re-measured every ``adapt_every`` units.

    Args:
        schedules: the envelope, one schedule per auxiliary task; ``None``: ``Switch(switch_at, gamma0)`` if
            ``switch_at`` is given, else ``Constant(gamma0)``.
        gamma0: the envelope's weight (default 1.0); one value or a ``{task: value}`` mapping. Not with
            ``schedules``.
        switch_at: drop the heads here (an int step or epoch, or a fraction of the run in (0, 1); one value or
            a ``{task: value}`` mapping); ``None``: adaptive weights to the end. Not with ``schedules``.
        budget: the factors sum to it (``lambda`` in the paper); ``"raw"`` (gradnorm only): raw ratios.
        adapt_every: measure on the first batch of every this many units of time.
        adapt_decay: exponential smoothing of the measured statistics, in [0, 1).
    """

    #: The strategy name of the subclass (``gradnorm``, ...).
    name = "measured"
    #: Whether ``budget="raw"`` (raw factors) means something for this policy.
    raw_factors_allowed = False

    def __init__(
        self,
        schedules: Mapping[str, Schedule] | None = None,
        *,
        gamma0: PerTask = None,
        switch_at: PerTask = None,
        budget: Budget = 1.0,
        adapt_every: int = 10,
        adapt_decay: Number = 0.9,
    ) -> None:
        name = type(self).name
        envelope = {k: v for k, v in (("gamma0", gamma0), ("switch_at", switch_at)) if v is not None}
        if schedules is not None:
            check_accepted(f"{name} with schedules", envelope, ())
        super().__init__(schedules, strategy="envelope" if schedules is None else "custom", params=envelope)
        self.name = name
        self.budget = _check_budget(name, budget, self.raw_factors_allowed)
        self.adapt_every = check_adapt_every(adapt_every)
        self.adapt_decay = _check_decay(adapt_decay)
        # State (saved): smoothed statistics (CPU float64) and the factors in use. Per fit: the last measured
        # time (a checkpoint is written between steps, so a resumed run never re-enters a measured one).
        self.stats: dict[str, Tensor] = {}
        self.factors: dict[str, float] = {}
        self.measured_at: int | None = None
        # Per-process: the weights handed out at the current time, so that they cannot change inside an
        # accumulation window even if asked twice; the active auxiliary tasks they were asked for.
        self._weights_at: tuple[int, tuple[str, ...], dict[str, float]] | None = None
        self._active: tuple[str, ...] = ()

    # ------------------------------------------------------------------ decisions
    def bind(self, tasks: Sequence[str], total: float | None, unit: str) -> None:
        super().bind(tasks, total, unit)
        # Each fit measures afresh; a resumed one gets its state back through load_state_dict right after.
        self.stats, self.factors, self.measured_at = {}, {}, None
        self._weights_at, self._active = None, ()

    def weights(self, t: int, active: Sequence[str]) -> dict[str, float]:
        key = (t, tuple(active))
        if self._weights_at is not None and self._weights_at[:2] == key:
            return dict(self._weights_at[2])
        # Until a task's first measurement: an equal share of the budget (raw ratios: 1).
        default = self.budget / len(active) if self.budget is not None and active else 1.0
        envelope = super().weights(t, active)
        out = {task: envelope[task] * self.factors.get(task, default) for task in active}
        self._weights_at, self._active = (*key, out), tuple(active)
        return dict(out)

    def observe_step(self, t: int, record: StepRecord, reduce: Reducer) -> None:
        primary, *aux = record.losses
        if not aux:
            return
        self.measured_at = t
        values = self.measure(primary, aux, record, reduce)
        # Reduced before this check, so every rank takes the same branch. A non-finite value (an fp16
        # overflow of the scaled gradients, a NaN loss) updates no statistic: the factors stay as they are.
        if values is None or not bool(torch.isfinite(values).all()):
            return
        self.update(primary, aux, values)

    @abstractmethod
    def measure(self, primary: str, aux: Sequence[str], record: StepRecord, reduce: Reducer) -> Tensor | None:
        """This step's raw statistics, averaged over ranks with ``reduce.mean``, as a CPU float64 vector."""

    @abstractmethod
    def update(self, primary: str, aux: Sequence[str], values: Tensor) -> None:
        """Fold finite ``values`` (from :meth:`measure`) into :attr:`stats` and set :attr:`factors`."""

    def _smooth(self, key: str, value: Tensor) -> Tensor:
        self.stats[key] = adaptive.ema(self.stats.get(key), value, self.adapt_decay)
        return self.stats[key]

    def _set_factors(
        self, measured: Sequence[str], aux: Sequence[str], compute: Callable[[float | None], Tensor | None]
    ) -> None:
        """New factors for the ``measured`` tasks, ``compute(budget)``; every other task of ``aux`` keeps its
        factor, and the measured ones share what it leaves of the budget (raw factors: ``compute(None)``)."""
        if not measured:
            return
        if self.budget is None:
            new = compute(None)
        else:
            default = self.budget / len(aux)
            left = self.budget - sum(self.factors.get(task, default) for task in aux if task not in measured)
            if left <= 0:
                return
            new = compute(left)
        if new is not None:
            self.factors.update(zip(measured, new.tolist()))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "stats": {k: v.detach().cpu().clone() for k, v in self.stats.items()},
            "factors": dict(self.factors),
            "measured_at": self.measured_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stats = {k: torch.as_tensor(v, dtype=torch.float64).cpu().clone() for k, v in state["stats"].items()}
        self.factors = {k: float(v) for k, v in state["factors"].items()}
        self.measured_at = state.get("measured_at")
        self._weights_at = None


class GradientPolicy(MeasuredPolicy):
    """A measured policy whose statistic is each task's squared gradient norm (``gradnorm``, ``fisher``).

    Args:
        measure_on: ``"representation"``: gradients with respect to the shared features ``h`` given as
            ``mt2st_loss(losses, features=h)``, through the heads only (one head backward per task, no
            encoder backward); ``"parameters"``: with respect to the shared encoder's parameters (one encoder
            backward per task); ``"auto"`` (default): the representation whenever features are given.

    A task whose squared norm is 0 on a measuring step (e.g. a batch without labels of that task) keeps its
    statistic and its factor: an exactly zero gradient would otherwise take the whole budget (eq. 13) or none
    of it (eq. 14).
    """

    def __init__(
        self,
        schedules: Mapping[str, Schedule] | None = None,
        *,
        gamma0: PerTask = None,
        switch_at: PerTask = None,
        budget: Budget = 1.0,
        adapt_every: int = 10,
        adapt_decay: Number = 0.9,
        measure_on: str = "auto",
    ) -> None:
        if measure_on not in ("auto", "representation", "parameters"):
            raise ValueError(f"measure_on must be 'auto', 'representation' or 'parameters', got {measure_on!r}")
        super().__init__(
            schedules, gamma0=gamma0, switch_at=switch_at, budget=budget, adapt_every=adapt_every,
            adapt_decay=adapt_decay,
        )
        self.measure_on: MeasureOn = measure_on  # type: ignore[assignment]
        self._shared: list[Tensor] | None = None

    def use_shared_parameters(self, parameters: Iterable[Tensor]) -> None:
        """The shared encoder's parameters, for ``measure_on="parameters"`` (and ``"auto"`` without features).
        ``MT2STCallback`` passes ``module.shared_parameters()`` once per fit."""
        self._shared = list(parameters)

    def mode(self, record: StepRecord) -> str:
        if self.measure_on == "auto":
            return "representation" if record.features is not None else "parameters"
        return self.measure_on

    def measure(self, primary: str, aux: Sequence[str], record: StepRecord, reduce: Reducer) -> Tensor:
        tasks = [primary, *aux]
        if self.mode(record) == "representation":
            if record.features is None:
                raise ValueError(
                    f"{self.name}(measure_on='representation') needs the shared features: in training_step, "
                    "return self.mt2st_loss(losses, features=h) with h the encoder output the heads were applied to"
                )
            if not record.features.requires_grad:
                raise ValueError(
                    f"{self.name}: the features given to mt2st_loss do not require grad (detached, or computed "
                    "under no_grad); pass the encoder output itself, or measure_on='parameters'"
                )
            inputs, what = [record.features], "features given to mt2st_loss"
        else:
            if self._shared is None:
                raise RuntimeError(
                    f"{self.name} measures on the shared parameters, but none were given: call "
                    "policy.use_shared_parameters(module.shared_parameters()) before training (MT2STCallback does), "
                    "or pass features=h to mt2st_loss"
                )
            inputs, what = self._shared, "shared parameters"
        # Under fp16 small task gradients underflow unless the loss is scaled, as the training backward is:
        # measure with the GradScaler's scale and divide it out again, so that the scale never moves a weight.
        scale = float(record.loss_scale)
        losses = [record.losses[t] * scale if scale != 1.0 else record.losses[t] for t in tasks]
        sq = adaptive.squared_grad_norms(losses, inputs, reduce.mean, names=tasks, what=what)
        return sq.detach().to("cpu", torch.float64) / scale**2

    def update(self, primary: str, aux: Sequence[str], values: Tensor) -> None:
        tasks = [primary, *aux]
        for task, value in zip(tasks, values):
            if value > 0:  # a zero norm is no measurement: keep the previous statistic (and factor)
                self._smooth(f"sqnorm/{task}", value)
        measured = [task for task, value in zip(aux, values[1:]) if value > 0]
        if not measured:
            return
        aux_sq = torch.stack([self.stats[f"sqnorm/{task}"] for task in measured])
        primary_sq = self.stats.get(f"sqnorm/{primary}")
        self._set_factors(measured, aux, lambda budget: self.factors_from(primary_sq, aux_sq, budget))

    @abstractmethod
    def factors_from(self, primary_sq: Tensor | None, aux_sq: Tensor, budget: float | None) -> Tensor | None:
        """The measured auxiliary tasks' factors from the smoothed squared norms (``primary_sq``: ``None``
        until the primary task's gradient was non-zero once), summing to ``budget``; ``None``: no update."""
