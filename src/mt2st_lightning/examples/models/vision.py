"""``VisionMultiTaskModel``: the paper's vision setting (Table 2): image classification as the primary task, with
edge prediction (a Sobel map) and a contrastive objective (NT-Xent on two augmented views) as auxiliary tasks.

One encoder pass per training step covers every active task: the primary's augmented view, plus (while
``contrast`` is active) a second, stronger view of the same images, concatenated into one batch. After
``contrast`` is dropped the second view is neither drawn nor encoded, so a step costs what a single-task step
costs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Accuracy, MeanMetric, SumMetric

from mt2st_lightning.examples.data.augment import Augment
from mt2st_lightning.examples.data.streams import stream_costs
from mt2st_lightning.examples.data.targets import edge_map
from mt2st_lightning.mixin import MT2STMixin
from mt2st_lightning.sharding import fully_shard_tasks
from mt2st_lightning.examples.models.contrastive import nt_xent

__all__ = ["VisionMultiTaskModel"]

#: Sobel magnitudes of [0, 1] images reach about 4 * sqrt(2); divided by this they are O(1), like the other losses.
EDGE_SCALE = 4.0

#: The primary task's view (and the first contrastive view): a small shift and a mirror, standard for Fashion-MNIST.
PRIMARY_VIEW = {"scale": (1.0, 1.0), "shift": 0.1, "flip": True}
#: The second contrastive view: a random crop of 50-100 % of the side, a shift, a mirror and a photometric jitter.
CONTRAST_VIEW = {"scale": (0.5, 1.0), "shift": 0.15, "flip": True, "brightness": 0.3, "contrast": 0.4}


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class VisionMultiTaskModel(MT2STMixin, pl.LightningModule):
    """A shared ``encoder`` (any module with ``out_features``; e.g. ``ResNetEncoder``) and one head per task.

    ``tasks`` is the data module's ``task_specs``: the primary task (``kind: classification``) and any of
    ``edges`` (an MLP of width ``edge_hidden`` regressing the Sobel map of the primary's view, scaled by 1/4)
    and ``contrast`` (a projection MLP to ``projection_dim``, NT-Xent with ``temperature`` between the
    primary's view and a stronger view of the same image). ``augment=False`` turns the primary's view off (the
    contrastive task keeps its views).

    Batches: ``{"x": images, <primary>: labels}``, or (low-label data, ``FashionMNISTVisionDataModule(labelled=N)``)
    ``{"primary": that, "images": {"x": ...} or None}``: the auxiliary tasks then work on their own images. Evaluation runs on the clean images and measures the primary
    task only: ``{val,test}/primary_metric`` (accuracy), ``{val,test}/loss`` (its cross-entropy) and
    ``{val,test}/samples``, synced over DDP ranks. The learning rate follows a cosine from ``lr`` to 0 over the
    planned optimizer steps, the same for every strategy.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: Mapping[str, Mapping[str, Any]],
        primary: str,
        head_hidden: int = 0,
        edge_hidden: int = 256,
        projection_dim: int = 64,
        temperature: float = 0.5,
        augment: bool = True,
        lr: float = 2e-3,
        weight_decay: float = 5e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        if primary not in tasks or tasks[primary].get("kind") != "classification":
            raise ValueError(f"primary task {primary!r} must be a classification task among {dict(tasks)}")
        unknown = [t for t in tasks if t != primary and t not in ("edges", "contrast")]
        if unknown:
            raise ValueError(f"unknown auxiliary task(s) {unknown}; VisionMultiTaskModel has 'edges' and 'contrast'")
        if not hasattr(encoder, "out_features"):
            raise TypeError(f"the encoder {type(encoder).__name__} must expose `out_features` (its feature width)")
        width = encoder.out_features
        self.encoder = encoder
        heads = {primary: _mlp(width, head_hidden, int(tasks[primary]["out_features"]))}
        if "edges" in tasks:
            pixels = int(torch.Size(tasks["edges"]["image_shape"]).numel())
            heads["edges"] = _mlp(width, edge_hidden, pixels)
        if "contrast" in tasks:
            heads["contrast"] = _mlp(width, width, projection_dim)
        self.heads = nn.ModuleDict(heads)
        self.declare_tasks(primary=primary, heads=self.heads)
        self.primary_view = Augment(**PRIMARY_VIEW) if augment else None
        self.contrast_view = Augment(**CONTRAST_VIEW)
        classes = int(tasks[primary]["out_features"])
        self.train_metric, self.val_metric, self.test_metric = (
            Accuracy(task="multiclass", num_classes=classes) for _ in range(3)
        )
        self.val_samples, self.test_samples = SumMetric(), SumMetric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of clean images (the primary head)."""
        return self.heads[self.primary_task](self.encoder(x))

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        primary, active = self.primary_task, self.active_tasks
        # Low-label data: {"primary": labelled batch, "images": the auxiliary tasks' own images, or None}.
        labelled = batch["primary"] if "primary" in batch else batch
        x, y = labelled["x"], labelled[primary]
        n = x.shape[0]
        view = self.primary_view(x) if self.primary_view is not None else x
        aux_active = len(active) > 1
        own = batch.get("images") if "primary" in batch and aux_active else None
        inputs = [view]
        if own is not None:  # the auxiliary tasks' first view: the primary's augmentation of their own images
            aux_x = own["x"]
            inputs.append(self.primary_view(aux_x) if self.primary_view is not None else aux_x)
        else:
            aux_x = x
        contrast = "contrast" in active
        if contrast:
            inputs.append(self.contrast_view(aux_x))
        # One encoder pass for every active task; the extra views only while their tasks are active.
        h_all = self.encoder(torch.cat(inputs) if len(inputs) > 1 else view)
        h = h_all[:n]
        m = aux_x.shape[0]
        start = n if own is not None else 0  # where the auxiliary tasks' first view sits in h_all
        aux_view, h_aux = inputs[1] if own is not None else view, h_all[start : start + m]
        logits = self.heads[primary](h)
        losses = {primary: F.cross_entropy(logits.float(), y)}
        if "edges" in active:
            losses["edges"] = F.mse_loss(self.heads["edges"](h_aux).float(), edge_map(aux_view) / EDGE_SCALE)
        if contrast:
            z = self.heads["contrast"](h_all[start:])
            losses["contrast"] = nt_xent(z[:m], z[m:], self.hparams.temperature)
        self.train_metric(logits.argmax(-1), y)
        self.log("train/primary_metric", self.train_metric, on_step=False, on_epoch=True, batch_size=n)
        loss = self.mt2st_loss(losses, features=h_all)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/loss/{t}": v.detach() for t, v in losses.items()}, batch_size=n)
        if "primary" in batch and self._trainer is not None:  # what the image stream loaded so far (it stops at the switch)
            self.log_dict(stream_costs(self.trainer), batch_size=n)
        return loss

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Mapping[str, Tensor], stage: str) -> None:
        x, y = batch["x"], batch[self.primary_task]
        logits = self(x)
        n = x.shape[0]
        getattr(self, f"{stage}_metric")(logits.argmax(-1), y)
        getattr(self, f"{stage}_samples").update(n)
        getattr(self, f"{stage}_loss").update(F.cross_entropy(logits.float(), y), weight=n)
        self.log(f"{stage}/primary_metric", getattr(self, f"{stage}_metric"), on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{stage}/samples", getattr(self, f"{stage}_samples"), on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), on_step=False, on_epoch=True, batch_size=n)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp2``, ``fsdp2_cpu``): shard with FSDP2, the encoder as one
        unit and each head as its own (:func:`~mt2st_lightning.sharding.fully_shard_tasks`); otherwise
        nothing."""
        if self.device_mesh is not None:  # set by ModelParallelStrategy only
            fully_shard_tasks(self, encoder_units=(self.encoder,))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
