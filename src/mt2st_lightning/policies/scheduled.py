"""``SchedulePolicy``: weights and finished tasks from one :class:`~mt2st_lightning.Schedule` per auxiliary task.

Every named schedule strategy is a subclass whose typed arguments are its parameters (:class:`STLPolicy`,
:class:`MTLPolicy`, :class:`DiminishPolicy`, :class:`SwitchPolicy`); custom schedules are this policy itself,
and the adaptive policies use it as their envelope. It observes nothing and so holds no state: a fraction of
the run is resolved against the run's length once, in :meth:`SchedulePolicy.bind`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from mt2st_lightning.policies.base import Policy
from mt2st_lightning.policies.params import PerTask, check_accepted, check_gamma0, parameters_of, per_task
from mt2st_lightning.schedules import Constant, Diminish, Schedule, Switch

__all__ = [
    "DiminishPolicy",
    "MTLPolicy",
    "Param",
    "STLPolicy",
    "SchedulePolicy",
    "SwitchPolicy",
    "schedules_for",
]

#: A strategy parameter: one value for every auxiliary task, or a mapping from task name to its own value.
Param = PerTask


def task_gamma0(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> float | int:
    """``task``'s weight before its schedule acts, from ``params["gamma0"]`` (one value, or one per task)."""
    gamma0 = params.get("gamma0", 1.0)
    check_gamma0(gamma0)
    return per_task("gamma0", gamma0, task, tasks)


def _stl(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    return Constant(0.0)


def _mtl(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    return Constant(task_gamma0(task, tasks, params))


def _diminish(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    return Diminish(
        gamma0=task_gamma0(task, tasks, params),
        **{
            name: per_task(name, params.get(name, default), task, tasks)
            for name, default in (("eta", 0.01), ("nu", 1.0), ("prune_below", None))
        },
    )


def _switch(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    at = per_task("switch_at", params.get("switch_at"), task, tasks)
    if at is None:
        raise ValueError("strategy='switch' needs switch_at: an int step (or epoch) or a fraction in (0, 1)")
    return Switch(at=at, gamma0=task_gamma0(task, tasks, params))


def envelope(task: str, tasks: Sequence[str], params: Mapping[str, Param]) -> Schedule:
    """The adaptive strategies' envelope: ``Switch(switch_at, gamma0)`` if ``switch_at`` is given, else
    ``Constant(gamma0)``."""
    g0 = task_gamma0(task, tasks, params)
    at = per_task("switch_at", params.get("switch_at"), task, tasks)
    return Constant(g0) if at is None else Switch(at=at, gamma0=g0)


#: How each schedule strategy builds one task's schedule; its parameters are its policy class's arguments.
_BUILDERS: dict[str, Callable[[str, Sequence[str], Mapping[str, Param]], Schedule]] = {
    "stl": _stl,
    "mtl": _mtl,
    "diminish": _diminish,
    "switch": _switch,
    "envelope": envelope,
}
ENVELOPE_PARAMS = ("gamma0", "switch_at")


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
        accepted: Collection[str] = ENVELOPE_PARAMS
    elif strategy in SCHEDULE_POLICIES:
        accepted = parameters_of(SCHEDULE_POLICIES[strategy])
    else:
        raise ValueError(
            f"unknown schedule strategy {strategy!r}; choose one of {', '.join([*SCHEDULE_POLICIES, 'envelope'])}"
        )
    build = _BUILDERS[strategy]
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


class STLPolicy(SchedulePolicy):
    """``strategy="stl"``: single-task learning, auxiliary weights 0 from the start (their heads never run)."""

    name = "stl"

    def __init__(self) -> None:
        super().__init__(strategy="stl")


class MTLPolicy(SchedulePolicy):
    """``strategy="mtl"``: plain multi-task learning, constant auxiliary weights.

    Args:
        gamma0: the auxiliary weight; one value or a ``{task: value}`` mapping.
    """

    name = "mtl"

    def __init__(self, gamma0: PerTask = 1.0) -> None:
        super().__init__(strategy="mtl", params={"gamma0": gamma0})


class DiminishPolicy(SchedulePolicy):
    """``strategy="diminish"`` (MT2ST-Diminish): ``gamma0 * exp(-eta * t ** nu)``, a head dropped once its
    weight falls below ``prune_below``.

    Args:
        gamma0, eta, nu: the decay; each one value or a ``{task: value}`` mapping.
        prune_below: drop a task's head once its weight is below this (``None``: never).
    """

    name = "diminish"

    def __init__(
        self, gamma0: PerTask = 1.0, eta: PerTask = 0.01, nu: PerTask = 1.0, prune_below: PerTask = None
    ) -> None:
        super().__init__(strategy="diminish", params=dict(gamma0=gamma0, eta=eta, nu=nu, prune_below=prune_below))


class SwitchPolicy(SchedulePolicy):
    """``strategy="switch"`` (MT2ST-Switch): weight ``gamma0`` until ``switch_at``, then 0 and the heads leave.

    Args:
        switch_at: an int step (or epoch, per the callback's ``unit``) or a float in (0, 1), a fraction of the
            run; one value or a ``{task: value}`` mapping. Required.
        gamma0: the auxiliary weight before the switch; one value or a ``{task: value}`` mapping.
    """

    name = "switch"

    def __init__(self, switch_at: PerTask = None, gamma0: PerTask = 1.0) -> None:
        super().__init__(strategy="switch", params=dict(switch_at=switch_at, gamma0=gamma0))


#: The schedule strategies, by name.
SCHEDULE_POLICIES: dict[str, type[SchedulePolicy]] = {
    cls.name: cls for cls in (STLPolicy, MTLPolicy, DiminishPolicy, SwitchPolicy)
}
