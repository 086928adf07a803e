"""The decision layer's one interface: a ``Policy`` says what the auxiliary weights are and which tasks
are finished.

A policy is the only thing that decides. ``MT2STCallback`` asks it at every optimizer-step boundary
(``weights``, ``finished``), shows it what it asked to see (``observe_step`` on the steps it wants,
``observe_validation`` after every validation run), and carries out its answers: it writes the weights into
the module and drops finished heads. A policy never touches the trainer or the module; whatever it observes
it makes rank-consistent through the :class:`Reducer` it is handed, so every rank takes the same decision.

Write your own by subclassing :class:`Policy` and passing an instance as ``MT2STCallback(policy=...)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

from torch import Tensor

from mt2st_lightning.step_record import StepRecord

__all__ = ["LocalReducer", "Policy", "Reducer", "StrategyReducer", "checked_weights"]


class Reducer(Protocol):
    """Cross-rank agreement, handed to a policy (a no-op on a single device)."""

    def mean(self, value: Tensor) -> Tensor:
        """``value`` averaged over ranks (every rank gets the same tensor)."""

    def all(self, decision: bool) -> bool:
        """True on every rank iff ``decision`` is True on every rank."""

    def any(self, decision: bool) -> bool:
        """True on every rank iff ``decision`` is True on some rank."""


class LocalReducer:
    """The :class:`Reducer` of a single process: every value is already the agreed one. For tests and tools
    that drive a policy without a trainer."""

    def mean(self, value: Tensor) -> Tensor:
        return value

    def all(self, decision: bool) -> bool:
        return bool(decision)

    def any(self, decision: bool) -> bool:
        return bool(decision)


class StrategyReducer:
    """The :class:`Reducer` ``MT2STCallback`` hands to its policy: the Lightning strategy's own collectives
    (``strategy.reduce``, ``strategy.reduce_boolean_decision``, as ``EarlyStopping`` agrees). Each call is a
    collective under DDP: every rank must make it at the same point."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def mean(self, value: Tensor) -> Tensor:
        return self.strategy.reduce(value, reduce_op="mean")

    def all(self, decision: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(bool(decision), all=True))

    def any(self, decision: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(bool(decision), all=False))


class Policy(ABC):
    """What the auxiliary weights are at time ``t`` and which auxiliary tasks are finished.

    ``t`` counts optimizer steps (or epochs) from 0, in the callback's ``unit``. ``active`` is the tuple of
    auxiliary tasks whose heads still run. A finished task stays finished: the callback drops its head and
    never asks about it again.

    Hooks, in the order the callback calls them:

    - :meth:`bind` once per fit, before the first step: the auxiliary tasks and the run's planned length
      (then :meth:`use_shared_parameters`);
      a resumed fit then calls :meth:`load_state_dict` with the saved state (so ``bind`` may reset state).
    - at each optimizer-step boundary: :meth:`finished`, then :meth:`weights` for the tasks still active.
    - :meth:`wants_step`, then (if True) :meth:`observe_step` with the step's :class:`StepRecord`, between
      forward and backward of the first micro-batch of that step. A step that the non-finite guard skips is
      never observed.
    - :meth:`observe_validation` after each validation run, with the logged metrics.
    - :meth:`diagnostics` after each :meth:`observe_step`: what the measurement found, for the loggers.
    - :meth:`state_dict` / :meth:`load_state_dict` with every checkpoint.
    """

    #: A short name, used in messages, logs and checkpoints.
    name: str = "custom"

    def bind(self, tasks: Sequence[str], total: float | None, unit: str) -> None:
        """Called once per fit with the module's auxiliary tasks and the run's planned length in ``unit``
        (``None`` if unknown). Resolve fractions of the run here and raise ``ValueError`` for a plan that
        cannot be carried out."""

    def use_shared_parameters(self, parameters: Iterable[Tensor]) -> None:
        """Called once per fit, after :meth:`bind`, with the module's shared (encoder) parameters that train,
        for a policy that takes gradients with respect to them. Ignore it otherwise."""

    @abstractmethod
    def weights(self, t: int, active: Sequence[str]) -> Mapping[str, float]:
        """The loss weight of each task in ``active`` at time ``t`` (non-negative floats)."""

    @abstractmethod
    def finished(self, t: int, active: Sequence[str]) -> Collection[str]:
        """The tasks of ``active`` that are finished at ``t``; their heads are dropped before the step runs.
        Must be the same on every rank (decide through the reducer)."""

    def wants_step(self, t: int) -> bool:
        """Whether to observe this step's losses (a *measuring* step). Called once per unit of time, at the
        first micro-batch of its first optimizer step (with ``unit="epoch"``: once per epoch), while any
        auxiliary task is active."""
        return False

    def observe_step(self, t: int, record: StepRecord, reduce: Reducer) -> None:
        """See the step's losses (and features) before backward. May take gradients with
        ``retain_graph=True``; must not call ``backward`` or touch ``.grad``."""

    def observe_validation(self, t: int, metrics: Mapping[str, Tensor | float], reduce: Reducer) -> None:
        """See the metrics logged by a validation run that ended at time ``t``."""

    def diagnostics(self) -> Mapping[str, float]:
        """What the latest :meth:`observe_step` measured, as Python floats keyed by a short name (e.g.
        ``"cosine/edges"``); the callback logs each as ``mt2st/<name>/<key>`` (``names.policy_metric``). Only
        values already read to the host: logging them must not synchronise the device again."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def checked_weights(policy: Policy, t: int, active: Sequence[str], unit: str = "step") -> dict[str, float]:
    """``policy.weights(t, active)``, refused unless it gives each task of ``active`` a finite weight >= 0 (a
    user's policy answers here, before any weight reaches a loss)."""
    weights = policy.weights(t, active)
    bad = {task: w for task, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
    if set(weights) != set(active) or bad:
        raise ValueError(
            f"policy {policy.name!r} must give a finite weight >= 0 to each active auxiliary task {list(active)} "
            f"at {unit} {t}, gave {dict(weights)}"
        )
    return dict(weights)
