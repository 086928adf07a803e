"""What a hyper-parameter search optimises: a number read from one finished run.

An objective is a function ``(run, **params) -> float | None`` of a finished run, read as the report reads it
(:class:`~mt2st_lightning.report.runs.Run`: its ``run_summary.json`` and ``metrics.csv``), registered under a name
with the direction it is optimised in; a search names it (``hydra.sweeper.optimized_metric``) with its keyword
parameters (``hydra.sweeper.objective_params``), checked before any trial. ``None`` means the run cannot be scored
(the trial fails, with the reason logged). A new objective is one decorated function here:

    @objective("final_val_primary_metric", "maximize")
    def final_val_primary_metric(run: Run) -> float | None:
        return run.final_val

Plain Python (no Hydra, no Optuna): the search and the tests read runs through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mt2st_lightning.app.run_format import SUMMARY_FILE
from mt2st_lightning.names import COST_FLOPS_AT_VAL
from mt2st_lightning.report.runs import Run, collect_runs

__all__ = ["DIRECTIONS", "OBJECTIVES", "Objective", "ObjectiveError", "get_objective", "objective", "read_run"]

DIRECTIONS = ("minimize", "maximize")


class ObjectiveError(ValueError):
    """An objective that does not exist, is optimised the wrong way, is given the wrong parameters, or cannot
    score a run."""


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "minimize" or "maximize": the only sense in which the number makes sense
    function: Callable[..., float | None]
    #: Called with the parameters before any trial; raises :class:`ObjectiveError` for a value that cannot work.
    validate: Callable[..., None] | None = None

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword parameters the function takes besides the run (those a search states)."""
        return dict(list(inspect.signature(self.function).parameters.items())[1:])

    def check(self, direction: str, params: Mapping[str, Any]) -> None:
        """Raise :class:`ObjectiveError` unless ``direction`` is this objective's and ``params`` are right."""
        if direction not in DIRECTIONS:
            raise ObjectiveError(f"direction={direction!r} is neither minimize nor maximize; {self.name} is {self.direction}d")
        if direction != self.direction:
            raise ObjectiveError(
                f"{self.name} is {self.direction}d, not {direction}d: set hydra.sweeper.direction={self.direction}"
            )
        self.check_params(params)

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raise :class:`ObjectiveError` unless ``params`` are this objective's parameters, each given (unless it
        has a default), none unknown, and each value one the objective can work with."""
        wanted = self.parameters()
        unknown = sorted(set(params) - set(wanted))
        missing = sorted(k for k, p in wanted.items() if p.default is inspect.Parameter.empty and k not in params)
        if unknown or missing:
            raise ObjectiveError(
                f"{self.name} takes the parameters {sorted(wanted) or 'none'}"
                + (f"; unknown: {unknown}" if unknown else "")
                + (f"; missing: {missing}" if missing else "")
                + ": set them in hydra.sweeper.objective_params"
            )
        if self.validate is not None:
            self.validate(**params)

    def __call__(self, run_dir: str | Path, **params: Any) -> float | None:
        self.check_params(params)
        return self.function(read_run(run_dir), **params)


#: name -> objective: what ``hydra.sweeper.optimized_metric`` may name.
OBJECTIVES: dict[str, Objective] = {}


def objective(
    name: str, direction: str, validate: Callable[..., None] | None = None
) -> Callable[[Callable[..., float | None]], Callable[..., float | None]]:
    """Register ``function(run, **params)`` as the objective ``name``, optimised in ``direction``; ``validate``
    (same keyword parameters) refuses parameter values before any trial."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")

    def register(function: Callable[..., float | None]) -> Callable[..., float | None]:
        if name in OBJECTIVES:
            raise ValueError(f"an objective named {name!r} is already registered")
        OBJECTIVES[name] = Objective(name, direction, function, validate)
        return function

    return register


def get_objective(name: str) -> Objective:
    """The objective ``name``; an unknown name is an :class:`ObjectiveError` listing the known ones."""
    if name not in OBJECTIVES:
        raise ObjectiveError(
            f"optimized_metric={name!r} is not an objective; set hydra.sweeper.optimized_metric to one of "
            f"{sorted(OBJECTIVES)} (or register one in mt2st_lightning.app.objectives)"
        )
    return OBJECTIVES[name]


def read_run(run_dir: str | Path) -> Run:
    """The finished run in ``run_dir``, read as ``mt2st-report`` reads it."""
    run_dir = Path(run_dir)
    run = next((r for r in collect_runs(run_dir) if r.dir == run_dir), None)
    if run is None:
        raise ObjectiveError(f"{run_dir}: no {SUMMARY_FILE}, the run did not finish (see its log)")
    return run


# ---------------------------------------------------------------------------------------------- objectives
@objective("best_val_primary_metric", "maximize")
def best_val_primary_metric(run: Run) -> float | None:
    """The best validation value of the primary metric within the run's fixed budget: the checkpoint monitor's
    best, or, without a checkpoint monitoring it, the best value logged at a validation check (the report's)."""
    return run.best_val


def _check_penalty(*, target: float, penalty: float) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise ObjectiveError(
            f"flops_to_target: target={target!r} is not a number; give the validation value of the primary metric "
            "to reach, e.g. hydra.sweeper.objective_params.target=0.9"
        )
    if not penalty >= 1:
        raise ObjectiveError(
            f"flops_to_target: penalty={penalty} must be >= 1 (a run that misses the target must not score better "
            "than its budget); set hydra.sweeper.objective_params.penalty"
        )


@objective("flops_to_target", "minimize", validate=_check_penalty)
def flops_to_target(run: Run, *, target: float, penalty: float) -> float | None:
    """Training FLOPs up to the first validation check whose primary metric reaches ``target``; a run that never
    reaches it scores its whole budget times ``penalty`` (>= 1, so that reaching it always scores better than
    missing it). The budget of a run that stopped before its planned steps (early stopping) is its FLOPs per step
    so far times its planned steps: stopping early must not make a miss cheaper."""
    hit = run.first_reach(target)
    if hit is not None:
        if COST_FLOPS_AT_VAL not in hit:
            raise ObjectiveError(
                f"{run.dir}: no {COST_FLOPS_AT_VAL} at the validation check; flops_to_target needs the cost meter "
                "(callbacks=default includes it)"
            )
        return hit[COST_FLOPS_AT_VAL]
    summary = run.summary
    if summary.train_flops is None:
        raise ObjectiveError(f"{run.dir}: no train_flops in {SUMMARY_FILE}; flops_to_target needs the cost meter")
    budget = summary.train_flops
    if summary.mt2st_unit == "step" and summary.planned_total and 0 < summary.total_steps < summary.planned_total:
        budget *= summary.planned_total / summary.total_steps
    return budget * penalty
