"""Fashion-MNIST for the paper's vision setting (Table 2): official train/test split, a held-out validation
part of the training images, and the auxiliary tasks the model computes from each batch's images.

The auxiliary tasks need no stored targets: ``edges`` regresses the Sobel map of the image the model sees and
``contrast`` pulls two augmented views of an image together (NT-Xent). Both are computed in the model, and only
while their head is active, so a dropped task costs nothing, data included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from mt2st_lightning.examples.data.fashion_mnist import DEFAULT_ROOT, read_fashion_mnist
from mt2st_lightning.examples.data.image_tasks import DictDataset, ImageTasksDataModule
from mt2st_lightning.examples.data.streams import AuxiliaryStream, combine_streams

__all__ = ["VISION_AUX_TASKS", "FashionMNISTVisionDataModule"]

#: Auxiliary tasks of the vision setting and what each predicts (for the model's heads).
VISION_AUX_TASKS = ("edges", "contrast")


class FashionMNISTVisionDataModule(ImageTasksDataModule):
    """Primary task ``item`` (10 classes); auxiliary tasks ``edges`` and ``contrast`` (see the module's docstring).

    Splits: ``test`` is the official 10,000-image test set; ``val_size`` images drawn (with ``split_seed``) from
    the 60,000 training images are the validation set; the rest, or the first ``train_limit`` of them, train.
    Batches are ``{"x": (B, 1, 28, 28) float in [0, 1], "item": (B,) int64}``.

    Low-label variant, ``labelled=N``: the primary task trains on the first N training images only (a random,
    fixed subset), while the auxiliary tasks draw batches from all the training images through an
    ``AuxiliaryStream`` named ``images`` (``data/streams.py``): training batches are then
    ``{"primary": <labelled batch>, "images": <image batch, or None once every auxiliary task is dropped>}``, an
    epoch is one pass over the N labelled images, and a dropped task's images stop being loaded.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        label_task: str = "item",
        aux_tasks: Sequence[str] = VISION_AUX_TASKS,
        val_size: int = 5000,
        train_limit: int | None = None,
        labelled: int | None = None,
        batch_size: int = 128,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        # The parent's pixel targets are not used: the auxiliary tasks here are computed by the model.
        super().__init__(
            label_task=label_task, aux_tasks=(), batch_size=batch_size, split_seed=split_seed,
            num_workers=num_workers, shuffle_seed=shuffle_seed,
        )
        unknown = [t for t in aux_tasks if t not in VISION_AUX_TASKS]
        if unknown:
            raise ValueError(f"unknown auxiliary task(s) {unknown}; the vision setting has {list(VISION_AUX_TASKS)}")
        if not 0 < val_size < 60000:
            raise ValueError(f"val_size must be in (0, 60000), got {val_size}")
        if train_limit is not None and train_limit < 1:
            raise ValueError(f"train_limit must be a positive number of images or null, got {train_limit}")
        if labelled is not None and labelled < 1:
            raise ValueError(f"labelled must be a positive number of images or null (all labelled), got {labelled}")
        self.root = root
        self.labelled = labelled
        self.vision_aux_tasks = tuple(aux_tasks)
        self.val_size = val_size
        self.train_limit = train_limit

    @property
    def task_specs(self) -> dict[str, dict[str, Any]]:
        specs: dict[str, dict[str, Any]] = {self.label_task: {"kind": "classification", "out_features": 10}}
        for task in self.vision_aux_tasks:
            specs[task] = {"kind": task, "image_shape": [1, 28, 28]}
        return specs

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_images, train_labels = read_fashion_mnist(self.root, "train")
        test_images, test_labels = read_fashion_mnist(self.root, "test")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(self.split_seed))
        val, train = order[: self.val_size], order[self.val_size :][: self.train_limit]
        if self.labelled is not None and self.labelled > len(train):
            raise ValueError(f"labelled={self.labelled} exceeds the {len(train)} training images")
        self.num_classes = 10
        self.splits = {
            "train": self._dataset(train_images, train_labels, train[: self.labelled]),
            "images": self._dataset(train_images, train_labels, train),
            "val": self._dataset(train_images, train_labels, val),
            "test": self._dataset(test_images, test_labels, None),
        }

    def _dataset(self, images: Any, labels: Any, index: Tensor | None) -> DictDataset:
        x, y = torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
        if index is not None:
            x, y = x[index], y[index]
        return DictDataset({"x": x.float().unsqueeze(1) / 255.0, self.label_task: y})

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        primary = super().train_dataloader()
        if self.labelled is None:
            return primary
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("the low-label training loader needs the trainer (its active tasks and epoch): fit first")
        replicas, rank = self._replicas()
        images = AuxiliaryStream(
            self.splits["images"], tasks=self.vision_aux_tasks, batch_size=self.batch_size,
            active_tasks=lambda: trainer.lightning_module.active_tasks, epoch=lambda: trainer.current_epoch,
            seed=self.shuffle_seed, num_replicas=replicas, rank=rank, num_workers=self.num_workers,
        )
        return combine_streams(primary, {"images": images})
