"""MT2ST's decision layer: every strategy is a :class:`Policy`, built by name with :func:`policy_for`.

The registry below is the one place strategy names live: :data:`STRATEGIES` is its keys. A strategy is one
entry, ``name -> policy class``, and the class's typed keyword arguments are the strategy's parameters, each
declared there once: ``MT2STCallback(name, **parameters)``, the Hydra preset ``conf/strategy/<name>.yaml``
and LightningCLI (flat ``init_args``, or ``policy: {class_path: ..., init_args: ...}``) all reach it through
this table. A class that also takes ``schedules`` (an envelope its measured factors scale) is adaptive.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mt2st_lightning.policies.base import Policy, Reducer
from mt2st_lightning.policies.conflict import ConflictSwitch
from mt2st_lightning.policies.fisher import FisherPolicy
from mt2st_lightning.policies.gradnorm import GradNormPolicy
from mt2st_lightning.policies.measured import GradientPolicy, MeasuredPolicy
from mt2st_lightning.policies.noise import NoisePolicy
from mt2st_lightning.policies.params import check_accepted, parameters_of
from mt2st_lightning.policies.plateau import PlateauSwitch
from mt2st_lightning.policies.scheduled import (
    DiminishPolicy,
    MTLPolicy,
    Param,
    SchedulePolicy,
    STLPolicy,
    SwitchPolicy,
    schedules_for,
)
from mt2st_lightning.schedules import Schedule, as_number

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "STRATEGIES",
    "ConflictSwitch",
    "DiminishPolicy",
    "FisherPolicy",
    "GradNormPolicy",
    "GradientPolicy",
    "MTLPolicy",
    "MeasuredPolicy",
    "NoisePolicy",
    "Param",
    "PlateauSwitch",
    "REGISTRY",
    "Policy",
    "Reducer",
    "STLPolicy",
    "SchedulePolicy",
    "SwitchPolicy",
    "policy_for",
    "schedules_for",
]

#: name -> policy class, for every strategy ``MT2STCallback(strategy=...)`` accepts, in docs/strategies.md's order.
REGISTRY: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        STLPolicy,
        MTLPolicy,
        DiminishPolicy,
        SwitchPolicy,
        GradNormPolicy,
        FisherPolicy,
        NoisePolicy,
        PlateauSwitch,
        ConflictSwitch,
    )
}
#: Every strategy name, in the order docs/strategies.md lists them.
STRATEGIES: tuple[str, ...] = tuple(REGISTRY)


def takes_schedules(policy_class: type[Policy]) -> bool:
    """Whether a strategy's policy also takes ``schedules``: the envelope its measured factors scale."""
    return issubclass(policy_class, MeasuredPolicy)


#: The strategies whose weights are an envelope schedule times a factor measured during training; these
#: (alone) also take ``schedules=`` as their envelope.
ADAPTIVE_STRATEGIES: tuple[str, ...] = tuple(name for name, cls in REGISTRY.items() if takes_schedules(cls))


def _as_python(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: as_number(v) for k, v in value.items()}
    return as_number(value)


def policy_for(strategy: str | None, *, schedules: Mapping[str, Schedule] | None = None, **params: Any) -> Policy:
    """The policy for a named strategy, from the parameters the user gave: ``REGISTRY[strategy](**params)``,
    after refusing, by name, any parameter the strategy would ignore (pass only those given: the class supplies
    its defaults).

    ``strategy=None`` with ``schedules``: a :class:`SchedulePolicy` over those schedules. NumPy integer and
    float scalars are accepted wherever Python numbers are. Every value is checked here, at construction; only
    the task names of a ``{task: value}`` mapping wait until :meth:`Policy.bind`.
    """
    params = {name: _as_python(value) for name, value in params.items()}
    if strategy is None:
        if schedules is None:
            raise ValueError(f"give a strategy (one of {', '.join(REGISTRY)}) or per-task schedules")
        return SchedulePolicy(schedules, params=params)
    if strategy not in REGISTRY:
        raise ValueError(f"unknown MT2ST strategy {strategy!r}; choose one of {', '.join(REGISTRY)}")
    cls = REGISTRY[strategy]
    if schedules is not None and not takes_schedules(cls):
        if issubclass(cls, SchedulePolicy):
            adaptive = ", ".join(name for name, c in REGISTRY.items() if takes_schedules(c))
            raise ValueError(
                f"got both strategy={strategy!r} and schedules: the schedules define the weights; drop "
                f"strategy, or pass one of {adaptive} to scale the schedules adaptively"
            )
        raise ValueError(f"strategy={strategy!r} takes no schedules; drop schedules=")
    check_accepted(strategy, params, parameters_of(cls))
    # With schedules, an adaptive policy refuses the parameters of the envelope they replace.
    return cls(**params) if schedules is None else cls(schedules, **params)
