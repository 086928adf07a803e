"""``SchedulePolicy``: weights and finished tasks from one :class:`~mt2st_lightning.Schedule` per auxiliary task.

Every named schedule strategy (``stl``, ``mtl``, ``diminish``, ``switch``) and custom schedules are this
policy; the adaptive policies use it as their envelope. It observes nothing and so holds no state: a fraction of
the run is resolved against the run's length once, in :meth:`SchedulePolicy.bind`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Union

from mt2st_lightning.policies.base import Policy
from mt2st_lightning.schedules import (
    Constant,
    Diminish,
    Schedule,
    Switch,
    _check_finite_non_negative,
    as_number,
)

__all__ = ["Param", "SchedulePolicy", "check_accepted", "schedules_for"]

#: A strategy parameter: one value for every auxiliary task, or a mapping from task name to its own value.
Param = Union[float, int, None, Mapping[str, Union[float, int, None]]]


def _per_task(name: str, value: Param, task: str, tasks: Sequence[str]) -> float | int | None:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(tasks))
        if unknown:
            raise ValueError(f"{name} names unknown auxiliary task(s) {unknown}; the tasks are {list(tasks)}")
        if task not in value:
            raise ValueError(f"{name} gives no value for auxiliary task {task!r}; give one for each of {list(tasks)}")
        return as_number(value[task])
    return as_number(value)


def task_gamma0(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> float | int:
    """``task``'s weight before its schedule acts, from ``params["gamma0"]`` (one value, or one per task)."""
    value = _per_task("gamma0", params.get("gamma0", 1.0), task, tasks)
    _check_finite_non_negative("gamma0", value)  # named as the user named it, not "Constant.value"
    return value


