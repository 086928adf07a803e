"""Resuming from a checkpoint, before or after the switch, reproduces the uninterrupted run step for step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from mt2st_lightning import MT2STCallback
from tests.conftest import StepRecorder, toy_loader, toy_model, toy_trainer

CALLBACKS = {
    "switch": dict(strategy="switch", switch_at=0.4),  # 24 steps planned: the heads leave at step 10
    "diminish": dict(strategy="diminish", eta=0.25, prune_below=0.1),  # pruned at step 10
    "gradnorm": dict(strategy="gradnorm", switch_at=0.4, adapt_every=3),  # adaptive factors are state too
    # the checkpoint after the switch stores the heads as empty tensors
    "switch-released": dict(strategy="switch", switch_at=0.4, release_heads=True),
}


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def run(tmp_path, name, stop_after=None, resume=None):
    recorder = StepRecorder()
    callbacks = [MT2STCallback(**CALLBACKS[name]), recorder, ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    if stop_after is not None:
        callbacks.append(StopAfterEpoch(stop_after))
    model = toy_model(seed=0)
    trainer = toy_trainer(tmp_path, callbacks, max_epochs=4, enable_checkpointing=True)
    trainer.fit(model, toy_loader(), ckpt_path=resume)
    return recorder.rows, model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CALLBACKS))
@pytest.mark.parametrize("stop_after", [0, 2], ids=["before-switch", "after-switch"])
def test_resume_reproduces_uninterrupted_run(tmp_path, name, stop_after):
    full_rows, full_model = run(tmp_path / "full", name)
    assert any(len(r["active"]) == 1 for r in full_rows), "the run must cross the switch"

    first_rows, _ = run(tmp_path / "part", name, stop_after=stop_after)
    resumed_rows, resumed_model = run(tmp_path / "resumed", name, resume=tmp_path / "part" / "last.ckpt")

    rows = first_rows + resumed_rows
    assert [r["step"] for r in rows] == [r["step"] for r in full_rows]
    for got, want in zip(rows, full_rows):
        assert got["active"] == want["active"], f"step {want['step']}"
        assert got["weights"] == pytest.approx(want["weights"], rel=1e-6), f"step {want['step']}"
        torch.testing.assert_close(got["total"], want["total"], msg=f"step {want['step']}")
    for (name, p), (_, q) in zip(resumed_model.named_parameters(), full_model.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert resumed_model.dropped_tasks == full_model.dropped_tasks


def _checkpoint_after_switch(tmp_path, **callback):
    model = toy_model(seed=0)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, save_last=True, filename="{epoch}")
    trainer = toy_trainer(tmp_path, [MT2STCallback(**callback), every_epoch], max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, toy_loader())
    return trainer, model


def test_resuming_with_another_strategy_fails(tmp_path):
    _checkpoint_after_switch(tmp_path, strategy="switch", switch_at=3)
    trainer = toy_trainer(tmp_path / "resumed", [MT2STCallback("mtl")], max_epochs=3, enable_checkpointing=True)
    with pytest.raises(ValueError, match="checkpoint holds MT2ST state for strategy='switch'"):
        trainer.fit(toy_model(), toy_loader(), ckpt_path=tmp_path / "last.ckpt")


def test_resuming_with_a_later_switch_point_fails(tmp_path):
    _checkpoint_after_switch(tmp_path, strategy="switch", switch_at=3)
    trainer = toy_trainer(tmp_path / "resumed", [MT2STCallback("switch", switch_at=9)], max_epochs=2)
    with pytest.raises(ValueError, match=r"\['parity', 'recon'\] were dropped .* does not finish them at step 6"):
        trainer.fit(toy_model(), toy_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")


def test_released_heads_load_a_checkpoint_from_before_the_switch(tmp_path):
    # e.g. trainer.test(ckpt_path="best") when the best epoch came before the switch
    trainer, model = _checkpoint_after_switch(tmp_path, strategy="switch", switch_at=8, release_heads=True)
    assert all(p.numel() == 0 for p in model.heads["recon"].parameters())
    before_switch = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    trainer.validate(model, toy_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert model.active_tasks == ("label", "recon", "parity")  # as the checkpoint was saved
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before_switch["state_dict"][name], msg=name)
    # ...and the last checkpoint, after the switch, releases them again.
    trainer.validate(model, toy_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert model.active_tasks == ("label",) and all(p.numel() == 0 for p in model.heads["recon"].parameters())


class OnlyTrainable(type(toy_model())):
    """The common idiom: the optimizer gets only the parameters that require gradients."""

    def configure_optimizers(self):
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3)


def _only_trainable():
    pl.seed_everything(0)
    from mt2st_lightning.examples.models import MLPEncoder
    from tests.conftest import TASKS

    return OnlyTrainable(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)


@pytest.mark.slow
def test_resume_after_the_switch_with_an_optimizer_of_trainable_parameters_only(tmp_path):
    def run(root, stop_after=None, resume=None):
        callbacks = [MT2STCallback("switch", switch_at=3), ModelCheckpoint(dirpath=root, save_last=True)]
        if stop_after is not None:
            callbacks.append(StopAfterEpoch(stop_after))
        model = _only_trainable()
        toy_trainer(root, callbacks, max_epochs=3, enable_checkpointing=True).fit(model, toy_loader(), ckpt_path=resume)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop_after=0)  # 6 steps: after the switch at 3
    resumed = run(tmp_path / "resumed", resume=tmp_path / "part" / "last.ckpt")
    assert resumed.active_tasks == ("label",)
    assert not any(p.requires_grad for t in ("recon", "parity") for p in resumed.heads[t].parameters())
    for (name, p), (_, q) in zip(resumed.named_parameters(), full.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_release_heads_takes_effect_when_resuming_a_checkpoint_saved_without_it(tmp_path):
    _checkpoint_after_switch(tmp_path, strategy="switch", switch_at=3)  # kept heads
    model = toy_model(seed=0)
    callback = MT2STCallback("switch", switch_at=3, release_heads=True)
    toy_trainer(tmp_path / "resumed", [callback], max_epochs=3).fit(model, toy_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert model.released_tasks == frozenset({"recon", "parity"})
    assert all(p.numel() == 0 for t in ("recon", "parity") for p in model.heads[t].parameters())


def test_testing_a_checkpoint_from_before_the_switch_keeps_the_users_frozen_parameters(tmp_path):
    model = toy_model(seed=0)
    frozen = model.heads["recon"][0].bias
    frozen.requires_grad_(False)  # the user froze it; the switch must not decide otherwise
    every_epoch = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer = toy_trainer(tmp_path, [MT2STCallback("switch", switch_at=8), every_epoch], max_epochs=2,
                          enable_checkpointing=True)
    trainer.fit(model, toy_loader())
    assert model.dropped_tasks == frozenset({"recon", "parity"})
    trainer.validate(model, toy_loader(), ckpt_path=tmp_path / "epoch=0.ckpt")  # saved before the switch
    assert model.active_tasks == ("label", "recon", "parity")
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.heads["recon"].parameters() if p is not frozen)


class RestoresAfterSetup(SingleDeviceStrategy):
    """A strategy that restores the checkpoint after setup (after the optimizers are built and the model is
    wrapped), as ModelParallelStrategy and FSDP do: the callback's state then arrives after on_fit_start."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("release", [False, True], ids=["kept", "released"])
