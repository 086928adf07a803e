"""Plain DDP on 2 CPU processes (gloo): a plateau seen by one rank only switches both at the same step.

Each rank logs its own ``val/local`` (no ``sync_dist``): rank 0's keeps improving, rank 1's stops improving
after epoch 1. Run as a script (Lightning relaunches it for rank 1); each rank writes what it saw and did to
OUT/rank<r>.pt. Usage: ddp_plateau.py OUT
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import TASKS, toy_loader

from mt2st_lightning import MT2STCallback
from mt2st_lightning.examples.models import MLPEncoder, MultiTaskModel

SCORES = {0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1: [0.1, 0.3, 0.3, 0.3, 0.3, 0.3]}
PATIENCE = 2


class LocalScore(MultiTaskModel):
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        score = SCORES[self.global_rank][self.current_epoch]
        self.log("val/local", score, on_epoch=True, sync_dist=False, batch_size=batch["x"].shape[0])


def main() -> None:
    out = Path(sys.argv[1])
    callback = MT2STCallback("plateau", monitor="val/local", mode="max", patience=PATIENCE)
    pl.seed_everything(0)
    model = LocalScore(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)
    trainer = pl.Trainer(
        callbacks=[callback],
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=out,
    )
    trainer.fit(model, toy_loader(n=128, batch_size=16, shuffle=True), toy_loader(n=32, batch_size=16))
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "drop_times": callback.drop_times,
            "decided_at": callback.policy.decided_at,
            "wait_count": callback.policy.wait_count,
            "active": model.active_tasks,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