def _stl(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    return Constant(0.0)


def _mtl(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    return Constant(task_gamma0(task, tasks, params))


def _diminish(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    return Diminish(
        gamma0=task_gamma0(task, tasks, params),
        **{
            name: _per_task(name, params.get(name, default), task, tasks)
            for name, default in (("eta", 0.01), ("nu", 1.0), ("prune_below", None))
        },
    )


def _switch(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    at = _per_task("switch_at", params.get("switch_at"), task, tasks)
    if at is None:
        raise ValueError("strategy='switch' needs switch_at: an int step (or epoch) or a fraction in (0, 1)")
    return Switch(at=at, gamma0=task_gamma0(task, tasks, params))


def envelope(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    """The adaptive strategies' envelope: ``Switch(switch_at, gamma0)`` if ``switch_at`` is given, else
    ``Constant(gamma0)``."""
    g0 = task_gamma0(task, tasks, params)
    at = _per_task("switch_at", params.get("switch_at"), task, tasks)
    return Constant(g0) if at is None else Switch(at=at, gamma0=g0)


#: The schedule strategies: name -> (the parameters it reads, how it builds one task's schedule).
SCHEDULE_BUILDERS: dict[str, tuple[tuple[str, ...], Callable[[str, Sequence[str], Mapping[str, Param]], Schedule]]] = {
    "stl": ((), _stl),
    "mtl": (("gamma0",), _mtl),
    "diminish": (("gamma0", "eta", "nu", "prune_below"), _diminish),
    "switch": (("gamma0", "switch_at"), _switch),
}
ENVELOPE_PARAMS = ("gamma0", "switch_at")

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


def schedules_for(strategy: str, tasks: Sequence[str], **params: Param) -> dict[str, Schedule]:
    """One schedule per auxiliary task for a named schedule strategy, or the envelope of an adaptive one
    (``strategy="envelope"``).

    Every parameter is one value for all tasks, or a mapping from task name to its own value; a parameter
    not given takes its default (``gamma0=1.0``, ``eta=0.01``, ``nu=1.0``, ``prune_below=None``).

    - ``stl``: weight 0 from the start; the auxiliary heads never run.
    - ``mtl``: constant weight ``gamma0``.
    - ``diminish``: ``gamma0 * exp(-eta * t ** nu)``, finished below ``prune_below`` if given.
    - ``switch``: ``gamma0`` before ``switch_at``, 0 from it on.
    - ``envelope``: ``Switch(switch_at, gamma0)`` if ``switch_at`` is given, else ``Constant(gamma0)``.

    A parameter the strategy ignores is an error, as is a bad value.
    """
    if strategy == "envelope":
        accepted, build = ENVELOPE_PARAMS, envelope
    elif strategy in SCHEDULE_BUILDERS:
        accepted, build = SCHEDULE_BUILDERS[strategy]
    else:
        raise ValueError(
            f"unknown schedule strategy {strategy!r}; choose one of {', '.join([*SCHEDULE_BUILDERS, 'envelope'])}"
        )
    check_accepted(strategy, params, accepted)
    out: dict[str, Schedule] = {}
    for task in tasks:
        out[task] = build(task, tasks, params)
    return out


def check_values(strategy: str, params: Mapping[str, Param]) -> None:
    """Fail at construction, not at fit time, on any bad value, per-task values included: only the task
    names of a per-task mapping wait until the module's tasks are known (:meth:`SchedulePolicy.bind`)."""

    def first(value: Param) -> Any:
        return next(iter(value.values()), None) if isinstance(value, Mapping) else value

    base = {name: first(value) for name, value in params.items()}
    schedules_for(strategy, ["<any task>"], **base)
    for name, value in params.items():
        if isinstance(value, Mapping):
            for v in value.values():
                schedules_for(strategy, ["<any task>"], **{**base, name: v})


class SchedulePolicy(Policy):
    """Auxiliary weights from per-task schedules: ``weights(t) = schedule(t)``, finished when the schedule is.

    Args:
        schedules: one :class:`~mt2st_lightning.Schedule` per auxiliary task (checked against the module's
            tasks in :meth:`bind`), or ``None`` to build them from ``strategy`` and ``params`` then.
        strategy: a schedule strategy (``stl``, ``mtl``, ``diminish``, ``switch``) or ``"envelope"``; with
            ``schedules`` given, only a name.
        params: that strategy's parameters, as given to :func:`schedules_for`; checked here, at construction.
    """

    def __init__(
        self,
        schedules: Mapping[str, Schedule] | None = None,
        *,
        strategy: str = "custom",
        params: Mapping[str, Param] | None = None,
    ) -> None:
        params = dict(params or {})
        if schedules is not None:
            bad = {t: s for t, s in schedules.items() if not isinstance(s, Schedule)}
            if bad:
                raise TypeError(f"schedules must map task names to Schedule objects, got {bad}")
            check_accepted("custom schedules", params, ())
            self._build: Callable[[Sequence[str]], dict[str, Schedule]] | None = None
        else:
            check_values(strategy, params)
            self._build = functools.partial(schedules_for, strategy, **params)  # picklable, for ddp_spawn
        self.name = strategy
        self._given = dict(schedules) if schedules is not None else None
        #: The bound schedules (fractions of the run resolved), per auxiliary task; set by :meth:`bind`.
        self.schedules: dict[str, Schedule] = {}
        self.total: float | None = None

    def bind(self, tasks: Sequence[str], total: float | None, unit: str) -> None:
        if self._given is not None:
            unknown = sorted(set(self._given) - set(tasks))
            missing = sorted(set(tasks) - set(self._given))
            if unknown or missing:
                raise ValueError(
                    f"schedules must cover exactly the module's auxiliary tasks {list(tasks)}: "
                    + "; ".join(
                        part
                        for part in (unknown and f"unknown {unknown}", missing and f"missing {missing}")
                        if part
                    )
                )
            schedules = {task: self._given[task] for task in tasks}
        else:
            assert self._build is not None
            schedules = self._build(tasks)
        bound = {task: schedule.bind(total) for task, schedule in schedules.items()}
        for schedule in bound.values():
            schedule.validate(total)
        self.schedules, self.total = bound, total

    def _schedule(self, task: str) -> Schedule:
        try:
            return self.schedules[task]
        except KeyError:
            raise RuntimeError(
                f"{type(self).__name__} has no schedule for task {task!r}: bind(tasks, total, unit) must be "
                "called first (MT2STCallback does it when fitting starts)"
            ) from None

    def weights(self, t: int, active: Sequence[str]) -> dict[str, float]:
        return {task: self._schedule(task)(t, self.total) for task in active}

    def finished(self, t: int, active: Sequence[str]) -> list[str]:
        return [task for task in active if self._schedule(task).finished(t, self.total)]

    def state_dict(self) -> dict[str, Any]:
        return {}  # a pure function of time: nothing to save (the callback saves the run's planned length)
