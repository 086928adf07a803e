"""Hyper-parameter search (``hparams_search=<preset>``, ``mt2st_lightning.app.search``): the presets compose
with every setting they are meant for, bad input fails before any trial, the objectives score run folders, and
a search on the smoke setting writes its study, trials, best trial and plots, and continues."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason='needs the optional extra [search] (pip install "mt2st-lightning[search]")')

from hydra.core.utils import JobReturn, JobStatus  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mt2st_lightning.app.objectives import OBJECTIVES, ObjectiveError, get_objective  # noqa: E402
from mt2st_lightning.app.run_format import RunSummary  # noqa: E402
from mt2st_lightning.app.search import OptunaSearch, write_plots  # noqa: E402
from mt2st_lightning.app.search_space import SearchConfigError, parse_search_space  # noqa: E402
from tests.test_app import compose_train, run_cli  # noqa: E402
from tests.test_report import write_run  # noqa: E402

PRESETS = {
    "switch_optuna": ("switch", {"strategy.switch_at", "strategy.gamma0", "model.lr"}),
    "stl_optuna": ("stl", {"model.lr", "model.weight_decay"}),
    "diminish_optuna": ("diminish", {"strategy.gamma0", "strategy.eta", "model.lr"}),
    "plateau_optuna": (
        "plateau", {"strategy.patience", "strategy.patience_steps", "strategy.min_delta", "strategy.gamma0", "model.lr"}
    ),
}
SETTINGS = ("paper_digits", "paper_embeddings", "paper_vision", "paper_vision_low_label")


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_composes_with_each_setting_into_its_search_space(preset, setting):
    strategy, sampled = PRESETS[preset]
    cfg = compose_train(f"experiment={setting}", f"hparams_search={preset}", hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.mt2st_optuna_sweeper.MT2STOptunaSweeper"
    assert (sweeper.n_trials, sweeper.n_jobs, sweeper.sampler.seed) == (20, 1, 0)
    assert sweeper.optimized_metric == "best_val_primary_metric" and sweeper.direction == "maximize"
    # A stable folder per study (a second launch continues it), below the setting's own outputs.
    assert cfg.hydra.sweep.dir == f"outputs/{setting}/searches/{sweeper.study_name}"
    space = parse_search_space(OmegaConf.to_container(sweeper.params), [])
    assert set(space.distributions) == sampled
    # The setting's own grid (strategy: stl,mtl,..., seed: 0,1,2) is replaced by one strategy and one seed.
    assert sorted(space.fixed) == sorted([f"strategy={strategy}", "seed=0"])
    # Every sampled key is a key of this setting's config: a trial composes.
    trial = compose_train(f"experiment={setting}", *space.probe())
    assert trial.strategy.strategy == strategy and trial.seed == 0


def test_the_flops_preset_states_its_penalty_and_takes_the_target_from_the_command_line():
    cfg = compose_train("experiment=paper_digits", "hparams_search=switch_flops_optuna", hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert (sweeper.optimized_metric, sweeper.direction, sweeper.study_name) == ("flops_to_target", "minimize", "switch_flops")
    assert sweeper.objective_params == {"target": None, "penalty": 2.0}
    with pytest.raises(SearchConfigError, match="target=None is not a number"):  # before any trial
        _search(**{k: OmegaConf.to_container(sweeper[k]) if k in ("params", "objective_params") else sweeper[k]
                   for k in ("study_name", "optimized_metric", "direction", "objective_params", "params")}).check([])
    cfg = compose_train(
        "experiment=paper_digits", "hparams_search=switch_flops_optuna", "hydra.sweeper.objective_params.target=0.95",
        hydra_config=True,
    )
    assert cfg.hydra.sweeper.objective_params.target == 0.95
    space = parse_search_space(OmegaConf.to_container(cfg.hydra.sweeper.params), [])
    assert set(space.distributions) == PRESETS["switch_optuna"][1]


def test_switch_and_stl_get_the_same_number_of_trials():
    n = {p: compose_train(f"hparams_search={p}", hydra_config=True).hydra.sweeper.n_trials for p in PRESETS}
    assert n["switch_optuna"] == n["stl_optuna"]


@pytest.mark.parametrize("launcher", ["submitit_local", "slurm"])
def test_a_search_composes_with_the_parallel_launchers(launcher):
    # The README: trials run in parallel with hydra.sweeper.n_jobs=N and hydra/launcher=submitit_local or slurm.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the optional extra [slurm]")
    cfg = compose_train(
        "experiment=paper_digits", "hparams_search=switch_optuna", "hydra.sweeper.n_jobs=2", f"hydra/launcher={launcher}",
        hydra_config=True,
    )
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.mt2st_optuna_sweeper.MT2STOptunaSweeper"
    assert cfg.hydra.sweeper.n_jobs == 2 and "submitit" in cfg.hydra.launcher._target_


def test_the_space_is_hydras_sweep_syntax():
    space = parse_search_space(
        {"a": "interval(0.05, 0.9)", "b": "tag(log, interval(1e-4, 1e-2))", "c": "int(interval(1, 8))",
         "d": "range(1, 7)", "e": "choice(x, 2.5)", "f": "x,y", "g": 3},
        ["a=interval(0.1, 0.2)", "h=true"],  # the command line wins on the same key
    )
    d = space.distributions
    assert d["a"] == optuna.distributions.FloatDistribution(0.1, 0.2)
    assert d["b"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert d["c"] == optuna.distributions.IntDistribution(1, 8)
    assert d["d"] == optuna.distributions.IntDistribution(1, 6, step=1)
    assert d["e"] == optuna.distributions.CategoricalDistribution(["x", 2.5])
    assert d["f"] == optuna.distributions.CategoricalDistribution(["x", "y"])
    assert space.fixed == ["g=3", "h=true"]
    overrides = space.overrides({"a": 0.15, "b": 1e-3, "c": 2, "d": 3, "e": 2.5, "f": "y"})
    assert overrides[2:] == ["a=0.15", "b=0.001", "c=2", "d=3", "e=2.5", "f=y"]


# ---------------------------------------------------------------------------------------------- bad input
def _search(**changes):
    base = {"study_name": "s", "optimized_metric": "best_val_primary_metric", "direction": "maximize", "n_trials": 2,
            "params": {"model.lr": "tag(log, interval(1e-4, 1e-2))"}}
    return OptunaSearch(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimized_metric": "val_acc"}, "set hydra.sweeper.optimized_metric to one of"),
        ({"direction": "minimise"}, "neither minimize nor maximize"),
        ({"direction": "minimize"}, "set hydra.sweeper.direction=maximize"),
        ({"optimized_metric": "flops_to_target", "direction": "minimize"}, "missing: ['penalty', 'target']"),
        ({"objective_params": {"target": 0.9}}, "unknown: ['target']"),
        (
            {"optimized_metric": "flops_to_target", "direction": "minimize", "objective_params": {"target": 0.9, "penalty": 0.5}},
            "penalty=0.5 must be >= 1",
        ),
        (
            {"optimized_metric": "flops_to_target", "direction": "minimize", "objective_params": {"target": None, "penalty": 2.0}},
            "target=None is not a number; give the validation value",
        ),
        ({"params": {"model.lr": "interval(0.01, 0.001)"}}, "is empty; write interval(low, high) with low < high"),
        ({"params": {"model.lr": "tag(log, interval(0, 0.1))"}}, "needs low > 0"),
        ({"params": {"model.lr": "range(5, 1)"}}, "holds no value"),
        ({"params": {"seed": 0}}, "the search space is empty"),
        ({"n_trials": 0}, "hydra.sweeper.n_trials=0: give a whole number >= 1"),
        ({"n_jobs": -1}, "hydra.sweeper.n_jobs=-1"),
    ],
)
def test_bad_input_is_refused_before_any_trial(changes, message):
    with pytest.raises(SearchConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _search(**changes).check([])


@pytest.mark.slow
def test_an_unknown_key_in_the_space_fails_before_any_trial(tmp_path):
    result = run_cli(
        "--multirun", "experiment=smoke", "hparams_search=switch_optuna", "strategy.switch_point=interval(0.1, 0.5)",
        f"hydra.sweep.dir={tmp_path / 'search'}", cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "does not compose with the app's config" in result.stderr and "strategy.switch_point" in result.stderr
    assert not list(tmp_path.rglob("trial_*")) and not (tmp_path / "search" / "study.db").exists()


# ---------------------------------------------------------------------------------------------- objectives
VAL = [(9, 0.5, 100.0, 1.0), (19, 0.8, 200.0, 2.0), (29, 0.9, 300.0, 3.0), (39, 0.85, 400.0, 4.0)]


def test_flops_to_target_is_the_flops_at_the_first_check_that_reaches_it(tmp_path):
    run = write_run(tmp_path, "run", strategy="switch", seed=0, flops=450.0, val=VAL)
    flops = get_objective("flops_to_target")
    assert flops(run, target=0.8, penalty=2.0) == 200.0
    assert flops(run, target=0.85, penalty=2.0) == 300.0  # the first check at or above it, not the last


def test_a_run_that_never_reaches_the_target_scores_its_budget_times_the_penalty(tmp_path):
    run = write_run(tmp_path, "run", strategy="switch", seed=0, flops=450.0, val=VAL)
    assert get_objective("flops_to_target")(run, target=0.95, penalty=2.0) == 900.0
    with pytest.raises(ObjectiveError, match="penalty=0.5 must be >= 1"):
        get_objective("flops_to_target")(run, target=0.95, penalty=0.5)


def test_a_run_stopped_early_misses_at_the_cost_of_its_planned_steps(tmp_path):
    run = write_run(tmp_path, "run", strategy="switch", seed=0, flops=450.0, val=VAL)  # 40 steps, 450 FLOPs
    replace(RunSummary.read(run), planned_total=80.0).write(run)  # early stopping ended it at half its budget
    assert get_objective("flops_to_target")(run, target=0.95, penalty=2.0) == 1800.0


def test_best_val_is_the_checkpoint_monitors_best_else_the_best_logged_check(tmp_path):
    run = write_run(tmp_path, "run", strategy="switch", seed=0, flops=450.0, val=VAL)
    best = get_objective("best_val_primary_metric")
    assert best(run) == 0.9
    summary = RunSummary.read(run)
    replace(summary, best_val_primary_metric=None).write(run)  # no checkpoint monitored it
    assert best(run) == 0.9
    assert set(OBJECTIVES) >= {"best_val_primary_metric", "flops_to_target"}


# ---------------------------------------------------------------------------------------------- a search, its launcher faked
class FakeLauncher:
    """Hydra's launcher contract without running the app: job ``initial_job_idx + i`` writes a run folder
    ``trial_<job>`` (as the presets' ``hydra.sweep.subdir``) whose validation accuracy is ``0.5 + 10 * model.lr``
    of its overrides, and returns what the app returns (its test metric, which the search must not read). ``crash``: jobs that raise;
    ``unfinished``: jobs that leave a folder without ``run_summary.json``."""

    def __init__(self, sweep_dir: Path, crash=(), unfinished=()):
        self.sweep_dir, self.crash, self.unfinished = sweep_dir, set(crash), set(unfinished)
        self.launches: list[tuple[int, int]] = []  # (initial_job_idx, jobs) per launch

    def launch(self, job_overrides, initial_job_idx):
        self.launches.append((initial_job_idx, len(job_overrides)))
        results = []
        for job, overrides in enumerate(job_overrides, start=initial_job_idx):
            if job in self.crash:
                results.append(JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("CUDA out of memory")))
                continue
            if job in self.unfinished:
                (run := self.sweep_dir / f"trial_{job}").mkdir()
            else:
                lr = float(dict(o.split("=", 1) for o in overrides)["model.lr"])
                run = write_run(self.sweep_dir, f"trial_{job}", strategy="switch", seed=0, flops=450.0, val=[(9, _acc(lr), 100.0, 1.0)])
            hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run)}}})
            results.append(JobReturn(hydra_cfg=hydra_cfg, status=JobStatus.COMPLETED, _return_value=0.9))  # a test metric
        return results


def _acc(lr: float) -> float:
    return 0.5 + 10 * lr


def _sweep(sweep_dir: Path, launcher: FakeLauncher | None = None, **changes):
    """One launch of a search into ``sweep_dir``; the study after it."""
    sweep_dir.mkdir(exist_ok=True)
    search = _search(**changes)
    search.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    search.launcher = launcher or FakeLauncher(sweep_dir)
    search.sweep([])
    return optuna.load_study(study_name="s", storage=f"sqlite:///{sweep_dir / 'study.db'}")


def test_n_jobs_trials_launch_together_and_each_is_scored_from_its_own_folder(tmp_path):
    launcher = FakeLauncher(tmp_path)
    study = _sweep(tmp_path, launcher, n_trials=5, n_jobs=2)
    # Each batch's jobs are numbered from its first trial's number: job n is trial n, in trial_<n>/.
    assert launcher.launches == [(0, 2), (2, 2), (4, 1)]
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.user_attrs["run_dir"] == str(tmp_path / f"trial_{t.number}")
        assert t.value == pytest.approx(_acc(t.params["model.lr"]))
    best = OmegaConf.load(tmp_path / "best.yaml")
    assert (best.best_trial, best.best_value) == (study.best_trial.number, study.best_value)
    assert (best.completed_trials, best.finished_trials) == (5, 5)


def test_a_batch_of_trials_with_a_gap_in_their_numbers_is_launched_in_runs_that_keep_folder_and_number(tmp_path):
    study = _sweep(tmp_path, n_trials=1)
    _, space = _search().check([])
    study.enqueue_trial({"model.lr": 1e-3})  # trial 1, waiting: the next ask takes it
    dist = space.distributions["model.lr"]
    study.add_trial(optuna.trial.create_trial(params={"model.lr": 2e-3}, distributions={"model.lr": dist}, value=0.5))
    launcher = FakeLauncher(tmp_path)
    study = _sweep(tmp_path, launcher, n_trials=4, n_jobs=2)  # asks trials 1 and 3: trial 2 was added
    assert launcher.launches == [(1, 1), (3, 1)]
    folders = [t.user_attrs.get("run_dir") for t in study.trials]
    assert folders == [str(tmp_path / "trial_0"), str(tmp_path / "trial_1"), None, str(tmp_path / "trial_3")]


def test_crashed_and_unscorable_trials_fail_with_their_error_count_and_the_search_goes_on(tmp_path):
    study = _sweep(tmp_path, FakeLauncher(tmp_path, crash={1}, unfinished={2}), n_trials=4)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, *[optuna.trial.TrialState.FAIL] * 2, optuna.trial.TrialState.COMPLETE]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: CUDA out of memory"
    assert "no run_summary.json, the run did not finish" in study.trials[2].user_attrs["error"]
    best = OmegaConf.load(tmp_path / "best.yaml")
    assert (best.completed_trials, best.finished_trials) == (2, 4)


def test_an_interrupted_search_retries_its_running_trial_and_still_completes_n_trials(tmp_path):
    study = _sweep(tmp_path, n_trials=2)
    _, space = _search().check([])
    left = study.ask(space.distributions)  # the launch was killed while trial 2 ran
    study = _sweep(tmp_path, n_trials=3)
    interrupted, retry = study.trials[2], study.trials[3]
    assert interrupted.state == optuna.trial.TrialState.FAIL
    assert (retry.params, retry.user_attrs["retry_of"], retry.state) == (left.params, 2, optuna.trial.TrialState.COMPLETE)
    assert len(study.trials) == 4
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 3
    assert OmegaConf.load(tmp_path / "best.yaml").finished_trials == 3


def test_a_seeded_search_repeats_and_a_continued_launch_draws_new_values(tmp_path):
    seeded = {"sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 0}}
    _sweep(tmp_path / "a", n_trials=2, **seeded)
    continued = [t.params for t in _sweep(tmp_path / "a", n_trials=3, **seeded).trials]
    again = [t.params for t in _sweep(tmp_path / "b", n_trials=3, **seeded).trials]
    assert continued[:2] == again[:2]  # the same seed, the same values
    assert continued[2] not in continued[:2]  # not the first launch's draws again


@pytest.mark.parametrize(
    "changes",
    [
        {"optimized_metric": "flops_to_target", "direction": "minimize", "objective_params": {"target": 0.6, "penalty": 2.0}},
        {"params": {"model.lr": "tag(log, interval(1e-4, 1e-2))", "strategy.gamma0": "interval(0.1, 10.0)"}},
    ],
)
def test_continuing_a_study_with_another_objective_or_space_is_refused(tmp_path, changes):
    _sweep(tmp_path, n_trials=1)
    with pytest.raises(SearchConfigError, match="scores of different objectives or spaces do not mix"):
        _sweep(tmp_path, n_trials=2, **changes)


# ---------------------------------------------------------------------------------------------- plots
def _study(values: list[float]):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for value in values:
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1), "y": optuna.distributions.FloatDistribution(0, 1)})
        study.tell(trial, value)
    return study


def test_plots_are_written_without_warnings_or_scikit_learn(tmp_path, monkeypatch):
    # Optuna's default importance evaluator (PED-ANOVA) needs numpy only; fANOVA would need scikit-learn,
    # which the [search] extra does not install.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_plots(_study([0.1, 0.5, 0.3, 0.7, 0.2]), tmp_path)
    assert [p.name for p in written] == ["optimization_history.png", "param_importances.png", "param_slices.png"]


def test_plots_that_would_say_nothing_are_skipped_with_the_reason_and_without_warnings(tmp_path, caplog):
    logger = logging.getLogger("mt2st_lightning.app.search")
    logger.addHandler(caplog.handler)  # Hydra's logging config, set by earlier tests, may stop propagation
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            written = write_plots(_study([0.5]), tmp_path)
    finally:
        logger.removeHandler(caplog.handler)
    assert [p.name for p in written] == ["optimization_history.png"]
    for plot in ("param_importances.png", "param_slices.png"):
        assert f"Skipped {plot}: needs >= 2 completed trials, 1 so far" in caplog.text


# ---------------------------------------------------------------------------------------------- a search
def _search_cli(tmp_path: Path, folder: str, *overrides: str):
    search = tmp_path / folder
    result = run_cli(
        "--multirun", "experiment=smoke", "hparams_search=switch_optuna", f"hydra.sweep.dir={search}", *overrides,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return search, result


def _trials(search: Path):
    return optuna.load_study(study_name="switch", storage=f"sqlite:///{search / 'study.db'}").trials


@pytest.mark.slow
def test_a_search_writes_its_study_trials_best_and_plots_and_continues(tmp_path):
    # Two trials at a time through Hydra's basic launcher (one after the other), then one more launch.
    search, first = _search_cli(tmp_path, "search", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=2")
    search, _ = _search_cli(tmp_path, "search", "hydra.sweeper.n_trials=4")
    trials = _trials(search)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # Each trial is an ordinary run of the app, in its own folder, scored from its run_summary.json.
    for t in trials:
        summary = json.loads((search / f"trial_{t.number}" / "run_summary.json").read_text())
        assert summary["strategy"] == "switch" and summary["seed"] == 0
        assert summary["settings"]["strategy"]["switch_at"] == t.params["strategy.switch_at"]
        assert summary["best_val_primary_metric"] == t.value
    # The continued launch drew new values, not the first launch's again.
    assert trials[3].params not in [t.params for t in trials[:3]]
    best = OmegaConf.load(search / "best.yaml")
    top = max(trials, key=lambda t: t.value)
    assert (best.best_trial, best.best_value, dict(best.best_params)) == (top.number, top.value, top.params)
    assert (best.optimized_metric, best.direction, best.completed_trials) == ("best_val_primary_metric", "maximize", 4)
    for plot in ("optimization_history.png", "param_importances.png", "param_slices.png"):
        assert (search / plot).stat().st_size > 0, plot
    # The sweep summary reads the trials like any sweep's runs.
    assert (search / "summary.md").is_file() and "| strategy | runs |" in first.stdout

    # The same sampler seed draws the same values in another search.
    again, _ = _search_cli(tmp_path, "again", "hydra.sweeper.n_trials=3")
    assert [t.params for t in _trials(again)] == [t.params for t in trials[:3]]