@pytest.mark.parametrize("after_setup", [False, True], ids=["restored-before-setup", "restored-after-setup"])
@pytest.mark.parametrize("same_module", [False, True], ids=["fresh-module", "same-module"])
def test_resume_after_the_switch_whatever_the_restore_order(tmp_path, release, after_setup, same_module):
    # A `filter(requires_grad)` optimizer, resumed after the switch: into a fresh module, or into the module that
    # saved the checkpoint (its heads frozen by the drop when the optimizer is built), with the checkpoint
    # restored before setup (DDP, single device) or after it (as ModelParallelStrategy and FSDP restore).
    def run(root, stop_after=None, resume=None, model=None):
        callbacks = [
            MT2STCallback("switch", switch_at=3, release_heads=release),
            ModelCheckpoint(dirpath=root, save_last=True),
        ]
        if stop_after is not None:
            callbacks.append(StopAfterEpoch(stop_after))
        model = model or _only_trainable()
        strategy = RestoresAfterSetup(device=torch.device("cpu")) if after_setup and resume else "auto"
        trainer = toy_trainer(root, callbacks, max_epochs=3, enable_checkpointing=True, strategy=strategy)
        trainer.fit(model, toy_loader(), ckpt_path=resume)
        return model, callbacks[0]

    full, _ = run(tmp_path / "full")
    part, _ = run(tmp_path / "part", stop_after=0)  # 6 steps: after the switch at 3
    assert part.dropped_tasks == frozenset({"recon", "parity"})
    resumed, callback = run(tmp_path / "resumed", resume=tmp_path / "part" / "last.ckpt", model=part if same_module else None)
    assert callback.drop_times == {"recon": 3, "parity": 3}
    assert resumed.active_tasks == ("label",)
    assert not any(p.requires_grad for t in ("recon", "parity") for p in resumed.heads[t].parameters())
    assert resumed.released_tasks == (frozenset({"recon", "parity"}) if release else frozenset())
    for (name, p), (_, q) in zip(resumed.named_parameters(), full.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_the_callback_saves_its_drops_and_the_optimizers_layout(tmp_path):
    trainer, model = _checkpoint_after_switch(tmp_path, strategy="switch", switch_at=3, release_heads=True)
    state = next(s for k, s in torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"].items()
                 if "MT2STCallback" in k)
    assert state["drop_times"] == {"recon": 3, "parity": 3}
    assert state["released"] == ["parity", "recon"]
    (groups,) = state["optimizer_layout"]  # one optimizer: its groups' parameter names, dropped heads included
    assert [name for group in groups for name in group] == [name for name, _ in model.named_parameters()]
    assert "release_heads" not in state and "stats" not in state
