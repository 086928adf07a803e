"""``DiffusionDataModule``: any labelled-image data module (digits, Fashion-MNIST) seen as the paper's diffusion
setting (Table 4): the primary task is noise prediction, the auxiliary tasks reconstruct the clean image and
predict its class from the denoiser's features.

The targets need no storage: the model draws the noise and the timestep of each image itself, and reads the
clean image and its label from the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader

from mt2st_lightning.examples.data.image_tasks import ImageTasksDataModule

__all__ = ["DIFFUSION_AUX_TASKS", "DiffusionDataModule"]

DIFFUSION_AUX_TASKS = ("recon", "class")


class DiffusionDataModule(pl.LightningDataModule):
    """Wraps ``images`` (an ``ImageTasksDataModule``, e.g. ``DigitsDataModule(aux_tasks=[])``): its splits,
    loaders and data order, with the tasks of a denoising model.

    Batches are the wrapped module's: ``{"x": (B, C, H, W) in [0, 1], <images.label_task>: (B,) int64}``.
    ``task_specs``: ``noise`` (the primary task; ``image_shape``, and the batch key of the class ``labels``), ``recon`` (``image_shape``) and ``class``
    (``out_features`` classes, read from the batch key ``target``).
    """

    def __init__(self, images: ImageTasksDataModule, aux_tasks: Sequence[str] = DIFFUSION_AUX_TASKS) -> None:
        super().__init__()
        if not isinstance(images, ImageTasksDataModule):
            raise TypeError(f"images must be an ImageTasksDataModule (digits, fashion_mnist), got {type(images).__name__}")
        if images.aux_tasks:
            raise ValueError(
                f"images.aux_tasks={list(images.aux_tasks)}: the diffusion tasks need no pixel targets; set "
                "images.aux_tasks=[] (the model computes its own targets)"
            )
        unknown = [t for t in aux_tasks if t not in DIFFUSION_AUX_TASKS]
        if unknown:
            raise ValueError(f"unknown auxiliary task(s) {unknown}; the diffusion setting has {list(DIFFUSION_AUX_TASKS)}")
        self.images = images
        self.aux_tasks = tuple(aux_tasks)

    @property
    def task_specs(self) -> dict[str, dict[str, Any]]:
        self.images.setup()
        shape = list(self.images.splits["train"].tensors["x"].shape[1:])
        specs: dict[str, dict[str, Any]] = {
            "noise": {"kind": "denoising", "image_shape": shape, "labels": self.images.label_task}
        }
        if "recon" in self.aux_tasks:
            specs["recon"] = {"kind": "reconstruction", "image_shape": shape}
        if "class" in self.aux_tasks:
            specs["class"] = {
                "kind": "classification", "out_features": int(self.images.num_classes), "target": self.images.label_task
            }
        return specs

    def train_images(self) -> tuple[Tensor, Tensor]:
        """The training split's images and labels (what the Fréchet distance's feature classifier learns from)."""
        self.images.setup()
        train = self.images.splits["train"].tensors
        return train["x"], train[self.images.label_task]

    def setup(self, stage: str | None = None) -> None:
        self.images.trainer = self.trainer  # the wrapped module shards its loaders by the trainer's ranks
        self.images.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.images.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.images.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.images.test_dataloader()
