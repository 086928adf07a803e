"""``drop_heads``: the one function that carries out a drop, usable outside MT2STCallback."""

from __future__ import annotations

import logging

import pytest
import torch

from mt2st_lightning import MT2STCallback, drop_heads
from tests.conftest import toy_loader, toy_model, toy_trainer


@pytest.fixture
def trained(tmp_path):
    model = toy_model()
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl")], max_steps=2, max_epochs=None)
    trainer.fit(model, toy_loader())
    return trainer, model


def test_drop_heads_freezes_frees_and_announces(trained, caplog):
    trainer, model = trained
    optimizer = trainer.optimizers[0]
    recon = list(model.heads["recon"].parameters())
    assert all(p in optimizer.state for p in recon) and all(p.grad is not None for p in recon)
    caplog.set_level(logging.INFO, logger="mt2st_lightning")
    logging.getLogger("mt2st_lightning").propagate = True
    try:
        assert drop_heads(trainer, model, ["recon"]) == ["recon"]
    finally:
        logging.getLogger("mt2st_lightning").propagate = False
    assert model.active_tasks == ("label", "parity")
    assert all(not p.requires_grad and p.grad is None and p not in optimizer.state for p in recon)
    assert all(p.numel() > 0 for p in recon)  # kept, frozen: release=False
    assert any("['recon'] left the computation; active tasks: ['label', 'parity']" in m for m in caplog.messages)
    assert drop_heads(trainer, model, ["recon"]) == []  # already dropped: nothing to do


def test_drop_heads_releases_a_head_dropped_before(trained):
    trainer, model = trained
    drop_heads(trainer, model, ["recon", "parity"])
    assert drop_heads(trainer, model, ["recon"], release=True) == ["recon"]
    assert all(p.numel() == 0 for p in model.heads["recon"].parameters())
    assert model.released_tasks == frozenset({"recon"})
    assert all(p.numel() > 0 for p in model.heads["parity"].parameters())


def test_drop_heads_refuses_the_primary(trained):
    trainer, model = trained
    with pytest.raises(ValueError, match="cannot drop the primary task 'label'"):
        drop_heads(trainer, model, ["label"])
    assert torch.is_grad_enabled()
