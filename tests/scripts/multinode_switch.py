"""One process of a simulated 2-node DDP run (`num_nodes=2, devices=1, strategy="ddp"`, gloo) across an MT2ST switch.

Launched once per node by tests/test_multinode.py, as a cluster's scheduler would launch it: each process gets its
own NODE_RANK, LOCAL_RANK=0 (so Lightning's LightningEnvironment takes the processes as created externally and
launches none), MASTER_ADDR=127.0.0.1, a shared MASTER_PORT and WORLD_SIZE=2. Writes OUT/node<NODE_RANK>.pt.
Usage: multinode_switch.py OUT SWITCH_AT
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import toy_loader, toy_model

from mt2st_lightning import MT2STCallback


class DropWatch(pl.Callback):
    """After MT2STCallback's hook (it comes first in the callback list): the active tasks at every optimizer
    step, and every parameter as it was on the first step without the auxiliary heads."""

    def __init__(self) -> None:
        self.active: dict[int, tuple[str, ...]] = {}
        self.at_drop: dict[str, torch.Tensor] | None = None
        self.backend: str | None = None

    def on_train_start(self, trainer, pl_module):
        self.backend = torch.distributed.get_backend()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active[trainer.global_step] = pl_module.active_tasks
        if self.at_drop is None and pl_module.active_tasks == (pl_module.primary_task,):
            self.at_drop = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def main() -> None:
    out, switch_at = Path(sys.argv[1]), int(sys.argv[2])
    watch = DropWatch()
    model = toy_model(seed=0)
    trainer = pl.Trainer(
        callbacks=[MT2STCallback("switch", switch_at=switch_at), watch], accelerator="cpu", devices=1, num_nodes=2,
        strategy="ddp", max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=out,
    )
    trainer.fit(model, toy_loader(n=128, batch_size=16, shuffle=True))
    torch.save(
        {
            "env": type(trainer.strategy.cluster_environment).__name__,
            "backend": watch.backend,
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "num_nodes": trainer.num_nodes,
            "global_step": trainer.global_step,
            "active": watch.active,
            "at_drop": watch.at_drop,
            "final": {n: p.detach().clone() for n, p in model.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        },
        out / f"node{trainer.node_rank}.pt",
    )


if __name__ == "__main__":
    main()
