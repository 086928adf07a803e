"""The Hydra app (``conf/``, ``mt2st_lightning.app.train``): every config composes and builds, bad configs fail
with Hydra's errors before training, and training runs in-process, from the command line, as a sweep and
under DDP."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from mt2st_lightning import MT2STCallback
from mt2st_lightning.examples.data import DigitsDataModule
from mt2st_lightning.flops import PhaseCostMeter
from mt2st_lightning.examples.models import MultiTaskModel
from mt2st_lightning.app.run_format import FORMAT_VERSION, RunSummary
from mt2st_lightning.app.train import CONFIG_DIR, instantiate_callbacks, train

AUX = ["recon", "edges", "moments"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_train(*overrides: str, hydra_config: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def fast_dev_run(output_dir: Path, *overrides: str) -> dict:
    """``mt2st-train <overrides> trainer.fast_dev_run=true`` in-process, writing into ``output_dir``: its summary."""
    return train(compose_train(*overrides, f"paths.output_dir={output_dir}", "trainer.fast_dev_run=true", "progress=none"))


def run_cli(
    *args: str, cwd: Path, timeout: float = 300, module: str = "mt2st_lightning.app.train", warnings: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    if not warnings:
        env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def digits_tasks() -> dict:
    return DigitsDataModule().task_specs


# ---------------------------------------------------------------------------------------------- composition
def test_config_dir_is_the_repository_conf():
    assert (CONFIG_DIR / "train.yaml").is_file()
    for group in (
        "model",
        "data",
        "strategy",
        "trainer",
        "callbacks",
        "logger",
        "experiment",
        "hydra/launcher",
    ):
        assert options(group), f"conf/{group}/ holds no option"


def test_default_config_is_a_quick_digits_switch_run():
    cfg = compose_train()
    assert cfg.data._target_.endswith("DigitsDataModule") and cfg.model.encoder._target_.endswith(
        "MLPEncoder"
    )
    assert cfg.strategy.strategy == "switch" and cfg.label == "switch"
    assert cfg.model.primary == cfg.data.label_task == "digit"
    assert cfg.trainer.enable_progress_bar is True
    assert list(cfg.callbacks) == ["model_checkpoint", "last_checkpoint", "on_exception_checkpoint", "cost_meter"]
    # The best epoch for testing, and last.ckpt from a second checkpoint callback without a monitor: the
    # latest state at every epoch end, whatever the monitored metric does.
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == (
        "val/primary_metric",
        "max",
    )
    assert cfg.callbacks.model_checkpoint.save_last is False
    last = cfg.callbacks.last_checkpoint
    assert (last.monitor, last.filename, last.save_top_k) == (None, "last", 1)


@pytest.mark.parametrize("name", options("strategy"))
def test_every_strategy_instantiates_the_mt2st_callback(name):
    cfg = compose_train(f"strategy={name}")
    callback = hydra.utils.instantiate(cfg.strategy)
    assert isinstance(callback, MT2STCallback)
    assert callback.strategy == name


def test_the_mt2st_callback_comes_first_and_the_meter_second(tmp_path):
    # Config order puts the checkpoint before the meter; PhaseCostMeter needs to follow MT2STCallback.
    cfg = compose_train(f"paths.output_dir={tmp_path}", "callbacks=[default,early_stopping]")
    mt2st, callbacks = instantiate_callbacks(cfg)
    assert callbacks[0] is mt2st and isinstance(callbacks[1], PhaseCostMeter)
    assert [type(c).__name__ for c in callbacks[2:]] == [
        "ModelCheckpoint", "ModelCheckpoint", "FailureCheckpoint", "EarlyStopping"
    ]


@pytest.mark.parametrize("name", [m for m in options("model") if m.startswith("digits_")])
def test_every_digits_model_builds_for_the_digits_tasks(name, digits_tasks):
    # (The other models, for text, vision and diffusion data, are built by their own tests.)
    cfg = compose_train(f"model={name}")
    model = hydra.utils.instantiate(cfg.model, tasks=digits_tasks, _convert_="all")
    assert isinstance(model, MultiTaskModel)
    assert model.tasks == ("digit", *AUX)
    outputs = model(torch.rand(2, 1, 8, 8))
    assert outputs["digit"].shape == (2, 10) and outputs["recon"].shape == (2, 64)


@pytest.mark.parametrize("name", options("data"))
def test_every_data_option_instantiates(name):
    cfg = compose_train(f"data={name}")
    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)
    if name in ("digits", "fashion_mnist"):  # the app's own data; the other modules have their own tests
        assert datamodule.label_task == cfg.model.primary  # the model's primary task follows the data
        assert list(datamodule.aux_tasks) == AUX


@pytest.mark.parametrize("name", options("trainer"))
def test_every_trainer_preset_composes_and_builds_where_this_machine_can(name, tmp_path):
    cfg = compose_train(f"trainer={name}", f"paths.output_dir={tmp_path}")
    assert cfg.trainer.precision
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"trainer={name} needs a GPU; composed only")
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, L.Trainer)
    assert trainer.num_devices == cfg.trainer.devices


def test_precision_presets():
    assert compose_train("trainer=bf16").trainer.precision == "bf16-mixed"
    assert compose_train("trainer=fp16").trainer.precision == "16-mixed"
    ddp = compose_train("trainer=ddp_cpu").trainer
    assert (ddp.strategy, ddp.accelerator, ddp.devices) == ("ddp", "cpu", 2)


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes_and_builds(name, digits_tasks, tmp_path):
    cfg = compose_train(f"experiment={name}", f"paths.output_dir={tmp_path}", hydra_config=True)
    assert cfg.task_name == name
    assert isinstance(hydra.utils.instantiate(cfg.strategy), MT2STCallback)
    datamodule = hydra.utils.instantiate(cfg.data)
    if isinstance(datamodule, DigitsDataModule):  # the other data sets are not on this machine
        model = hydra.utils.instantiate(cfg.model, tasks=digits_tasks, _convert_="all")
        assert model.primary_task == "digit"


def test_paper_digits_sweeps_the_four_regimes_over_three_seeds():
    cfg = compose_train("experiment=paper_digits", hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.strategy.split(",") == ["stl", "mtl", "diminish", "switch"]
    assert params.seed.split(",") == ["0", "1", "2"]
    # Each sweep gets a timestamped folder; each job a subfolder named after its strategy and seed.
    assert re.fullmatch(
        r"outputs/paper_digits/multiruns/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", cfg.hydra.sweep.dir
    )
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert subdir == "${hydra.job.num}_${hydra.runtime.choices.strategy}_seed${seed}"


def test_optional_callbacks_and_loggers_compose():
    assert list(compose_train("callbacks=none").callbacks) == []
    assert "early_stopping" in compose_train("callbacks=[default,early_stopping]").callbacks
    assert list(compose_train("logger=[csv,tensorboard]").logger) == ["csv", "tensorboard"]


def test_slurm_launcher_config():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the optional extra [slurm]")
    cfg = compose_train("hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.nodes == 1 and cfg.trainer.num_nodes == 2


@pytest.mark.slow
def test_a_sweep_runs_through_submitit(tmp_path):
    # The SLURM preset's launcher plugin, with submitit's local executor: the jobs are pickled, run in
    # separate processes and summarised, as on a cluster (only sbatch is missing).
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the optional extra [slurm]")
    sweep = tmp_path / "sweep"
    result = run_cli(
        "--multirun", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "experiment=smoke",
        "strategy=stl,switch", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads((sweep / job / "run_summary.json").read_text()) for job in ("0_stl_seed0", "1_switch_seed0")]
    assert [s["strategy"] for s in summaries] == ["stl", "switch"]
    assert summaries[1]["drop_times"] == {task: 2 for task in AUX}
    assert "| strategy | runs |" in result.stdout


# ---------------------------------------------------------------------------------------------- failing early
def test_a_misspelled_key_fails_with_hydras_error():
    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        compose_train("trainer.max_epoch=3")


def test_an_unknown_group_option_fails_with_hydras_error():
    with pytest.raises(MissingConfigException, match="strategy/swtich"):
        compose_train("strategy=swtich")


def test_a_primary_task_the_data_lacks_is_named(tmp_path):
    cfg = compose_train(f"paths.output_dir={tmp_path}", "model.primary=label")
    with pytest.raises(ValueError, match=r"model.primary='label'.*\['digit', 'recon', 'edges', 'moments'\]"):
        train(cfg)
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is known to be valid"


def test_an_unknown_auxiliary_task_is_named(tmp_path):
    cfg = compose_train(f"paths.output_dir={tmp_path}", "data.aux_tasks=[recon,shape]")
    with pytest.raises(InstantiationException, match="'shape'"):
        train(cfg)


def test_a_strategy_naming_an_unknown_task_fails_before_the_first_step(tmp_path):
    cfg = compose_train(
        f"paths.output_dir={tmp_path}",
        "experiment=smoke",
        "strategy.switch_at={recon:2,edges:2,moments:2,bogus:3}",
    )
    with pytest.raises(ValueError, match="bogus"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_train_writes_and_returns_the_run_summary(tmp_path):
    cfg = compose_train(f"paths.output_dir={tmp_path}", "experiment=smoke")
    summary = train(cfg)

    assert json.loads((tmp_path / "run_summary.json").read_text()) == summary
    # Typed and versioned: the report's reader takes what the app wrote, field for field.
    assert summary["format_version"] == FORMAT_VERSION
    assert RunSummary.read(tmp_path).to_dict() == summary
    assert (summary["strategy"], summary["label"], summary["seed"]) == ("switch", "switch", 0)
    assert summary["primary_metric_name"] == "accuracy"  # the model names no other
    assert summary["total_steps"] == 8 and summary["planned_total"] == 8
    assert summary["drop_times"] == {task: 2 for task in AUX}  # switch_at 0.3 of 8 steps
    phases = summary["phases"]
    assert list(phases) == ["digit+recon+edges+moments", "digit"]
    assert [p["batches"] for p in phases.values()] == [2, 6]
    assert summary["train_flops"] == sum(p["batches"] * p["flops_per_batch"] for p in phases.values())
    assert 0.0 <= summary["test_primary_metric"] <= 1.0
    assert summary["best_val_primary_metric"] is not None
    assert (tmp_path / summary["metrics_csv"]).is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


class CrashAtStep(L.Callback):
    """Fails the run at a given optimizer step, as a lost node or a bug would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated failure")


