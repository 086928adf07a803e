"""The parameter types and checks every policy shares: one definition of each, used by every strategy.

A strategy declares its parameters once, as the typed keyword arguments of its policy class; these are the
types those signatures use (LightningCLI reads them: ``int`` comes before ``float`` so that ``switch_at: 5``
stays the step 5) and the checks behind them, so that a parameter of the same name means, and is refused,
the same way under every strategy.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Union

from mt2st_lightning.schedules import TimeBound, as_number, check_time_bound, resolve_time_bound

__all__ = [
    "Number",
    "PerTask",
    "TimeBound",
    "MeasuresEvery",
    "check_accepted",
    "check_adapt_every",
    "check_gamma0",
    "check_time_bound",
    "gamma0_per_task",
    "is_int",
    "is_real",
    "parameters_of",
    "per_task",
    "resolve_time_bound",
]

#: A number as a config file writes it (an int stays an int).
Number = Union[int, float]
#: One value for every auxiliary task, or a ``{task: value}`` mapping (task names are checked at ``bind``).
PerTask = Union[int, float, Mapping[str, Union[int, float, None]], None]


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def per_task(name: str, value: Any, task: str, tasks: Sequence[str]) -> Any:
    """``task``'s own value of a :data:`PerTask` parameter ``name``."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(tasks))
        if unknown:
            raise ValueError(f"{name} names unknown auxiliary task(s) {unknown}; the tasks are {list(tasks)}")
        if task not in value:
            raise ValueError(f"{name} gives no value for auxiliary task {task!r}; give one for each of {list(tasks)}")
        return as_number(value[task])
    return as_number(value)


def check_gamma0(gamma0: Any) -> None:
    """``gamma0``, the auxiliary weight before a strategy acts: a finite number >= 0, or a ``{task: number}``
    mapping of them."""
    values = gamma0.values() if isinstance(gamma0, Mapping) else (gamma0,)
    for value in values:
        value = as_number(value)
        if not is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"gamma0 must be a finite number >= 0 (or a {{task: number}} mapping), got {gamma0!r}")


def gamma0_per_task(gamma0: Any, tasks: Sequence[str]) -> dict[str, float]:
    """Each task's ``gamma0``, from one value or a mapping (checked with :func:`check_gamma0`)."""
    check_gamma0(gamma0)
    return {task: float(per_task("gamma0", gamma0, task, tasks)) for task in tasks}


def check_adapt_every(adapt_every: Any) -> int:
    """``adapt_every``: measure every this many steps (or epochs), an int >= 1."""
    adapt_every = as_number(adapt_every)
    if not is_int(adapt_every) or adapt_every < 1:
        raise ValueError(f"adapt_every must be an int >= 1 (steps or epochs between measurements), got {adapt_every!r}")
    return int(adapt_every)


def parameters_of(policy_class: type) -> tuple[str, ...]:
    """The strategy parameters a policy class declares: its keyword arguments, ``schedules`` (an envelope,
    not a parameter) excepted. Its typed ``__init__`` is the one place a strategy declares them."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(
        name
        for name, parameter in inspect.signature(policy_class).parameters.items()
        if parameter.kind in kinds and name != "schedules"
    )


# Why a parameter does nothing under a strategy, and what to do instead.
_HINTS = {
    "switch_at": "to drop the heads at a step use strategy='switch', or compose schedules, e.g. "
    "schedules={task: Diminish(...) * Switch(at=...)}; diminish drops a head once its weight is below prune_below",
    "prune_below": "only strategy='diminish' prunes",
    "eta": "only strategy='diminish' decays",
    "nu": "only strategy='diminish' decays",
}


def check_accepted(strategy: str, params: Mapping[str, Any], accepted: Collection[str]) -> None:
    """Refuse, naming them, the parameters that ``strategy`` would ignore."""
    ignored = sorted(set(params) - set(accepted))
    if ignored:
        hints = "; ".join(f"{name}: {_HINTS[name]}" for name in ignored if name in _HINTS)
        raise ValueError(
            f"strategy={strategy!r} ignores {', '.join(ignored)}: remove "
            f"{'it' if len(ignored) == 1 else 'them'} (it takes {', '.join(accepted) or 'no parameters'})"
            + (f". {hints}" if hints else "")
        )


class MeasuresEvery:
    """The measuring cadence of every policy that observes steps: the first batch of every ``adapt_every``-th
    unit of time, while an auxiliary task is active, and each time once (``measured_at``, saved with the
    policy's state, so that a run resumed inside a measured time does not measure it again).

    The policy sets ``adapt_every`` (with :func:`check_adapt_every`), ``measured_at`` when it measures, and
    ``_active`` (the active auxiliary tasks it was last asked about)."""

    adapt_every: int
    measured_at: int | None
    _active: tuple[str, ...]

    def wants_step(self, t: int) -> bool:
        return bool(self._active) and t % self.adapt_every == 0 and t != self.measured_at
