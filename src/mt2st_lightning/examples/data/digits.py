"""scikit-learn's bundled digits: 1,797 real 8x8 handwritten digits, no download."""

from __future__ import annotations

import torch
from torch import Tensor

from mt2st_lightning.examples.data.image_tasks import ImageTasksDataModule

__all__ = ["DigitsDataModule"]


class DigitsDataModule(ImageTasksDataModule):
    """Primary task ``digit`` (10 classes); auxiliary targets from the pixels (see ``ImageTasksDataModule``)."""

    def __init__(self, label_task: str = "digit", **kwargs) -> None:
        super().__init__(label_task=label_task, **kwargs)

    def load(self) -> tuple[Tensor, Tensor, int]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return images, torch.tensor(digits.target, dtype=torch.long), 10