def test_a_failed_run_saves_its_state_at_the_exception_and_resumes_in_its_folder(tmp_path):
    crash = ["+callbacks.crash._target_=tests.test_app.CrashAtStep", "+callbacks.crash.step=6"]
    cfg = compose_train(f"paths.output_dir={tmp_path}", "experiment=smoke", *crash)
    with pytest.raises(RuntimeError, match="simulated failure"):
        train(cfg)
    last, at_failure = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "on_exception.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4  # the end of the first epoch, after the switch
    assert torch.load(at_failure, weights_only=False)["global_step"] == 6  # the state when it failed
    assert not (tmp_path / "run_summary.json").exists()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    assert {int(r["step"]) for r in rows if r.get("mt2st/weight/recon")} == {0, 1, 2, 3, 4, 5, 6}
    # Resuming finishes the run in its own folder: the heads stay dropped, the step count is the
    # uninterrupted one, and metrics.csv holds each step once.
    resumed = train(compose_train(f"paths.output_dir={tmp_path / 'elsewhere'}", "experiment=smoke", f"ckpt_path={last}"))
    assert resumed["total_steps"] == 8 and resumed["drop_times"] == {task: 2 for task in AUX}
    assert json.loads((tmp_path / "run_summary.json").read_text()) == resumed
    assert [p["batches"] for p in resumed["phases"].values()] == [2, 6]  # the cost from step 0
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    steps = [int(r["step"]) for r in rows if r.get("mt2st/weight/recon")]
    assert steps == list(range(8))
    assert not at_failure.exists()  # OnExceptionCheckpoint removes it when a fit ends normally


