"""Shared fixtures: a small multi-task model on synthetic data, and a recorder of what each step did."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mt2st_lightning.examples.data.image_tasks import DictDataset
from mt2st_lightning.examples.models import MLPEncoder, MultiTaskModel

TASKS = {
    "label": {"kind": "classification", "out_features": 3},
    "recon": {"kind": "regression", "out_features": 16},
    "parity": {"kind": "regression", "out_features": 1},
}


def toy_dataset(n: int = 96, seed: int = 0) -> DictDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    flat = x.flatten(1)
    return DictDataset(
        {
            "x": x,
            "label": (flat[:, :5].sum(1) * 3 / 5).long().clamp(0, 2),
            "recon": flat,
            "parity": (flat[:, ::2].sum(1, keepdim=True) - flat[:, 1::2].sum(1, keepdim=True)),
        }
    )


def toy_loader(n: int = 96, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(toy_dataset(n), batch_size=batch_size, shuffle=shuffle)


def toy_model(seed: int = 0, **kwargs: Any) -> MultiTaskModel:
    pl.seed_everything(seed)
    kwargs.setdefault("head_hidden", 8)
    return MultiTaskModel(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", **kwargs)


def nan_model(nan_step: int = 2) -> MultiTaskModel:
    """``toy_model`` whose ``parity`` loss is NaN at optimizer step ``nan_step``."""

    class NaNAt(MultiTaskModel):
        def task_loss(self, task, output, target):
            loss = super().task_loss(task, output, target)
            if task == "parity" and self.trainer.global_step == nan_step:
                loss = loss * float("nan")
            return loss

    pl.seed_everything(0)
    return NaNAt(MLPEncoder(in_features=16, hidden=32), TASKS, primary="label", head_hidden=8)


def toy_trainer(tmp_path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class LossTap(pl.Callback):
    """Sees every ``mt2st_loss`` call of the module in training (wherever it sits in the callback list): the
    losses it was given, attached to the graph, in ``self.tapped`` until the next call."""

    def __init__(self) -> None:
        self.tapped: dict[str, torch.Tensor] | None = None
        self.features: torch.Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if "mt2st_loss" in pl_module.__dict__:  # tapped already (a second fit of the same module)
            return
        original = type(pl_module).mt2st_loss

        def tapped(losses, features=None):
            taps = pl_module.__dict__["_loss_taps"]
            for tap in taps:
                tap.tapped, tap.features = dict(losses), features
            return original(pl_module, losses, features)

        pl_module.__dict__["_loss_taps"] = []
        pl_module.__dict__["mt2st_loss"] = tapped

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        taps = pl_module.__dict__["_loss_taps"]
        if self not in taps:
            taps.append(self)


class StepRecorder(LossTap):
    """Records, for every training batch: the step, the weights in force, each task loss, and the total."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self.rows.append(
            {
                "step": trainer.global_step,
                "weights": dict(pl_module.task_weights),
                "active": pl_module.active_tasks,
                "losses": {t: v.detach().clone() for t, v in self.tapped.items()},
                "total": loss.detach().clone(),
            }
        )


@pytest.fixture
def recorder() -> StepRecorder:
    return StepRecorder()


# ---------------------------------------------------------------------------------------- torch.distributed in-process
@pytest.fixture
def restored_environ():
    """The environment as it was before the test: Lightning's launcher writes the ranks and the rendezvous into
    os.environ (LOCAL_RANK makes later trainers believe a cluster started them)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def process_group(restored_environ):
    """A one-process gloo group, as ModelParallelStrategy makes one; destroyed afterwards, so that no other test
    sees torch.distributed initialised."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(29400 + os.getpid() % 1000)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
