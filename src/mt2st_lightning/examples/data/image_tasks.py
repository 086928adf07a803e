"""A LightningDataModule over labelled images, with auxiliary targets computed from the pixels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mt2st_lightning.examples.data.targets import AUX_TARGETS

__all__ = ["DictDataset", "ImageTasksDataModule"]


class DictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        lengths = {len(v) for v in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors must have the same length, got {lengths}")
        self.tensors = dict(tensors)
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class ImageTasksDataModule(pl.LightningDataModule):
    """Images ``x`` (N, 1, H, W) in [0, 1], a class label as the primary task ``label_task``, and the
    auxiliary targets named in ``aux_tasks`` (see ``targets.AUX_TARGETS``), each standardised with the
    training split's statistics.

    Subclasses implement :meth:`load` and return ``(images, labels, num_classes)``, with a fixed split:
    ``split_seed`` draws the validation and test sets, so every run and every seed sees the same split.

    Data order: the training batches of epoch ``e`` are a function of ``(shuffle_seed, e)`` alone (torch's
    ``DistributedSampler``, whose ``set_epoch`` Lightning calls at each epoch start, on one process as on
    many), so a run resumed from a checkpoint sees the batches the uninterrupted run saw. Lightning does not
    checkpoint a ``DataLoader(shuffle=True)``'s generator. Validation and test batches are in a fixed order and,
    under DDP, split without padding (``UnrepeatedDistributedSampler``): every sample counts exactly once.
    """

    def __init__(
        self,
        label_task: str = "label",
        aux_tasks: Sequence[str] = ("recon", "edges", "moments"),
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        unknown = [t for t in aux_tasks if t not in AUX_TARGETS]
        if unknown:
            raise ValueError(f"unknown auxiliary task(s) {unknown}; available: {list(AUX_TARGETS)}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        self.label_task = label_task
        self.aux_tasks = tuple(aux_tasks)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.shuffle_seed = shuffle_seed
        self.splits: dict[str, DictDataset] = {}
        self.num_classes: int | None = None

    def load(self) -> tuple[Tensor, Tensor, int]:
        raise NotImplementedError

    @property
    def task_specs(self) -> dict[str, dict[str, Any]]:
        """What each task predicts, in the form ``MultiTaskModel(tasks=...)`` takes."""
        images, _, num_classes = self._loaded()
        probe = images[:1]
        specs = {self.label_task: {"kind": "classification", "out_features": num_classes}}
        for t in self.aux_tasks:
            specs[t] = {"kind": "regression", "out_features": int(AUX_TARGETS[t](probe).shape[1])}
        return specs

    def _loaded(self) -> tuple[Tensor, Tensor, int]:
        if not hasattr(self, "_cache"):
            self._cache = self.load()
        return self._cache

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        images, labels, self.num_classes = self._loaded()
        n = len(images)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val, n_test = int(n * self.val_fraction), int(n * self.test_fraction)
        index = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        targets = {t: AUX_TARGETS[t](images) for t in self.aux_tasks}
        train = index["train"]
        stats = {t: (v[train].mean(0), v[train].std(0).clamp_min(1e-6)) for t, v in targets.items()}
        for split, idx in index.items():
            tensors = {"x": images[idx], self.label_task: labels[idx]}
            tensors.update({t: (v[idx] - stats[t][0]) / stats[t][1] for t, v in targets.items()})
            self.splits[split] = DictDataset(tensors)

    def _replicas(self) -> tuple[int, int]:
        """(number of processes, this process's rank): from the trainer once it is attached, else (1, 0)."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, split: str, sampler: Sampler) -> DataLoader:
        # A DistributedSampler of our own: Lightning leaves it in place instead of injecting its padding one.
        return DataLoader(
            self.splits[split], batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._replicas()
        dataset = self.splits["train"]
        return self._loader(
            "train", DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=self.shuffle_seed)
        )

    def _eval_loader(self, split: str) -> DataLoader:
        replicas, rank = self._replicas()
        dataset = self.splits[split]
        return self._loader(split, UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
