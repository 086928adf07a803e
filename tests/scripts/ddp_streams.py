"""2 CPU processes under plain DDP: a primary loader and an AuxiliaryStream through a switch. Each rank writes
what its stream loaded and when (tests/test_streams.py reads it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mt2st_lightning import MT2STCallback, MT2STMixin
from mt2st_lightning.examples.data.streams import AuxiliaryStream, combine_streams


class Model(MT2STMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 4)
        self.heads = nn.ModuleDict({"y": nn.Linear(4, 1), "aux": nn.Linear(4, 1)})
        self.declare_tasks(primary="y", heads=self.heads)
        self.loaded: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch["primary"]
        losses = {"y": nn.functional.mse_loss(self.heads["y"](self.encoder(x)).squeeze(1), y)}
        if batch["aux"] is not None:
            self.loaded.append((self.global_step, batch["aux"][1].tolist()))
        if "aux" in self.active_tasks:
            u, _ = batch["aux"]
            losses["aux"] = self.heads["aux"](self.encoder(u)).pow(2).mean()
        return self.mt2st_loss(losses)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        t = self.trainer
        primary = TensorDataset(torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.randn(64))
        sampler = DistributedSampler(primary, num_replicas=t.world_size, rank=t.global_rank, shuffle=True, seed=0)
        stream = AuxiliaryStream(
            TensorDataset(torch.randn(12, 2), torch.arange(12)), ("aux",), 3,
            active_tasks=lambda: t.lightning_module.active_tasks, epoch=lambda: t.current_epoch,
            num_replicas=t.world_size, rank=t.global_rank,
        )
        return combine_streams(DataLoader(primary, batch_size=4, sampler=sampler), {"aux": stream})


if __name__ == "__main__":
    out = Path(sys.argv[1])
    model = Model()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[MT2STCallback("switch", switch_at=5)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, datamodule=Data())
    stream = trainer.train_dataloader["aux"]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "steps": trainer.global_step, "loaded": model.loaded, "batches_loaded": stream.batches_loaded,
        "skipped": stream.skipped, "drop_times": trainer.callbacks[0].drop_times,
        "params": [p.detach().flatten().tolist() for p in model.encoder.parameters()],
    }))
