"""MT2ST under Lightning's FSDP1 (`strategy="fsdp"`, `use_orig_params=True`, each head wrapped as its own unit).

Lightning's FSDPStrategy runs on CUDA only, so these tests run where a CUDA device is present and are skipped
elsewhere (on the CPU-only CI and development machine). The settings that are refused without a GPU are tested in
tests/test_fsdp2.py."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from mt2st_lightning import MT2STCallback
from mt2st_lightning.examples.models import MLPEncoder
from tests.conftest import toy_loader, toy_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="Lightning's FSDPStrategy (FSDP1) runs on CUDA only, and no CUDA device is present",
    ),
]
SWITCH_AT = 3
AUX = ("recon", "parity")


class HeadsAtTheSwitch(pl.Callback):
    """Each head's weights just after the drop and at the end; the dropped heads' gradients and optimizer state."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == SWITCH_AT:
            self.at_switch = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        self.at_end = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        optimizer = trainer.optimizers[0]
        dropped = [p for task in AUX for p in pl_module.head_parameters(task)]
        self.dropped_grads = [p.grad for p in dropped]
        self.dropped_state = [optimizer.state.get(p) for p in dropped]
        self.dropped_trains = [p.requires_grad for p in dropped]


def fit(tmp_path, callbacks, strategy):
    trainer = pl.Trainer(
        accelerator="cuda", devices=1, strategy=strategy, callbacks=callbacks, max_steps=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    model = toy_model()
    try:
        trainer.fit(model, toy_loader())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return trainer, model


def test_fsdp1_drop_freezes_each_wrapped_head(tmp_path):
    # nn.Sequential wraps the encoder's layers and each head (Linear, ReLU, Linear) as units of their own.
    probe, callback = HeadsAtTheSwitch(), MT2STCallback("switch", switch_at=SWITCH_AT)
    _, model = fit(tmp_path, [callback, probe], FSDPStrategy(auto_wrap_policy={nn.Sequential}, use_orig_params=True))
    assert callback.drop_times == {"recon": SWITCH_AT, "parity": SWITCH_AT}
    assert model.active_tasks == ("label",)
    for name, before in probe.at_switch.items():
        changed = not torch.equal(before, probe.at_end[name])
        if name.startswith(tuple(f"heads.{t}" for t in AUX)):
            assert not changed, f"{name} changed after the drop"
        elif before.numel():
            assert changed, f"{name} stopped training"
    assert probe.dropped_grads == [None] * len(probe.dropped_grads)
    assert all(not state for state in probe.dropped_state)
    assert not any(probe.dropped_trains)


def test_fsdp1_refuses_a_head_wrapped_with_the_encoder(tmp_path):
    # Only the encoder is wrapped: the heads stay in the root unit, with whatever the root holds.
    strategy = FSDPStrategy(auto_wrap_policy={MLPEncoder}, use_orig_params=True)
    with pytest.raises(RuntimeError, match=r"cannot drop the auxiliary head '(recon|parity)': it is sharded in one FSDP"):
        fit(tmp_path, [MT2STCallback("switch", switch_at=SWITCH_AT)], strategy)