def test_last_ckpt_is_the_last_epoch_whatever_the_monitored_metric_does(tmp_path):
    # mode=min on an accuracy: the best checkpoint stays at the first epoch; last.ckpt must still move on.
    cfg = compose_train(f"paths.output_dir={tmp_path}", "experiment=smoke", "callbacks.model_checkpoint.mode=min", "test=false")
    train(cfg)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert torch.load(tmp_path / "checkpoints" / "epoch000.ckpt", weights_only=False)["global_step"] == 4


def test_a_resume_with_other_settings_than_the_run_is_refused(tmp_path):
    train(compose_train(f"paths.output_dir={tmp_path}", "experiment=smoke", "test=false"))
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose_train("experiment=smoke", "test=false")))
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n- test=false\n")
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"differs from that run's in model.lr.*mt2st-train experiment=smoke test=false"):
        train(compose_train(f"paths.output_dir={tmp_path / 'x'}", "experiment=smoke", "test=false", "model.lr=0.5", f"ckpt_path={last}"))


def test_a_missing_checkpoint_fails_before_anything_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*does not exist"):
        train(compose_train(f"paths.output_dir={tmp_path}", f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_train_under_fast_dev_run_tests_the_weights_in_memory(tmp_path):
    cfg = compose_train(
        f"paths.output_dir={tmp_path}", "trainer.fast_dev_run=true", "trainer.enable_progress_bar=false"
    )
    summary = train(cfg)
    assert summary["total_steps"] == 1
    assert summary["tested_checkpoint"] == "in-memory weights"
    assert summary["metrics_csv"] is None  # fast_dev_run silences the loggers


@pytest.mark.slow
def test_cli_rejects_a_misspelled_key_before_training(tmp_path):
    result = run_cli("trainer.max_epoch=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not override 'trainer.max_epoch'" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_multirun_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "--multirun", "experiment=smoke", "strategy=stl,mtl,switch", f"hydra.sweep.dir={sweep}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "0_stl_seed0",
        "1_mtl_seed0",
        "2_switch_seed0",
    ]
    assert "| strategy | runs |" in result.stdout  # the end-of-sweep summary (hydra.callbacks)

    report_cmd = shutil.which("mt2st-report")
    if report_cmd:
        report = subprocess.run(
            [report_cmd, str(sweep)], check=False, capture_output=True, text=True, timeout=120
        )
    else:
        report = run_cli(str(sweep), cwd=tmp_path, module="mt2st_lightning.report")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "compression vs STL (%)" in report.stdout

    with open(sweep / "summary.csv", newline="") as f:
        rows = {row["strategy"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["stl", "mtl", "switch"]
    for column in (
        "test_acc_mean",
        "best_val_acc_mean",
        "wall_time_s_mean",
        "train_flops_mean",
        "compression_mean",
        "flops_per_batch_last_phase_mean",
        "time_to_target_s_mean",
        "flops_to_target_mean",
    ):
        assert column in rows["stl"]
    assert float(rows["stl"]["compression_mean"]) == 0.0
    assert float(rows["mtl"]["compression_mean"]) < float(rows["switch"]["compression_mean"]) < 0.0
    assert float(rows["switch"]["flops_per_batch_last_phase_mean"]) < float(
        rows["mtl"]["flops_per_batch_last_phase_mean"]
    )
    for name in ("summary.md", "curves_vs_step.png", "curves_vs_flops.png", "aux_weights.png"):
        assert (sweep / name).is_file(), name


@pytest.mark.slow
def test_ddp_cpu_trains_across_a_switch_and_evaluates_every_sample_once(tmp_path):
    start = time.perf_counter()
    result = run_cli(
        "experiment=smoke",
        "trainer=ddp_cpu",
        "trainer.max_steps=6",
        "strategy.switch_at=3",
        # The whole validation and test splits: 269 samples each, split over 2 processes (135 + 134).
        "trainer.limit_val_batches=null",
        "trainer.limit_test_batches=null",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=240,
        warnings=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.perf_counter() - start < 180  # about 25 s alone; the shared 2-core machine is often busy
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["total_steps"] == 6
    assert summary["drop_times"] == {task: 3 for task in AUX}
    assert [p["batches"] for p in summary["phases"].values()] == [3, 3]
    # Lightning's DistributedSampler would pad the odd split to 270 (one sample counted twice).
    assert summary["val_samples"] == summary["test_samples"] == 269
    assert summary["settings"]["devices"] == 2
    assert "sync_dist" not in result.stderr + result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "overrides", "drop_at"),
    [
        # No plateau can show before the first validation (step 4), so max_step decides: step 3 on both ranks,
        # after which the policy still observes the validation checks, reduced across the ranks.
        ("plateau", ["strategy.max_step=3"], 3),
        # Every cosine is below 1: each task is dropped after its first measurement (step 0), at step 1.
        ("conflict", ["strategy.threshold=1.0", "strategy.window=1", "strategy.adapt_every=1"], 1),
    ],
)
def test_data_driven_switches_run_from_the_app_under_plain_ddp(tmp_path, strategy, overrides, drop_at):
    result = run_cli(
        "experiment=smoke",
        "trainer=ddp_cpu",
        "trainer.max_steps=6",
        f"strategy={strategy}",
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["total_steps"] == 6
    assert summary["drop_times"] == {task: drop_at for task in AUX}


@pytest.mark.slow
def test_ddp_inside_a_multirun_is_refused(tmp_path):
    result = run_cli(
        "--multirun",
        "experiment=smoke",
        "trainer=ddp_cpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "a --multirun cannot do" in result.stderr


# ---------------------------------------------------------------------------------------------- console
@pytest.mark.slow
def test_off_a_terminal_progress_is_one_log_line_per_epoch_and_the_drop_is_in_train_log(tmp_path):
    run = tmp_path / "run"
    result = run_cli("experiment=smoke", "trainer.enable_progress_bar=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "\r" not in output and "it/s" not in output  # no bar redraws in a log file
    log_lines = (run / "train.log").read_text().splitlines()
    epochs = [line for line in log_lines if "[mt2st_lightning.app.progress]" in line and " - epoch " in line]
    assert [line.split(" - ", 1)[1].split(":")[0] for line in epochs] == ["epoch 1/2, step 4/8", "epoch 2/2, step 8/8"]
    assert "val/primary_metric" in epochs[0]
    # Lightning's own lines (the MT2ST drop among them) reach train.log, each on a line of its own.
    drops = [line for line in log_lines if "left the computation" in line]
    assert len(drops) == 1 and drops[0].startswith("[") and "[INFO]" in drops[0]
    assert "`Trainer.fit` stopped" in "\n".join(log_lines)


def test_a_configured_progress_bar_is_kept(tmp_path):
    pytest.importorskip("rich", reason="needs the optional extra [rich]")
    cfg = compose_train(
        f"paths.output_dir={tmp_path}", "experiment=smoke", "callbacks=[default,rich_progress_bar]",
        "trainer.enable_progress_bar=true", "test=false",
    )
    assert train(cfg)["total_steps"] == 8


def test_an_unknown_progress_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"progress='loud' is not one of \('auto', 'bar', 'epoch', 'none'\)"):
        train(compose_train(f"paths.output_dir={tmp_path}", "experiment=smoke", "trainer.enable_progress_bar=true", "progress=loud"))


def test_the_optional_callbacks_name_their_extra():
    import tomllib

    extras = tomllib.loads((CONFIG_DIR.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("rich") for dep in extras["rich"])
    assert 'pip install "mt2st-lightning[rich]"' in (CONFIG_DIR / "callbacks" / "rich_progress_bar.yaml").read_text()


def test_step_checkpoints_keep_last_ckpt_within_a_few_steps_in_long_epochs(tmp_path):
    cfg = compose_train(
        f"paths.output_dir={tmp_path}", "experiment=smoke", "callbacks=[default,step_checkpoint]",
        "callbacks.step_checkpoint.every_n_train_steps=3", "+callbacks.crash._target_=tests.test_app.CrashAtStep",
        "+callbacks.crash.step=7",
    )
    with pytest.raises(RuntimeError, match="simulated failure"):
        train(cfg)
    # Saved at steps 3, 4 (the epoch's end) and 6: the latest of them, not the epoch end.
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


@pytest.mark.parametrize(("terminal", "mode"), [(True, "bar"), (False, "epoch")])
def test_auto_progress_is_the_bar_in_a_terminal_and_epoch_lines_elsewhere(monkeypatch, terminal, mode):
    from mt2st_lightning.app import train as app

    monkeypatch.setattr(app.sys.stdout, "isatty", lambda: terminal)
    monkeypatch.setattr(app.sys.stderr, "isatty", lambda: terminal)
    cfg = compose_train("trainer.enable_progress_bar=true")
    assert app._progress_mode(cfg, []) == mode
    assert app._progress_mode(compose_train("trainer.enable_progress_bar=false"), []) == "off"


def test_the_seed_is_no_setting_at_any_depth_of_the_data_config():
    # The report averages runs over seeds and splits them by settings: a wrapped data module's shuffle_seed
    # (data.images.shuffle_seed: ${seed}) must not make every seed a setting of its own.
    from types import SimpleNamespace

    from mt2st_lightning.app.train import run_settings

    trainer = SimpleNamespace(precision="32-true", world_size=1)
    mt2st = SimpleNamespace(total=600.0, unit="step")
    one, two = (
        run_settings(compose_train("data=diffusion_digits", "model=ddpm", f"seed={seed}"), trainer, mt2st)
        for seed in (1, 2)
    )
    assert one == two
    assert "shuffle_seed" not in one["data"]["images"] and one["data"]["images"]["split_seed"] == 0
