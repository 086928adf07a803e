"""``mt2st-train``: train one MT2ST model from the Hydra config in ``conf/``, or sweep with ``--multirun``.

The app only composes library pieces: the data module says which tasks exist, the model is built for them,
``MT2STCallback`` (from the ``strategy`` group) schedules and drops the auxiliary heads and ``PhaseCostMeter``
measures what that saves. Each run writes ``run_summary.json`` into its output folder; ``mt2st-report``
turns a folder of them into tables and plots.

    mt2st-train strategy=diminish seed=1
    mt2st-train --multirun experiment=paper_digits
    python -m mt2st_lightning.train --help
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf

from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.flops import PhaseCostMeter
from mt2st_lightning.report import SUMMARY_FILE

__all__ = ["CONFIG_DIR", "main", "train"]

log = logging.getLogger(__name__)


def _config_dir() -> Path:
    """``conf/``: inside the package when installed from a wheel, at the repository root when editable."""
    packaged = Path(__file__).resolve().with_name("conf")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


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
    """Refuse DDP's script launcher inside a ``--multirun``: it re-runs the command line once per extra
    device, so every copy would run the whole sweep."""
    strategy = trainer.strategy
    # The launcher of strategy="ddp" (not of "ddp_spawn"), unless a cluster (SLURM) starts the processes.
    relaunches = isinstance(getattr(strategy, "launcher", None), _SubprocessScriptLauncher) and not (
        strategy.cluster_environment is not None and strategy.cluster_environment.creates_processes_externally
    )
    if relaunches and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise RuntimeError(
            f"trainer.strategy={type(strategy).__name__} starts one process per device by re-running the "
            "command line, which a --multirun cannot do (each copy would run the whole sweep). Launch DDP "
            "runs one at a time without --multirun, or sweep with a launcher that starts the processes "
            "itself (hydra/launcher=slurm)."
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


def _find(callbacks: list[Callback], kind: type) -> Any:
    return next((c for c in callbacks if isinstance(c, kind)), None)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) one model as ``cfg`` describes; write and return the run's summary.

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
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = hydra.utils.instantiate(cfg.data)
    tasks = datamodule.task_specs
    check_primary_task(cfg, tasks)
    model = hydra.utils.instantiate(cfg.model, tasks=tasks, _convert_="all")
    mt2st, callbacks = instantiate_callbacks(cfg)
    loggers = instantiate_loggers(cfg)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_launch(trainer)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_wall_time_s = time.perf_counter() - start
    # Read the fit's outcome now: testing a checkpoint restores the callbacks' states saved in it.
    summary = _fit_summary(cfg, trainer, model, mt2st, output_dir)
    summary["fit_wall_time_s"] = fit_wall_time_s
    summary.update(_test(cfg, trainer, model, datamodule))
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        log.info("Run summary: %s", output_dir / SUMMARY_FILE)
    return summary


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _test(cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, datamodule: Any) -> dict[str, Any]:
    """Test the best checkpoint if one was kept (none under fast_dev_run), else the weights in memory."""
    if not cfg.get("test"):
        return {"test_primary_metric": None, "tested_checkpoint": None}
    checkpoint = _find(trainer.callbacks, ModelCheckpoint)
    best = checkpoint.best_model_path if checkpoint is not None else ""
    results = trainer.test(model, datamodule=datamodule, ckpt_path="best" if best else None)
    return {
        "test_primary_metric": results[0].get("test/primary_metric") if results else None,
        "tested_checkpoint": _relative(Path(best), Path(cfg.paths.output_dir))
        if best
        else "in-memory weights",
    }


def _fit_summary(
    cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, mt2st: MT2STCallback, output_dir: Path
) -> dict[str, Any]:
    checkpoint = _find(trainer.callbacks, ModelCheckpoint)
    meter = _find(trainer.callbacks, PhaseCostMeter)
    cost = meter.summary() if meter is not None else {"total_flops": None, "total_time_s": None, "phases": {}}
    best_val = None
    if (
        checkpoint is not None
        and checkpoint.monitor == "val/primary_metric"
        and checkpoint.best_model_score is not None
    ):
        best_val = float(checkpoint.best_model_score)
    csv_logs = [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    return {
        "label": str(cfg.get("label") or mt2st.strategy),
        "strategy": mt2st.strategy,
        "seed": int(cfg.seed),
        "primary_task": model.primary_task,
        "auxiliary_tasks": list(model.auxiliary_tasks),
        "best_val_primary_metric": best_val,
        # Training batches only, on this process (rank 0 under DDP): the cost MT2ST changes.
        "train_flops": cost["total_flops"],
        "train_time_s": cost["total_time_s"],
        # Per phase (the set of active tasks), in the order the phases ran; the last one is post-switch.
        "phases": cost["phases"],
        "drop_times": dict(mt2st.drop_times),
        "mt2st_unit": mt2st.unit,
        "planned_total": mt2st.total,
        "total_steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "final_val_primary_metric": _metric(trainer, "val/primary_metric"),
        # Relative to the run's folder (where this file is), so a moved sweep folder still reads.
        "metrics_csv": _relative(csv_logs[0], output_dir) if csv_logs else None,
        "output_dir": str(output_dir.resolve()),
    }


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


# ---------------------------------------------------------------------------------------------- CLI
@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The Hydra entry point (``mt2st-train``). Returns the test metric, which an optimising sweeper reads."""
    log.debug("Config:\n%s", OmegaConf.to_yaml(cfg))
    return train(cfg)["test_primary_metric"]


if __name__ == "__main__":
    main()
