"""MT2ST's decision layer: every strategy is a :class:`Policy`, built by name with :func:`policy_for`.

The registry below is the one place strategy names live: :data:`STRATEGIES` is its keys. A new strategy is one
entry, ``name -> factory``, where a factory is called as ``factory(schedules=..., **params)`` with only the
parameters the user gave, supplies its own defaults, and raises ``ValueError`` for any parameter it would
ignore.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from mt2st_lightning.policies.base import Policy, Reducer
from mt2st_lightning.policies.fisher import FisherPolicy
from mt2st_lightning.policies.gradnorm import GradNormPolicy
from mt2st_lightning.policies.measured import GradientPolicy, MeasuredPolicy
from mt2st_lightning.policies.noise import NoisePolicy
from mt2st_lightning.policies.scheduled import (
    SCHEDULE_BUILDERS,
    Param,
    SchedulePolicy,
    check_accepted,
    schedules_for,
)
from mt2st_lightning.schedules import Schedule, as_number

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "STRATEGIES",
    "FisherPolicy",
    "GradNormPolicy",
    "GradientPolicy",
    "MeasuredPolicy",
    "NoisePolicy",
    "Param",
    "REGISTRY",
    "Policy",
    "Reducer",
    "SchedulePolicy",
    "policy_for",
    "schedules_for",
]

Factory = Callable[..., Policy]


class _SchedulePolicyFactory:
    """``SchedulePolicy`` for one named schedule strategy (a class, not a lambda: callbacks get pickled)."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy

    def __call__(self, *, schedules: Mapping[str, Schedule] | None = None, **params: Any) -> Policy:
        if schedules is not None:
            raise ValueError(
                f"got both strategy={self.strategy!r} and schedules: the schedules define the weights; drop "
                f"strategy, or pass one of {', '.join(ADAPTIVE_STRATEGIES)} to scale the schedules adaptively"
            )
        return SchedulePolicy(strategy=self.strategy, params=params)


class _PolicyClassFactory:
    """A policy class whose keyword arguments are its parameters, imported when first used."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *, schedules: Mapping[str, Schedule] | None = None, **params: Any) -> Policy:
        cls = getattr(importlib.import_module(self.module), self.name)
        if schedules is not None:
            raise ValueError(f"strategy={cls.name!r} takes no schedules; drop schedules=")
        check_accepted(cls.name, params, list(inspect.signature(cls).parameters))
        return cls(**params)


def _measured(cls: type[MeasuredPolicy]) -> Factory:
    return cls.from_params


_MEASURED: dict[str, type[MeasuredPolicy]] = {cls.name: cls for cls in (GradNormPolicy, FisherPolicy, NoisePolicy)}

#: name -> factory, for every strategy ``MT2STCallback(strategy=...)`` accepts.
REGISTRY: dict[str, Factory] = {
    **{name: _SchedulePolicyFactory(name) for name in SCHEDULE_BUILDERS},
    **{name: _measured(cls) for name, cls in _MEASURED.items()},
    "plateau": _PolicyClassFactory("mt2st_lightning.policies.plateau", "PlateauSwitch"),
    "conflict": _PolicyClassFactory("mt2st_lightning.policies.conflict", "ConflictSwitch"),
}
#: Every strategy name, in the order the README lists them.
STRATEGIES: tuple[str, ...] = tuple(REGISTRY)
#: The strategies whose weights are an envelope schedule times a factor measured during training; these
#: (alone) also take ``schedules=`` as their envelope.
ADAPTIVE_STRATEGIES: tuple[str, ...] = tuple(_MEASURED)


def _as_python(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: as_number(v) for k, v in value.items()}
    return as_number(value)


def policy_for(strategy: str | None, *, schedules: Mapping[str, Schedule] | None = None, **params: Any) -> Policy:
    """The policy for a named strategy, from the parameters the user gave (pass only those: each factory
    supplies its defaults, and a parameter the strategy would ignore is an error naming it).

    ``strategy=None`` with ``schedules``: a :class:`SchedulePolicy` over those schedules. NumPy integer and
    float scalars are accepted wherever Python numbers are. Every value is checked here, at construction; only
    the task names of a ``{task: value}`` mapping wait until :meth:`Policy.bind`.
    """
    params = {name: _as_python(value) for name, value in params.items()}
    if strategy is None:
        if schedules is None:
            raise ValueError(f"give a strategy (one of {', '.join(STRATEGIES)}) or per-task schedules")
        return SchedulePolicy(schedules, params=params)
    if strategy not in REGISTRY:
        raise ValueError(f"unknown MT2ST strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return REGISTRY[strategy](schedules=schedules, **params)
