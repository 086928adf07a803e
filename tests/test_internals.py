"""One test per private Lightning/PyTorch internal that ``mt2st_lightning.heads`` wraps: each fails when the
internal changes, so that an upgrade breaks here, by name, rather than somewhere in training."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from mt2st_lightning import MT2STCallback, heads
from tests.conftest import toy_loader, toy_model, toy_trainer


class Probe(pl.Callback):
    """Reads the two logging internals at each training batch's start, as MT2STCallback does."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, heads.is_logging_step(trainer), heads.logging_step(trainer)))


def test_is_logging_step_follows_log_every_n_steps(tmp_path):
    # trainer._logger_connector.should_update_logs
    probe = Probe()
    toy_trainer(tmp_path, [probe, MT2STCallback("mtl")], max_epochs=2, log_every_n_steps=4).fit(toy_model(), toy_loader())
    assert [step for step, logging, _ in probe.rows if logging] == [3, 7, 11]
    probe = Probe()
    toy_trainer(tmp_path, [probe], max_steps=3, max_epochs=None, log_every_n_steps=0).fit(toy_model(), toy_loader())
    assert not any(logging for _, logging, _ in probe.rows)


def test_logging_step_is_the_step_lightning_logs_at(tmp_path):
    # trainer.fit_loop.epoch_loop._batches_that_stepped: equals the optimizer steps taken, across epochs
    probe = Probe()
    toy_trainer(tmp_path, [probe], max_epochs=2, accumulate_grad_batches=2).fit(toy_model(), toy_loader())
    assert all(step == logged for step, _, logged in probe.rows)
    assert probe.rows[-1][0] == 5


def test_ddp_remove_autograd_hooks_exists_and_takes_no_arguments():
    # DistributedDataParallel._remove_autograd_hooks, called on the old wrapper before the reducer rebuild
    method = getattr(DistributedDataParallel, "_remove_autograd_hooks", None)
    assert callable(method)
    assert list(inspect.signature(method).parameters) == ["self"]


def test_ddp_comm_hook_reads_the_registered_hook():
    # DDPStrategy._ddp_comm_hook
    def hook(state, bucket):
        return bucket.buffer()

    assert heads.ddp_comm_hook(DDPStrategy(ddp_comm_hook=hook)) is hook
    assert heads.ddp_comm_hook(DDPStrategy()) is None


@pytest.mark.parametrize(("strategy", "relaunches"), [("ddp", True), ("ddp_spawn", False)])
def test_relaunches_script_recognises_the_subprocess_launcher(strategy, relaunches):
    # lightning.pytorch.strategies.launchers._SubprocessScriptLauncher
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert heads.relaunches_script(trainer.strategy) is relaunches


def test_sharded_ddp_subclasses_are_recognised_by_name():
    # DeepSpeedStrategy subclasses DDPStrategy: check_can_drop tells it apart by its class name
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert issubclass(DeepSpeedStrategy, DDPStrategy)
    with pytest.raises(RuntimeError, match="DeepSpeedStrategy is not supported"):
        heads.check_can_drop(DeepSpeedStrategy.__new__(DeepSpeedStrategy))


def test_rebuild_leaves_a_plain_module_alone():
    # strategy.model / strategy.configure_ddp(): only a DDP wrapper is rebuilt (tests/test_ddp.py rebuilds one)
    strategy = DDPStrategy()
    strategy.model = torch.nn.Linear(2, 2)
    assert heads.rebuild_ddp_reducer(strategy) is False
