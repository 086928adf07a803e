"""Hyper-parameter search from the command line: ``mt2st-train --multirun hparams_search=<preset>``.

The Hydra sweeper ``hydra/sweeper=mt2st_optuna`` (the thin plugin class
``hydra_plugins.mt2st_optuna_sweeper.MT2STOptunaSweeper``, which Hydra requires to live in the ``hydra_plugins``
package) hands its work to :class:`OptunaSearch`: Optuna's sampler picks each trial's values
(``study.ask``), Hydra's launcher runs the trials as ordinary runs of the app, an objective
(:mod:`mt2st_lightning.app.objectives`) scores the folder each run wrote, and ``study.tell`` reports the score
back. The space is :mod:`mt2st_lightning.app.search_space`.

The search folder (``hydra.sweep.dir``, no timestamp in the presets) holds:

- ``study.db``: the Optuna study (SQLite); a second launch with the same study name continues it. ``n_trials``
  is the study's total of finished trials (complete, pruned or failed), so rerunning an interrupted search's
  command finishes it; a trial left running by the interruption fails, and is retried first (the retry, not the
  interrupted trial, counts towards ``n_trials``).
- ``trial_<n>/``: trial ``n``'s run folder (``run_summary.json``, ``csv/metrics.csv``, ...).
- ``best.yaml``: the best trial's values and score; ``optimization_history.png``, ``param_importances.png``,
  ``param_slices.png``: Optuna's plots; the sweep summary (``summary.md``, ...) of every trial, as after any sweep.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mt2st_lightning.app.objectives import Objective, ObjectiveError, get_objective
from mt2st_lightning.app.search_space import SearchConfigError, SearchSpace, import_optuna, parse_search_space
from mt2st_lightning.extras import MissingExtraError, require

__all__ = ["BEST_FILE", "RETRY_OF", "STUDY_FILE", "OptunaSearch", "SearchConfigError", "trials_counted", "write_plots"]

log = logging.getLogger(__name__)

#: In the search folder: the study database, and the best trial.
STUDY_FILE = "study.db"
BEST_FILE = "best.yaml"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"
SLICE_PLOT = "param_slices.png"
#: The user attribute of a trial that retries one an interrupted search left running: that trial's number.
RETRY_OF = "retry_of"


class OptunaSearch:
    """The work of the ``mt2st_optuna`` sweeper (its arguments: ``conf/hydra/sweeper/mt2st_optuna.yaml``)."""

    def __init__(
        self,
        *,
        study_name: str,
        optimized_metric: str,
        direction: str,
        n_trials: int,
        objective_params: Mapping[str, Any] | None = None,
        n_jobs: int = 1,
        storage: str | None = None,
        sampler: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.study_name = study_name
        self.optimized_metric = optimized_metric
        self.direction = direction
        self.n_trials = n_trials
        self.objective_params = _plain(objective_params) or {}
        self.n_jobs = n_jobs
        self.storage = storage
        self.sampler = sampler
        self.params = _plain(params) or {}
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ------------------------------------------------------------------ checks (before any trial)
    def check(self, arguments: Sequence[str]) -> tuple[Objective, SearchSpace]:
        """The objective and the space; :class:`SearchConfigError` for anything that would fail later."""
        for name, value in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SearchConfigError(f"hydra.sweeper.{name}={value!r}: give a whole number >= 1")
        if not self.study_name:
            raise SearchConfigError("hydra.sweeper.study_name is empty: name the study (it names the search folder)")
        try:
            objective = get_objective(self.optimized_metric)
            objective.check(self.direction, self.objective_params)
        except ObjectiveError as error:
            raise SearchConfigError(str(error)) from None
        space = parse_search_space(self.params, arguments, self.hydra_context.config_loader if self.hydra_context else None)
        if self.config is not None and self.hydra_context is not None:
            try:
                self.hydra_context.config_loader.load_sweep_config(master_config=self.config, sweep_overrides=space.probe())
            except (HydraException, OmegaConfBaseException) as error:  # an unknown key, a missing group option
                raise SearchConfigError(
                    f"the search space does not compose with the app's config: {error}\n"
                    "Fix the key in hydra.sweeper.params (or on the command line); a key the config lacks needs a "
                    "leading + (e.g. +model.dropout=interval(0,0.5))"
                ) from None
        return objective, space

    def _sampler(self, already: int) -> Any:
        """The configured sampler (Optuna's default, TPE, if none). A seeded sampler that continues a study
        holding ``already`` trials is seeded ``seed + already``: the same seed would draw the first launch's
        values again (TPE samples its first trials at random), and the same commands still give the same trials."""
        import hydra.utils
        import optuna

        if self.sampler is None:
            return optuna.samplers.TPESampler()
        seed = self.sampler.get("seed")
        return hydra.utils.instantiate(self.sampler, **({"seed": seed + already} if already and seed is not None else {}))

    # ------------------------------------------------------------------ the sweep
    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        if self.config is None or self.launcher is None:
            raise RuntimeError("OptunaSearch.sweep before setup: Hydra calls setup(...) first")
        optuna = import_optuna()
        objective, space = self.check(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage or f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"
        study = optuna.create_study(study_name=self.study_name, storage=storage, direction=self.direction, load_if_exists=True)
        study.sampler = self._sampler(already=len(study.get_trials(deepcopy=False)))
        self._check_same_search(study, space)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's own sweepers leave it
        retry_interrupted(study)
        returns: list[Sequence[JobReturn]] = []
        done = trials_counted(study)
        log.info("Study %s (%s): %d of %d trials finished", self.study_name, storage, done, self.n_trials)
        while done < self.n_trials:
            trials = [study.ask(space.distributions) for _ in range(min(self.n_jobs, self.n_trials - done))]
            for batch in _consecutive(trials):
                overrides = [space.overrides(t.params) for t in batch]
                results = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
                for trial, result in zip(batch, results, strict=True):
                    self._tell(study, trial, result, objective)
                returns.append(results)
            done = trials_counted(study)
        self._write_outcome(study, sweep_dir)
        return returns

    def _check_same_search(self, study: Any, space: SearchSpace) -> None:
        """A continued study must optimise what it optimised: the same objective, parameters and space."""
        search = {
            "optimized_metric": self.optimized_metric,
            "objective_params": self.objective_params,
            "space": sorted(space.distributions),
        }
        earlier = study.user_attrs.get("search")
        if earlier is None:
            study.set_user_attr("search", search)
        elif earlier != search:
            raise SearchConfigError(
                f"the study {self.study_name!r} was searched with {earlier}, not {search}: scores of different "
                "objectives or spaces do not mix. Set another hydra.sweeper.study_name (or remove the study folder)"
            )

    def _tell(self, study: Any, trial: Any, result: JobReturn, objective: Objective) -> None:
        """Score one trial's run; a run that raised or that the objective cannot score fails the trial, not the
        search."""
        import optuna

        try:
            _ = result.return_value  # raises the run's exception if it failed
            # The job's folder (trial_<n>/ in the presets), where the app writes the run: the objective the preset
            # names reads it there (the value the run returns is one fixed metric, its best validation value).
            run_dir = Path(result.hydra_cfg.hydra.runtime.output_dir)
            trial.set_user_attr("run_dir", str(run_dir))
            value = objective(run_dir, **self.objective_params)
            if value is None or not math.isfinite(value):
                raise ObjectiveError(f"{objective.name} is {value}, not a finite number")
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            log.error("Trial %d failed (%s); the search goes on", trial.number, reason)
            trial.set_user_attr("error", reason)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        study.tell(trial, float(value))
        best = study.best_trial
        log.info(
            "Trial %d: %s = %.6g with %s (best: trial %d, %.6g)",
            trial.number, objective.name, value, trial.params, best.number, best.value,
        )  # fmt: skip

    # ------------------------------------------------------------------ the outcome
    def _write_outcome(self, study: Any, sweep_dir: Path) -> None:
        import optuna

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            log.error("No trial of study %s completed: no %s, no plots (see the trials' logs)", self.study_name, BEST_FILE)
            return
        best = study.best_trial
        outcome = {
            "study_name": self.study_name,
            "optimized_metric": self.optimized_metric,
            "objective_params": self.objective_params,
            "direction": self.direction,
            "best_value": best.value,
            "best_trial": best.number,
            "best_params": dict(best.params),
            "best_run_dir": best.user_attrs.get("run_dir"),
            "completed_trials": len(complete),
            "finished_trials": trials_counted(study),
        }
        OmegaConf.save(OmegaConf.create(outcome), sweep_dir / BEST_FILE)
        log.info(
            "Best: trial %d, %s = %.6g with %s (%s)",
            best.number, self.optimized_metric, best.value, best.params, sweep_dir / BEST_FILE,
        )  # fmt: skip
        write_plots(study, sweep_dir)


def retry_interrupted(study: Any) -> None:
    """Fail the trials an interrupted search left running (one search drives a study at a time, so none is still
    running) and enqueue each one's values again, marked :data:`RETRY_OF` (its number)."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        log.warning("Trial %d was left running by an interrupted search: marked failed, its values run again", trial.number)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})


def trials_counted(study: Any) -> int:
    """The finished trials (complete, pruned or failed) that count towards ``n_trials``: all but those an
    interruption cut short, whose retries count instead."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    return sum(1 for t in trials if t.state.is_finished() and t.number not in retried)


def write_plots(study: Any, sweep_dir: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances (Optuna's default evaluator) and slices (the
    objective against each parameter) as PNG in ``sweep_dir``; a plot that cannot be drawn is skipped with the
    reason logged (the search's results stand without it)."""
    try:
        require("report", "the search's plots")
    except MissingExtraError as error:
        log.warning("No plots: %s", error)
        return []
    import matplotlib

    matplotlib.use("Agg")  # Optuna draws through pyplot: a file backend, no display needed
    import matplotlib.pyplot as plt
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varying = {k for k in study.best_trial.params if len({repr(t.params.get(k)) for t in complete}) > 1}
    # Importances or slices from one trial, or from parameters that never changed, would say nothing (equal bars,
    # a single dot) and make matplotlib warn.
    spread_reason = (
        f"needs >= 2 completed trials, {len(complete)} so far" if len(complete) < 2
        else "no parameter varies between the completed trials" if not varying else None
    )  # fmt: skip
    plots = [
        (HISTORY_PLOT, optuna.visualization.matplotlib.plot_optimization_history, None),
        (IMPORTANCE_PLOT, optuna.visualization.matplotlib.plot_param_importances, spread_reason),
        # The objective against each sampled parameter, one dot per trial (e.g. the landscape over switch_at).
        (SLICE_PLOT, optuna.visualization.matplotlib.plot_slice, spread_reason),
    ]
    written = []
    for name, plot, reason in plots:
        if reason is None:
            try:
                # Optuna marks its matplotlib plots experimental: one warning per plot per search, nothing to act on.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    axes = plot(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure  # plot_slice: one per parameter
                figure.savefig(sweep_dir / name, dpi=120, bbox_inches="tight")
                plt.close(figure)
                written.append(sweep_dir / name)
                continue
            except Exception as error:  # e.g. an importance evaluator that cannot fit these trials
                reason = f"{type(error).__name__}: {error}"
        log.warning("Skipped %s: %s", name, reason)
    return written


def _consecutive(trials: list[Any]) -> list[list[Any]]:
    """``trials`` in runs of consecutive numbers: the launcher numbers a batch's jobs (and names their folders,
    ``trial_<n>``) from its first trial's number on."""
    runs: list[list[Any]] = []
    for trial in trials:
        if runs and trial.number == runs[-1][-1].number + 1:
            runs[-1].append(trial)
        else:
            runs.append([trial])
    return runs


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
