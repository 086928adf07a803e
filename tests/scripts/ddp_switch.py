"""Trains the toy model with plain `strategy="ddp"` on 2 CPU processes (gloo) across an MT2ST drop.

Run as a script: Lightning relaunches it for rank 1. Each rank writes its final parameters, the weights in force
at every micro-batch and the callback's view to OUT/rank<r>.pt.
Usage: ddp_switch.py OUT STRATEGY [KEY=VALUE ...] [--no-rebuild] [--rank1-plans-longer] [--nan-on-rank1-at=STEP]
(--no-rebuild disables the DDP reducer rebuild, to show that plain DDP fails without it; --rank1-plans-longer
makes rank 1 compute a longer run while the callback plans; --nan-on-rank1-at makes one loss NaN on rank 1 only).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mt2st_lightning import MT2STCallback  # noqa: E402
from tests.conftest import toy_loader, toy_model  # noqa: E402


def _value(text: str) -> bool | int | float | str:
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


class WeightsHistory(pl.Callback):
    """The auxiliary weights in force at every micro-batch: they must be the same on every rank."""

    def __init__(self):
        self.rows = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.rows.append((trainer.global_step, dict(pl_module.task_weights)))


class Rank1PlansLonger(pl.Callback):
    """Makes rank 1 compute a longer plan than rank 0 (5 epochs instead of 3) while MT2STCallback plans the
    run, then restores the real length: rank 0's plan must win."""

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == 1:
            self.real, trainer.fit_loop.max_epochs = trainer.fit_loop.max_epochs, 5

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            trainer.fit_loop.max_epochs = self.real


class DDPWrappers(pl.Callback):
    """The DDP wrapper at the start and at the end of training (before teardown unwraps the module): after a
    drop it must be a new one, whose reducer holds only the parameters that still train."""

    def on_train_start(self, trainer, pl_module):
        self.at_start = trainer.strategy.model

    def on_train_end(self, trainer, pl_module):
        self.at_end = trainer.strategy.model


def nan_on_rank1_model(step: int):
    """The toy model, whose `parity` loss is NaN at `step` on rank 1 only."""
    base = type(toy_model(seed=0))

    class NaNOnRank1(base):
        def task_loss(self, task, output, target):
            loss = super().task_loss(task, output, target)
            if task == "parity" and self.trainer.global_rank == 1 and self.trainer.global_step == step:
                loss = loss * float("nan")
            return loss

    from mt2st_lightning.examples.models import MLPEncoder
    from tests.conftest import TASKS

    pl.seed_everything(0)
    return NaNOnRank1(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)


def main() -> None:
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--no-rebuild" in flags:
        import mt2st_lightning.heads

        mt2st_lightning.heads.rebuild_ddp_reducer = lambda strategy: False
    out, strategy = Path(args[0]), args[1]
    kwargs = {k: _value(v) for k, v in (a.split("=") for a in args[2:])}
    callback = MT2STCallback(strategy, **kwargs)
    wrappers, history = DDPWrappers(), WeightsHistory()
    nan_step = next((int(f.split("=")[1]) for f in flags if f.startswith("--nan-on-rank1-at=")), None)
    model = toy_model(seed=0) if nan_step is None else nan_on_rank1_model(nan_step)
    extra = [Rank1PlansLonger()] if "--rank1-plans-longer" in flags else []
    trainer = pl.Trainer(
        callbacks=[*extra, callback, wrappers, history], accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False, enable_checkpointing=False,
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
            "weights_history": history.rows,
            "total": callback.total,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
