"""``mt2st-train``: train one MT2ST model from the Hydra config in ``conf/``, or sweep with ``--multirun``.

The app only composes library pieces: the data module says which tasks exist, the model is built for them,
``MT2STCallback`` (from the ``strategy`` group) schedules and drops the auxiliary heads and ``PhaseCostMeter``
measures what that saves. Each run writes ``run_summary.json`` into its output folder; ``mt2st-report``
turns a folder of them into tables and plots.

    mt2st-train strategy=diminish seed=1
    mt2st-train --multirun experiment=paper_digits
    python -m mt2st_lightning.app.train --help
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.flops import PhaseCostMeter
from mt2st_lightning.internals import relaunches_script
from mt2st_lightning.app.progress import EpochLines
from mt2st_lightning.app.run_format import (
    DEFAULT_PRIMARY_METRIC_NAME,
    RESUME_POINTER_FILE,
    STREAM_PREFIX,
    SUMMARY_FILE,
    TEST_PRIMARY_METRIC,
    VAL_PRIMARY_METRIC,
    RunSummary,
    read_metrics,
)

__all__ = ["CONFIG_DIR", "main", "train"]

log = logging.getLogger(__name__)


def _config_dir() -> Path:
    """``conf/``: inside the package when installed from a wheel, at the repository root when editable."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parents[1] / "conf"


CONFIG_DIR = _config_dir()


# ---------------------------------------------------------------------------------------------- building
def check_primary_task(cfg: DictConfig, tasks: dict[str, Any]) -> None:
    """Fail before anything trains when the model's primary task is not one the data module provides."""
    primary = cfg.model.primary
    if primary not in tasks:
        raise ValueError(
            f"model.primary={primary!r} is not a task of the data module {cfg.data._target_}, which provides "
            f"{list(tasks)}; set model.primary (or data.label_task) to one of them"
        )


def check_launch(trainer: L.Trainer) -> None:
    """Refuse DDP's (and FSDP2's) script launcher inside a ``--multirun``: it re-runs the command line once per
    extra device, so every copy would run the whole sweep."""
    strategy = trainer.strategy
    # The launcher of strategy="ddp" (not of "ddp_spawn"), unless a cluster (SLURM) starts the processes.
    if relaunches_script(strategy) and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise RuntimeError(
            f"trainer.strategy={type(strategy).__name__} starts one process per device by re-running the "
            "command line, which a --multirun cannot do (each copy would run the whole sweep). Launch DDP "
            "runs one at a time without --multirun, or sweep with a launcher that starts the processes "
            "itself (hydra/launcher=slurm)."
        )


def check_fsdp2_mesh(trainer_cfg: DictConfig) -> None:
    """Refuse, before any process starts, an FSDP2 mesh (``ModelParallelStrategy``) other than the one MT2ST runs
    under: pure data parallelism, one shard per process (as ``trainer=fsdp2`` and ``fsdp2_cpu`` set it)."""
    strategy = trainer_cfg.get("strategy")
    if not isinstance(strategy, DictConfig) or not str(strategy.get("_target_", "")).endswith(".ModelParallelStrategy"):
        return
    devices, nodes = trainer_cfg.get("devices"), trainer_cfg.get("num_nodes", 1)
    if not (isinstance(devices, int) and devices > 0 and isinstance(nodes, int)):
        return  # "auto", -1 or a list of devices: Lightning counts them, and checks the mesh when it builds it
    world_size = devices * nodes
    sizes = strategy.get("data_parallel_size", "auto"), strategy.get("tensor_parallel_size", "auto")
    if tuple(sizes) != (world_size, 1):
        raise ValueError(
            f"trainer.strategy is ModelParallelStrategy with data_parallel_size={sizes[0]}, tensor_parallel_size="
            f"{sizes[1]} on {devices} device(s) x {nodes} node(s); MT2ST shards with FSDP2 over every process, "
            f"without tensor parallelism: set trainer.strategy.data_parallel_size={world_size} (trainer.devices x "
            "trainer.num_nodes) and trainer.strategy.tensor_parallel_size=1"
        )


def instantiate_callbacks(cfg: DictConfig) -> tuple[MT2STCallback, list[Callback]]:
    """The MT2ST callback from ``cfg.strategy``, then every callback in ``cfg.callbacks``, in the order the
    library needs: MT2ST first, the cost meter next (it reads the phase MT2ST sets at each batch start)."""
    mt2st = hydra.utils.instantiate(cfg.strategy)
    if not isinstance(mt2st, MT2STCallback):
        raise TypeError(f"cfg.strategy must instantiate an MT2STCallback, got {type(mt2st).__name__}")
    others = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    others.sort(key=lambda c: not isinstance(c, PhaseCostMeter))  # stable: the rest keep their config order
    return mt2st, [mt2st, *others]


