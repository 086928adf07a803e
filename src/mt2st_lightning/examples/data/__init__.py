"""Data modules whose batches are dicts: ``x`` plus one target per task."""

from mt2st_lightning.examples.data.digits import DigitsDataModule
from mt2st_lightning.examples.data.fashion_mnist import FashionMNISTDataModule

__all__ = ["DigitsDataModule", "FashionMNISTDataModule"]
