"""``MultiTaskModel``: a shared encoder, one head per task, trained through ``MT2STMixin``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Accuracy, MeanMetric, MeanSquaredError, Metric, SumMetric

from mt2st_lightning.app import run_format
from mt2st_lightning.mixin import MT2STMixin
from mt2st_lightning.sharding import fully_shard_tasks

__all__ = ["MultiTaskModel", "TaskSpec"]

Kind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task predicts: ``classification`` over ``out_features`` classes, or ``regression`` of
    ``out_features`` values (mean squared error)."""

    kind: Kind
    out_features: int

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression"):
            raise ValueError(f"task kind must be 'classification' or 'regression', got {self.kind!r}")
        if self.out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {self.out_features}")


def _head(in_features: int, out_features: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class MultiTaskModel(MT2STMixin, pl.LightningModule):
    """A shared ``encoder`` (any module with an ``out_features`` attribute) and one head per task.

    Batches are dicts: ``batch["x"]`` is the input and ``batch[task]`` each task's target. The primary task's
    metric (accuracy or MSE) is logged as ``{train,val,test}/primary_metric``; ``val/loss`` is the primary loss.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Mapping[str, TaskSpec | Mapping[str, Any]],
        primary: str,
        head_hidden: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        specs = {t: s if isinstance(s, TaskSpec) else TaskSpec(**s) for t, s in tasks.items()}
        # Plain dicts in the hyperparameters, also when given TaskSpecs (LightningCLI builds them): loggers write
        # hyperparameters as YAML, and Lightning's YAML writer refuses frozen dataclasses.
        self.save_hyperparameters({**self.hparams, "tasks": {t: asdict(s) for t, s in specs.items()}})
        if primary not in specs:
            raise ValueError(f"primary task {primary!r} is not among the model's tasks {list(specs)}")
        if not hasattr(encoder, "out_features"):
            raise TypeError(f"the encoder {type(encoder).__name__} must expose `out_features` (its feature width)")
        self.specs = specs
        self.encoder = encoder
        self.heads = nn.ModuleDict({t: _head(encoder.out_features, s.out_features, head_hidden) for t, s in specs.items()})
        self.declare_tasks(primary=primary, heads=self.heads)
        self.train_metric, self.val_metric, self.test_metric = (self._metric(specs[primary]) for _ in range(3))
        # How many samples each evaluation saw, and their mean primary loss, over all processes: under DDP every
        # sample counts once (torchmetrics syncs the sums at the epoch's end).
        self.val_samples, self.test_samples = SumMetric(), SumMetric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    @staticmethod
    def _metric(spec: TaskSpec) -> Metric:
        if spec.kind == "classification":
            return Accuracy(task="multiclass", num_classes=spec.out_features)
        return MeanSquaredError()

    def task_loss(self, task: str, output: Tensor, target: Tensor) -> Tensor:
        if self.specs[task].kind == "classification":
            return F.cross_entropy(output.float(), target)
        return F.mse_loss(output.float(), target.float())

    def forward(self, x: Tensor, tasks: tuple[str, ...] | None = None) -> dict[str, Tensor]:
        """Outputs of the given heads (default: the active ones; a dropped head never runs)."""
        h = self.encoder(x)
        return {t: self.heads[t](h) for t in (self.active_tasks if tasks is None else tasks)}

    def _shared_step(self, batch: Mapping[str, Tensor], stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        # Evaluation measures the primary task only: the auxiliary heads exist to shape the encoder.
        h = self.encoder(batch["x"])  # the shared features: gradient-based policies measure on them
        outputs = {t: self.heads[t](h) for t in (self.active_tasks if stage == "train" else (self.primary_task,))}
        losses = {t: self.task_loss(t, out, batch[t]) for t, out in outputs.items()}
        primary = self.primary_task
        metric = getattr(self, f"{stage}_metric")
        preds = outputs[primary].argmax(-1) if self.specs[primary].kind == "classification" else outputs[primary]
        metric(preds, batch[primary])
        n = batch["x"].shape[0]
        self.log(f"{stage}/primary_metric", metric, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n)
        if stage != "train":
            samples = getattr(self, f"{stage}_samples")
            samples.update(n)
            self.log(f"{stage}/samples", samples, on_step=False, on_epoch=True, batch_size=n)
        return self.mt2st_loss(losses, features=h) if stage == "train" else losses[primary], losses

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, losses = self._shared_step(batch, "train")
        n = batch["x"].shape[0]
        self.log(run_format.TRAIN_LOSS, loss, prog_bar=True, batch_size=n)
        self.log_dict({run_format.task_loss(t): v.detach() for t, v in losses.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        loss, _ = self._shared_step(batch, "val")
        self.val_loss.update(loss.detach(), weight=batch["x"].shape[0])
        self.log(run_format.VAL_LOSS, self.val_loss, prog_bar=True, on_step=False, on_epoch=True)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        loss, _ = self._shared_step(batch, "test")
        self.test_loss.update(loss.detach(), weight=batch["x"].shape[0])
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp2``, ``fsdp2_cpu``): shard with FSDP2, the encoder as one
        unit and each head as its own (:func:`~mt2st_lightning.sharding.fully_shard_tasks`); otherwise
        nothing."""
        if self.device_mesh is not None:  # set by ModelParallelStrategy only
            fully_shard_tasks(self, encoder_units=(self.encoder,))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