def instantiate_loggers(cfg: DictConfig) -> list[Logger]:
    return [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def _find(callbacks: list[Callback], kind: type, where: Any = lambda c: True) -> Any:
    return next((c for c in callbacks if isinstance(c, kind) and where(c)), None)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) one model as ``cfg`` describes; write the run's summary (:class:`RunSummary`) and return
    what it wrote (``RunSummary.to_dict()``: ``RunSummary.from_dict`` makes it typed again).

    ``cfg`` is the composed ``train`` config. Outside a Hydra run (tests, notebooks) set
    ``paths.output_dir`` to a folder: everything the run writes goes there.
    """
    with _torch_threads(cfg.get("num_threads")):
        return _train(cfg)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """PyTorch's CPU thread count set to ``n`` for the run, and given back after it (callers may be tests)."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(cfg: DictConfig) -> dict[str, Any]:
    check_fsdp2_mesh(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)
    resume = _resume_target(cfg)
    if resume is not None:
        _continue_run(cfg, resume)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = hydra.utils.instantiate(cfg.data)
    tasks = datamodule.task_specs
    check_primary_task(cfg, tasks)
    # A data module may also hand the model what only the data knows (e.g. a text module's vocabulary size).
    model = hydra.utils.instantiate(cfg.model, tasks=tasks, **getattr(datamodule, "model_inputs", {}), _convert_="all")
    mt2st, callbacks = instantiate_callbacks(cfg)
    progress = _progress_mode(cfg, callbacks)
    if progress == "epoch":
        callbacks.append(EpochLines())
    loggers = instantiate_loggers(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False,
        **({"enable_progress_bar": False} if progress == "none" else {}),
    )
    check_launch(trainer)
    if resume is not None and trainer.is_global_zero:
        _keep_history_before(trainer.loggers, _checkpoint_step(resume))

    start = time.perf_counter()
    # In a terminal, log lines print above tqdm's bar instead of being glued to it.
    redirect = _logging_redirect_tqdm() if progress == "bar" else contextlib.nullcontext()
    try:
        with redirect, warnings.catch_warnings():
            if resume is not None:  # the run's own checkpoints are there, as they should be
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except BaseException as error:
        last = _find(trainer.callbacks, ModelCheckpoint, lambda c: c.monitor is None)
        path = Path(last.dirpath) / "last.ckpt" if last is not None and last.dirpath else None
        hint = f"resume it with ckpt_path={path} and the same overrides" if path and is_checkpoint(path) else "no checkpoint to resume from"
        log.error("The run stopped at step %d with %s: %s", trainer.global_step, type(error).__name__, hint)
        raise
    fit_wall_time_s = time.perf_counter() - start
    # Read the fit's outcome now: testing a checkpoint restores the callbacks' states saved in it.
    fit = _fit_summary(cfg, trainer, model, mt2st, output_dir)
    meter = _find(trainer.callbacks, PhaseCostMeter)
    summary = RunSummary(
        **fit,
        # The whole run's wall time: a resumed fit adds what the run had spent up to its checkpoint.
        fit_wall_time_s=fit_wall_time_s + (meter.wall_time_before_resume_s if meter is not None else 0.0),
        resumed_from=str(Path(cfg.ckpt_path).resolve()) if cfg.get("ckpt_path") else None,
        **_test(cfg, trainer, model, datamodule),
    )
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        log.info("Run summary: %s", summary.write(output_dir))
    return summary.to_dict()


# ---------------------------------------------------------------------------------------------- resuming
# A distributed checkpoint (ModelParallelStrategy, trainer=fsdp2) is a folder: one shard file per process, and
# this file, which Lightning writes beside them with the rest of the checkpoint (step, loops, callback states).
DISTRIBUTED_CHECKPOINT_META = "meta.pt"


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint: a file, or the folder of a distributed checkpoint."""
    return path.is_file() or (path / DISTRIBUTED_CHECKPOINT_META).is_file()


def _resume_target(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from, or ``None``; a missing one fails here, before anything is built."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist"
            + (" as a checkpoint (a folder without meta.pt)" if path.is_dir() else "")
            + "; point it at a run's checkpoints/last.ckpt"
        )
    return path.resolve()


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<file>``, as ``mt2st-train`` writes it), or
    ``None`` for a checkpoint from elsewhere."""
    run = checkpoint.parent.parent
    is_run = checkpoint.parent.name == "checkpoints" and ((run / ".hydra").is_dir() or (run / SUMMARY_FILE).is_file() or (run / "csv").is_dir())
    return run if is_run else None


