"""MT2STMixin: declared tasks, the weighted float32 loss and its errors, dropping, checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mt2st_lightning import MT2STMixin
from tests.conftest import toy_model


def losses(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in values.items()}


def test_declared_tasks_primary_first():
    model = toy_model()
    assert model.primary_task == "label"
    assert model.tasks == ("label", "recon", "parity")
    assert model.auxiliary_tasks == ("recon", "parity")
    assert model.active_tasks == model.tasks
    assert model.task_weights == {"label": 1.0, "recon": 1.0, "parity": 1.0}


_MODEL = toy_model()


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0, 10), st.floats(0, 10), st.floats(-100, 100), st.floats(-100, 100), st.floats(-100, 100),
)
def test_loss_is_primary_plus_weighted_auxiliaries(w_recon, w_parity, l0, l1, l2):
    model = _MODEL
    model.task_weights = {"recon": w_recon, "parity": w_parity}
    total = model.mt2st_loss(losses(label=l0, recon=l1, parity=l2))
    assert total.dtype == torch.float32
    expected = torch.tensor(l0) + w_recon * torch.tensor(l1) + w_parity * torch.tensor(l2)
    torch.testing.assert_close(total, expected)


def test_half_precision_losses_are_summed_in_float32():
    model = toy_model()
    model.task_weights = {"recon": 1e-4, "parity": 1.0}
    total = model.mt2st_loss({"label": torch.tensor(1.0, dtype=torch.float16),
                              "recon": torch.tensor(1.0, dtype=torch.bfloat16),
                              "parity": torch.tensor(0.5, dtype=torch.float16)})
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(1.5001, abs=1e-6)  # the 1e-4 would vanish in a float16 sum


@pytest.mark.parametrize(
    ("given", "match"),
    [
        (dict(label=1.0, recon=1.0, parity=1.0, edges=1.0), r"unknown task\(s\) \['edges'\]"),
        (dict(recon=1.0, parity=1.0), r"no loss for the primary task \['label'\]"),
        (dict(label=1.0, recon=1.0), r"no loss for active task\(s\) \['parity'\]"),
    ],
)
def test_loss_errors(given, match):
    with pytest.raises(KeyError, match=match):
        toy_model().mt2st_loss(losses(**given))


def test_loss_for_a_dropped_task_is_an_error():
    model = toy_model()
    model.drop_task("recon")
    assert model.active_tasks == ("label", "parity")
    with pytest.raises(KeyError, match=r"dropped task\(s\) \['recon'\]"):
        model.mt2st_loss(losses(label=1.0, recon=1.0, parity=1.0))
    torch.testing.assert_close(model.mt2st_loss(losses(label=1.0, parity=2.0)), torch.tensor(3.0))


def test_drop_freezes_and_frees_gradients():
    model = toy_model()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    params = model.drop_task("parity")
    assert {id(p) for p in params} == {id(p) for p in model.heads["parity"].parameters()}
    assert all(p.grad is None and not p.requires_grad for p in params)
    assert all(p.grad is not None for p in model.heads["recon"].parameters())
    assert "parity" not in model.task_weights


def test_drop_errors():
    model = toy_model()
    with pytest.raises(ValueError, match="cannot drop the primary task"):
        model.drop_task("label")
    with pytest.raises(KeyError, match="unknown auxiliary task 'edges'"):
        model.drop_task("edges")
    with pytest.raises(ValueError, match=r"task_weights may set auxiliary tasks"):
        model.task_weights = {"label": 0.5}


def test_shared_parameters_exclude_every_head():
    model = toy_model()
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.encoder.parameters()}


def test_single_task_state_dict_leaves_out_dropped_heads():
    model = toy_model()
    model.drop_task("recon")
    keys = set(model.single_task_state_dict())
    assert not any(k.startswith("heads.recon.") for k in keys)
    assert any(k.startswith("heads.parity.") for k in keys) and any(k.startswith("encoder.") for k in keys)


def test_checkpoint_hooks_remember_dropped_tasks():
    model = toy_model()
    model.drop_task("parity")
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["mt2st"] == {"primary_task": "label", "dropped_tasks": ["parity"], "released_tasks": []}
    fresh = toy_model()
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.active_tasks == ("label", "recon")
    assert all(p.numel() > 0 for p in fresh.heads["parity"].parameters())  # dropped, not released


def test_released_task_is_released_again_on_load():
    model = toy_model()
    model.drop_task("parity", release=True)
    assert all(p.numel() == 0 and not p.requires_grad for p in model.heads["parity"].parameters())
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["mt2st"]["released_tasks"] == ["parity"]
    fresh = toy_model()
    fresh.on_load_checkpoint(checkpoint)  # Lightning calls it before loading the weights
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the empty tensors match
    assert fresh.active_tasks == ("label", "recon")
    assert all(p.numel() == 0 for p in fresh.heads["parity"].parameters())
    assert fresh.single_task_state_dict().keys() == model.single_task_state_dict().keys()
    other = {"mt2st": {"primary_task": "recon", "dropped_tasks": []}}
    with pytest.raises(ValueError, match="trained with primary task 'recon'"):
        toy_model().on_load_checkpoint(other)


class Undeclared(MT2STMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"a": nn.Linear(2, 2)})


def test_declaration_errors():
    with pytest.raises(RuntimeError, match=r"never called self.declare_tasks"):
        Undeclared().active_tasks  # noqa: B018
    module = Undeclared()
    with pytest.raises(ValueError, match="primary task 'b' has no head"):
        module.declare_tasks(primary="b", heads=module.heads)
    with pytest.raises(ValueError, match="is not a submodule"):
        module.declare_tasks(primary="a", heads={"a": module.heads["a"], "x": nn.Linear(2, 2)})

    class NotAModule(MT2STMixin):
        pass

    with pytest.raises(TypeError, match="must be mixed into a LightningModule"):
        NotAModule().declare_tasks(primary="a", heads={})
