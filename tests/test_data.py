"""Data modules: Fashion-MNIST's IDX reader on files written here, and the error that names the install command."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from mt2st_lightning.examples.data import DigitsDataModule, FashionMNISTDataModule


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.fixture
def fashion_root(tmp_path):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (14, 28, 28)), rng.integers(0, 256, (6, 28, 28))
    train_y, test_y = np.arange(14) % 10, (np.arange(6) + 3) % 10
    # Debian ships the files gzipped; plain IDX files are read as well.
    _write_idx(tmp_path / "train-images-idx3-ubyte", train_x, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", train_y, compress=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, compress=False)
    return tmp_path, np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])


def test_fashion_mnist_reads_idx_files(fashion_root):
    root, images, labels = fashion_root
    x, y, num_classes = FashionMNISTDataModule(root=str(root)).load()
    assert num_classes == 10 and x.shape == (20, 1, 28, 28) and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255.0)
    assert y.tolist() == labels.tolist()
    assert FashionMNISTDataModule(root=str(root), limit=5).load()[0].shape[0] == 5


def test_fashion_mnist_splits_and_tasks(fashion_root):
    root, _, _ = fashion_root
    dm = FashionMNISTDataModule(root=str(root), batch_size=4)
    dm.setup("fit")
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 20
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", *dm.task_specs}
    assert dm.task_specs["item"] == {"kind": "classification", "out_features": 10}


def test_missing_fashion_mnist_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sudo apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path / "nowhere")).load()


# ---------------------------------------------------------------------------------------------- data order


def _order(dm, epoch: int) -> list[int]:
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(epoch)  # what Lightning's fit loop calls at each epoch start
    return list(sampler)


def test_the_training_order_is_a_function_of_seed_and_epoch():
    # A fresh data module (as in a resumed process) draws the same batches for the same (seed, epoch).
    first, again = DigitsDataModule(shuffle_seed=3), DigitsDataModule(shuffle_seed=3)
    first.setup("fit"), again.setup("fit")
    _order(first, 0)  # iterating earlier epochs changes nothing
    assert _order(first, 2) == _order(again, 2)
    assert _order(first, 2) != _order(first, 1)
    other = DigitsDataModule(shuffle_seed=4)
    other.setup("fit")
    assert _order(other, 2) != _order(first, 2)
    assert sorted(_order(first, 0)) == list(range(len(first.splits["train"])))


def test_evaluation_splits_across_processes_without_padding():
    dm = DigitsDataModule()
    dm.setup("fit")
    seen = []
    for rank in (0, 1):
        dm.trainer = type("T", (), {"world_size": 2, "global_rank": rank})()  # what a DDP trainer reports
        seen += list(dm.val_dataloader().sampler)
    assert len(dm.splits["val"]) % 2 == 1  # an odd split: a padding sampler would repeat one sample
    assert sorted(seen) == list(range(len(dm.splits["val"])))