# The settings a resumed run must share with the run it continues (anything else may change).
_RUN_DEFINING = ("data", "model", "strategy", "trainer", "seed", "label")


def _continue_run(cfg: DictConfig, checkpoint: Path) -> None:
    """Point ``paths.output_dir`` at the checkpoint's run folder, so that the resumed run's logs, checkpoints
    and summary continue there; the config must be the run's own (the overrides it was started with)."""
    run = run_dir_of(checkpoint)
    if run is None:
        log.info("Resuming from %s (not inside a run folder): this run writes to %s", checkpoint, cfg.paths.output_dir)
        return
    saved = run / ".hydra" / "config.yaml"
    if saved.is_file():
        _check_same_run(cfg, OmegaConf.load(saved), run)
    here = Path(cfg.paths.output_dir).resolve()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    if here != run.resolve():
        # The folder Hydra made for this launch holds only its config and log; it points to the run.
        here.mkdir(parents=True, exist_ok=True)
        (here / RESUME_POINTER_FILE).write_text(json.dumps({"run_dir": str(run), "ckpt_path": str(checkpoint)}) + "\n")
        _log_to(run / "train.log")
    log.info("Resuming run %s from %s (step %d)", run, checkpoint.name, _checkpoint_step(checkpoint))


def _check_same_run(cfg: DictConfig, saved: DictConfig, run: Path) -> None:
    differ = []
    for key in _RUN_DEFINING:
        mine = OmegaConf.to_container(cfg, resolve=False).get(key)
        theirs = OmegaConf.to_container(saved, resolve=False).get(key)
        differ += _differences(mine, theirs, key)
    if differ:
        overrides = run / ".hydra" / "overrides.yaml"
        original = " ".join(OmegaConf.load(overrides)) if overrides.is_file() else "(unknown)"
        raise ValueError(
            f"ckpt_path continues the run in {run}, but this config differs from that run's in "
            f"{', '.join(differ)}. Resume with the run's own overrides: mt2st-train {original} ckpt_path=..."
        )


def _differences(mine: Any, theirs: Any, prefix: str) -> list[str]:
    if isinstance(mine, dict) and isinstance(theirs, dict):
        return [d for k in sorted(set(mine) | set(theirs)) for d in _differences(mine.get(k), theirs.get(k), f"{prefix}.{k}")]
    return [] if mine == theirs else [prefix]


def _log_to(path: Path) -> None:
    """Also write this process's log records into ``path`` (the resumed run's own ``train.log``)."""
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    file_handlers = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    handler.setFormatter(file_handlers[0].formatter if file_handlers else logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)


