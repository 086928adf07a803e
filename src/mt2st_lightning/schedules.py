"""Auxiliary-task weight schedules: pure functions of time.

A schedule maps ``(t, total)`` to a weight, where ``t`` counts optimizer steps (or epochs, the callback's
choice) from 0 and ``total`` is how many the run plans. Schedules hold no state, import nothing from
Lightning and compose by multiplication, so each one is checked against its formula in isolation.

Besides its weight, a schedule says when its task is *finished*: from that time on the weight is 0 (or
below a pruning threshold) for good, and the task's head may leave the computation.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "Constant",
    "Diminish",
    "Product",
    "Schedule",
    "Switch",
    "TimeBound",
    "check_time_bound",
    "resolve_time_bound",
]

#: A point in the run: an int time (an optimizer step, or an epoch, in the callback's ``unit``) or a float in
#: (0, 1), a fraction of the run's planned length. ``Switch.at`` and every policy's time bound take this form.
TimeBound = Union[int, float]


class Schedule(ABC):
    """A task weight as a pure function of time."""

    @abstractmethod
    def __call__(self, t: float, total: float | None = None) -> float:
        """The weight at time ``t`` of a run that plans ``total`` units (``None``: unknown)."""

    @abstractmethod
    def finished(self, t: float, total: float | None = None) -> bool:
        """Whether the task is done at ``t``: the weight is then 0 (or pruned) at ``t`` and every later time."""

    def validate(self, total: float | None) -> None:
        """Raise ``ValueError`` if the schedule cannot be carried out in a run of ``total`` units."""

    def bind(self, total: float | None) -> Schedule:
        """This schedule with every fraction of the run resolved against ``total``, once, to an absolute time.
        Raise ``ValueError`` if a fraction cannot be resolved (unknown length)."""
        return self

    def __mul__(self, other: Schedule) -> Product:
        if not isinstance(other, Schedule):
            return NotImplemented
        return Product((self, other))


def as_number(value: Any) -> Any:
    """A NumPy (or any ``numbers``) integer or float scalar as the Python ``int``/``float`` it stands for;
    anything else (bools included) unchanged, for the caller to refuse."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_finite_non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_time_bound(name: str, value: Any) -> None:
    """Refuse, naming ``name``, anything but a :data:`TimeBound`: an int >= 0, or a float in (0, 1).

    The one parser of "a step, or a fraction of the run": ``Switch.at`` and every policy's time bound use it.
    """
    value = as_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be an int (step or epoch) or a float in (0, 1), got {value!r}: a float is a fraction of the run"
        )
    if isinstance(value, float) and not 0.0 < value < 1.0:
        raise ValueError(
            f"{name}={value!r}: a float is a fraction of the run and must lie in (0, 1); "
            "pass an int for an absolute step (or epoch)"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def resolve_time_bound(name: str, value: TimeBound, total: float | None, unit: str = "step") -> int:
    """A checked :data:`TimeBound` as a time in ``unit``: an int as it is, a fraction of the run rounded to the
    nearest unit of ``total``; an unknown length is an error that says how to give one."""
    value = as_number(value)
    if isinstance(value, int):
        return value
    if total is None or not math.isfinite(total):
        raise ValueError(
            f"{name}={value} is a fraction of the run, but the run's length is unknown; set Trainer(max_steps=...) "
            f"or Trainer(max_epochs=...), or give an int {unit}"
        )
    return int(round(value * total))


def _coerce(schedule: Schedule, *names: str) -> None:
    # Frozen dataclasses: NumPy scalars become Python numbers before validation (np.int64 is not an int).
    for name in names:
        object.__setattr__(schedule, name, as_number(getattr(schedule, name)))


@dataclass(frozen=True)
class Constant(Schedule):
    """``gamma(t) = value``. ``Constant(1.0)`` is plain multi-task learning, ``Constant(0.0)`` single-task."""

    value: float = 1.0

    def __post_init__(self) -> None:
        _coerce(self, "value")
        _check_finite_non_negative("Constant.value", self.value)

    def __call__(self, t: float, total: float | None = None) -> float:
        return float(self.value)

    def finished(self, t: float, total: float | None = None) -> bool:
        return self.value == 0


@dataclass(frozen=True)
class Diminish(Schedule):
    """``gamma(t) = gamma0 * exp(-eta * t ** nu)`` (MT2ST's Diminish).

    With ``prune_below`` set, the task is finished once the weight falls below it: the weight is then
    reported as 0 and the head may be dropped, exactly as after a switch.
    """

    gamma0: float = 1.0
    eta: float = 0.01
    nu: float = 1.0
    prune_below: float | None = None

    def __post_init__(self) -> None:
        _coerce(self, "gamma0", "eta", "nu", "prune_below")
        _check_finite_non_negative("Diminish.gamma0", self.gamma0)
        _check_finite_non_negative("Diminish.eta", self.eta)
        _check_finite_non_negative("Diminish.nu", self.nu)
        if self.nu == 0:
            raise ValueError("Diminish.nu must be > 0 (nu = 0 makes the weight constant; use strategy='mtl')")
        if self.prune_below is not None:
            _check_finite_non_negative("Diminish.prune_below", self.prune_below)
            if self.prune_below == 0:
                raise ValueError("Diminish.prune_below must be > 0, or None to never prune")

    def _raw(self, t: float) -> float:
        if self.eta == 0:
            return float(self.gamma0)
        try:
            exponent = self.eta * float(t) ** self.nu
        except OverflowError:  # t ** nu beyond the float range: exp(-huge) underflows to 0
            return 0.0
        return self.gamma0 * math.exp(-exponent)

    def __call__(self, t: float, total: float | None = None) -> float:
        return 0.0 if self.finished(t, total) else self._raw(t)

    def finished(self, t: float, total: float | None = None) -> bool:
        if self.gamma0 == 0:
            return True
        return self.prune_below is not None and self._raw(t) < self.prune_below

    def prune_time(self) -> float | None:
        """The first (real-valued) time at which the weight falls below ``prune_below``; ``None`` if never."""
        if self.prune_below is None:
            return None
        if self.gamma0 < self.prune_below:
            return 0.0
        if self.eta == 0:
            return None
        try:
            return (math.log(self.gamma0 / self.prune_below) / self.eta) ** (1.0 / self.nu)
        except OverflowError:  # the crossing lies beyond the float range
            return math.inf


@dataclass(frozen=True)
class Switch(Schedule):
    """``gamma(t) = gamma0`` for ``t < at`` and ``0`` from ``at`` on (MT2ST's Switch).

    ``at`` is an int (a time in the callback's unit) or a float in (0, 1): a fraction of the planned total,
    rounded to the nearest unit.
    """

    at: TimeBound
    gamma0: float = 1.0

    def __post_init__(self) -> None:
        _coerce(self, "at", "gamma0")
        _check_finite_non_negative("Switch.gamma0", self.gamma0)
        check_time_bound("Switch.at", self.at)

    def switch_time(self, total: float | None) -> int:
        """``at`` resolved to a time in the callback's unit."""
        return resolve_time_bound("Switch.at", self.at, total)

    def __call__(self, t: float, total: float | None = None) -> float:
        return 0.0 if self.finished(t, total) else float(self.gamma0)

    def finished(self, t: float, total: float | None = None) -> bool:
        return self.gamma0 == 0 or t >= self.switch_time(total)

    def bind(self, total: float | None) -> Switch:
        """An absolute switch point: a fraction of the run is rounded to a step (or epoch) here, once."""
        return self if isinstance(self.at, int) else Switch(at=self.switch_time(total), gamma0=self.gamma0)

    def validate(self, total: float | None) -> None:
        at = self.switch_time(total)
        # Time runs from 0 to total - 1, so a switch at `total` would never happen either.
        if total is not None and math.isfinite(total) and at >= total:
            where = "beyond" if at > total else "at"
            raise ValueError(
                f"the switch point {at} lies {where} the run's end ({int(total)}): the auxiliary tasks would "
                "never be dropped; lower switch_at or use strategy='mtl'"
            )


@dataclass(frozen=True)
class Product(Schedule):
    """The product of schedules, e.g. ``Diminish(...) * Switch(...)``: finished once any factor is."""

    factors: tuple[Schedule, ...]

    def __post_init__(self) -> None:
        flat: list[Schedule] = []
        for f in self.factors:
            flat.extend(f.factors if isinstance(f, Product) else (f,))
        object.__setattr__(self, "factors", tuple(flat))

    def __call__(self, t: float, total: float | None = None) -> float:
        if self.finished(t, total):
            return 0.0
        return math.prod(f(t, total) for f in self.factors)

    def finished(self, t: float, total: float | None = None) -> bool:
        return any(f.finished(t, total) for f in self.factors)

    def validate(self, total: float | None) -> None:
        for f in self.factors:
            f.validate(total)

    def bind(self, total: float | None) -> Product:
        return Product(tuple(f.bind(total) for f in self.factors))
