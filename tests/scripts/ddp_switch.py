"""Trains the toy model with plain `strategy="ddp"` on 2 CPU processes (gloo) across an MT2ST drop.

Run as a script: Lightning relaunches it for rank 1. Each rank writes its final parameters and the
callback's view to OUT/rank<r>.pt. Usage: ddp_switch.py OUT STRATEGY [KEY=VALUE ...] [--no-rebuild]
(--no-rebuild disables the DDP reducer rebuild, to show that plain DDP fails without it).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mt2st_lightning import MT2STCallback  # noqa: E402
from tests.conftest import toy_loader, toy_model  # noqa: E402


def _value(text: str) -> bool | int | float:
    if text in ("true", "false"):
        return text == "true"
    return float(text) if "." in text else int(text)


class DDPWrappers(pl.Callback):
    """The DDP wrapper at the start and at the end of training (before teardown unwraps the module): after a
    drop it must be a new one, whose reducer holds only the parameters that still train."""

    def on_train_start(self, trainer, pl_module):
        self.at_start = trainer.strategy.model

    def on_train_end(self, trainer, pl_module):
        self.at_end = trainer.strategy.model


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--no-rebuild"]
    if "--no-rebuild" in sys.argv:
        import mt2st_lightning.heads

        mt2st_lightning.heads.rebuild_ddp_reducer = lambda strategy: False
    out, strategy = Path(args[0]), args[1]
    kwargs = {k: _value(v) for k, v in (a.split("=") for a in args[2:])}
    callback = MT2STCallback(strategy, **kwargs)
    wrappers = DDPWrappers()
    model = toy_model(seed=0)
    trainer = pl.Trainer(
        callbacks=[callback, wrappers], accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=out,
    )
    trainer.fit(model, toy_loader(n=128, batch_size=16, shuffle=True))
    reducer_params = sum(1 for p in wrappers.at_end.parameters() if p.requires_grad)
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "drop_times": callback.drop_times,
            "active": model.active_tasks,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "trainable": reducer_params,
            "rebuilt": wrappers.at_end is not wrappers.at_start,
            "ddp": isinstance(wrappers.at_end, torch.nn.parallel.DistributedDataParallel),
            "weights": model.task_weights,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