def _checkpoint_step(checkpoint: Path) -> int:
    if checkpoint.is_dir():  # a distributed checkpoint: the step is in its metadata file, beside the shards
        checkpoint = checkpoint / DISTRIBUTED_CHECKPOINT_META
    return int(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def _keep_history_before(loggers: list[Logger], step: int) -> None:
    """Keep a run's ``metrics.csv`` rows from before the checkpoint's ``step`` (the resumed run logs the later
    steps again), so that the finished run's file holds every step once. ``CSVLogger`` deletes an existing
    file when it starts; the kept rows are logged anew through it (a copy survives until they are written)."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        rows = read_metrics(path)
        backup = path.with_name("metrics.before_resume.csv")
        shutil.copyfile(path, backup)
        kept = [row for row in rows if "step" in row and row["step"] < step]
        with warnings.catch_warnings():
            # CSVLogger's "previous log files will be deleted": they are being written back, here.
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            for row in kept:
                logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
            logger.save()
        backup.unlink()
        log.info("Kept %d of %d rows of %s (steps before %d)", len(kept), len(rows), path, step)


# ---------------------------------------------------------------------------------------------- progress
PROGRESS_MODES = ("auto", "bar", "epoch", "none")


def _progress_mode(cfg: DictConfig, callbacks: list[Callback]) -> str:
    """``bar`` (Lightning's own, or a configured one such as RichProgressBar), ``epoch`` (one log line per
    epoch) or ``none``. ``auto``: the bar in a terminal, one line per epoch when the output goes to a file."""
    mode = cfg.get("progress", "auto")
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress={mode!r} is not one of {PROGRESS_MODES}")
    if not cfg.trainer.get("enable_progress_bar", True):
        return "off"  # the trainer's own switch: nothing to add, nothing to turn off
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return "configured"  # e.g. callbacks=[default,rich_progress_bar]: the user chose it
    if mode == "auto":
        mode = "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "epoch"
    return mode


def _logging_redirect_tqdm() -> Any:
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _test(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, datamodule: Any) -> dict[str, Any]:
    """Test the best checkpoint if one was kept (none under fast_dev_run), else the weights in memory: the
    :class:`RunSummary` fields of the test."""
    if not cfg.get("test"):
        return {"test_primary_metric": None, "test_samples": None, "test_metrics": {}, "tested_checkpoint": None}
    checkpoint = _find(trainer.callbacks, ModelCheckpoint, lambda c: c.monitor is not None)
    best = checkpoint.best_model_path if checkpoint is not None else ""
    results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
    return {
        "test_primary_metric": results[0].get(TEST_PRIMARY_METRIC) if results else None,
        "test_samples": _metric(trainer, "test/samples"),
        # Every test metric the model logs (e.g. an auxiliary metric: a Fréchet distance, a Spearman correlation).
        # One dict per test dataloader (a text module also tests held-out word pairs and analogies): all of them.
        "test_metrics": {k: float(v) for per_loader in results for k, v in per_loader.items()},
        "tested_checkpoint": _relative(Path(best), Path(cfg.paths.output_dir))
        if best
        else "in-memory weights",
    }


def _fit_summary(
    cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, mt2st: MT2STCallback, output_dir: Path
) -> dict[str, Any]:
    """The :class:`RunSummary` fields of the fit (what each means: there)."""
    checkpoint = _find(trainer.callbacks, ModelCheckpoint, lambda c: c.monitor is not None)
    meter = _find(trainer.callbacks, PhaseCostMeter)
    cost = meter.summary() if meter is not None else {"total_flops": None, "total_time_s": None, "phases": {}}
    best_val = None
    if (
        checkpoint is not None
        and checkpoint.monitor == VAL_PRIMARY_METRIC
        and checkpoint.best_model_score is not None
    ):
        best_val = float(checkpoint.best_model_score)
    csv_logs = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    return {
        "label": str(cfg.get("label") or mt2st.strategy),
        "strategy": mt2st.strategy,
        "seed": int(cfg.seed),
        "primary_task": model.primary_task,
        # Accuracy unless the model says otherwise.
        "primary_metric_name": str(getattr(model, "primary_metric_name", DEFAULT_PRIMARY_METRIC_NAME)),
        "auxiliary_tasks": list(model.auxiliary_tasks),
        "best_val_primary_metric": best_val,
        "train_flops": cost["total_flops"],
        "train_time_s": cost["total_time_s"],
        "phases": cost["phases"],
        "drop_times": dict(mt2st.drop_times),
        "mt2st_unit": mt2st.unit,
        "planned_total": mt2st.total,
        "total_steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "final_val_primary_metric": _metric(trainer, VAL_PRIMARY_METRIC),
        # Cumulative counts at each stream's last logged step.
        "stream_costs": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(STREAM_PREFIX)},
        "val_samples": _metric(trainer, "val/samples"),
        # Relative to the run's folder (where this file is), so a moved sweep folder still reads.
        "metrics_csv": _relative(csv_logs[0], output_dir) if csv_logs else None,
        "output_dir": str(output_dir.resolve()),
        "settings": run_settings(cfg, trainer, mt2st),
    }


def run_settings(cfg: DictConfig, trainer: L.Trainer, mt2st: MT2STCallback) -> dict[str, Any]:
    """The settings that change a run's result other than its seed: data, model, strategy parameters, planned
    length, precision and the number of processes."""

    def config(key: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        node = OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else {}
        return _without(node, drop)

    return {
        # Not the loader's worker count or the seed (the run's seed is the thing averaged over).
        "data": config("data", drop=("num_workers", "shuffle_seed")),
        "model": config("model", drop=("tasks",)),
        "strategy": config("strategy"),
        "planned_total": mt2st.total,
        "unit": mt2st.unit,
        "precision": str(trainer.precision),
        "devices": int(trainer.world_size),
    }


def _without(node: Any, keys: tuple[str, ...]) -> Any:
    """``node`` without ``keys`` at any depth (a data module may wrap another: ``data.images.shuffle_seed``)."""
    if isinstance(node, dict):
        return {k: _without(v, keys) for k, v in node.items() if k not in keys}
    return node


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------------------------------------- CLI
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The Hydra entry point (``mt2st-train``). Returns the run's best validation value of the primary metric: what
    a generic optimising sweeper would tune on (never the test value). The ``mt2st_optuna`` sweeper of
    ``hparams_search=<preset>`` scores each trial from its run folder instead, by the objective the preset names."""
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    return train(cfg)["best_val_primary_metric"]


if __name__ == "__main__":
    main()
