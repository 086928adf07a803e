"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (70,000 28x28 images, no download)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mt2st_lightning.examples.data.image_tasks import ImageTasksDataModule

__all__ = ["FashionMNISTDataModule", "read_fashion_mnist"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found under {root}. Install the data with "
        "`sudo apt-get install dataset-fashion-mnist`, or pass root= pointing at the IDX files."
    )


def read_fashion_mnist(root: str | Path = DEFAULT_ROOT, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The official ``split`` (``"train"``: 60,000 images, ``"test"``: 10,000) as uint8 images (N, 28, 28) and
    int64 labels (N,); a missing file is an error naming the install command."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {list(_FILES)}, got {split!r}")
    image_file, label_file = _FILES[split]
    return _read_idx(_find(Path(root), image_file)), _read_idx(_find(Path(root), label_file)).astype(np.int64)


class FashionMNISTDataModule(ImageTasksDataModule):
    """Primary task ``item`` (10 clothing classes); ``limit`` keeps the first N images (all 70,000 by default)."""

    def __init__(self, root: str = DEFAULT_ROOT, label_task: str = "item", limit: int | None = None, **kwargs) -> None:
        super().__init__(label_task=label_task, **kwargs)
        self.root = Path(root)
        self.limit = limit

    def load(self) -> tuple[Tensor, Tensor, int]:
        images, labels = [], []
        for image_file, label_file in _FILES.values():
            images.append(_read_idx(_find(self.root, image_file)))
            labels.append(_read_idx(_find(self.root, label_file)))
        x = torch.from_numpy(np.concatenate(images)[: self.limit].copy()).float().unsqueeze(1) / 255.0
        y = torch.from_numpy(np.concatenate(labels)[: self.limit].astype(np.int64))
        return x, y, 10
