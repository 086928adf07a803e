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


def test_a_released_head_refuses_to_run_with_a_clear_error():
    model = toy_model()
    model.drop_task("parity", release=True)
    with pytest.raises(RuntimeError, match=r"the head of task 'parity' was released .*release_heads=False"):
        model(torch.randn(2, 16), tasks=model.tasks)
    assert set(model(torch.randn(2, 16))) == {"label", "recon"}
    # A checkpoint from before the drop: the head gets storage again, and runs.
    before = toy_model().state_dict()
    model.on_load_checkpoint({"mt2st": {"primary_task": "label", "dropped_tasks": []}, "state_dict": before})
    assert set(model(torch.randn(2, 16), tasks=model.tasks)) == set(model.tasks)


def test_drops_tracked_in_the_state_dict_load_strictly_either_way():
    # FSDP2 runs carry the drops in `mt2st_drops._extra_state` (MT2STCallback calls track_drops_in_state_dict).
    tracked = toy_model()
    tracked.track_drops_in_state_dict()
    tracked.drop_task("recon")
    state = tracked.state_dict()
    assert "mt2st_drops._extra_state" in state
    assert "mt2st_drops._extra_state" not in tracked.single_task_state_dict()
    plain = toy_model()
    plain.load_state_dict(state)  # strict: an unsharded model ignores the entry (the drops travel in "mt2st")
    assert plain.dropped_tasks == frozenset()
    again = toy_model()
    again.track_drops_in_state_dict()
    again.drop_task("parity")
    again.load_state_dict(state)  # frozen as the weights load, before the optimizer state would
    assert again.dropped_tasks == {"recon", "parity"}  # un-frozen only where asked (a fit's restore)
    assert not any(p.requires_grad for p in again.heads["recon"].parameters())
    again.track_drops_in_state_dict(unfreeze_on_load=True)
    again.load_state_dict(state)
    assert again.dropped_tasks == {"recon"}
    assert all(p.requires_grad for p in again.heads["parity"].parameters())


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


def test_all_float16_losses_are_summed_in_float32():
    # All one half dtype: PyTorch would keep the sum in float16 if mt2st_loss did not cast (a float16/bfloat16
    # mix is promoted to float32 by PyTorch itself, so it cannot tell).
    model = toy_model()
    model.task_weights = {"recon": 1e-4, "parity": 1.0}
    half = {t: torch.tensor(v, dtype=torch.float16) for t, v in (("label", 1.0), ("recon", 1.0), ("parity", 0.5))}
    total = model.mt2st_loss(half)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(1.5001, abs=1e-6)


def test_all_bfloat16_losses_are_summed_in_float32():
    # bf16 (what "bf16-mixed" autocast gives) keeps 8 bits of mantissa: 1 + 1e-3 is 1 in a bf16 sum. A sum that
    # cast to float32 only under float16 would return a bf16 total of exactly 1 here.
    model = toy_model()
    model.task_weights = {"recon": 1e-3, "parity": 1e-3}
    bf16 = {t: torch.tensor(1.0, dtype=torch.bfloat16) for t in ("label", "recon", "parity")}
    assert (bf16["label"] + 1e-3 * bf16["recon"] + 1e-3 * bf16["parity"]).item() == 1.0  # what bf16 would give
    total = model.mt2st_loss(bf16)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(1.002, abs=1e-6)


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (0.5, TypeError, r"the loss of task 'recon' is a float, not a tensor"),
        (torch.ones(4), ValueError, r"the loss of task 'recon' has shape \(4,\); each task loss must be a scalar"),
        (torch.ones(1), ValueError, r"the loss of task 'recon' has shape \(1,\)"),
    ],
)
def test_a_loss_that_is_not_a_scalar_tensor_is_named(bad, error, match):
    model = toy_model()
    with pytest.raises(error, match=match):
        model.mt2st_loss({"label": torch.tensor(1.0), "recon": bad, "parity": torch.tensor(1.0)})


def test_step_record_is_handed_over_once_and_only_in_training():
    model = toy_model()
    h = torch.randn(4, 8, requires_grad=True)
    given = {t: (h.sum() * i) for i, t in enumerate(model.tasks, 1)}
    total = model.mt2st_loss(given, features=h)
    record = model.take_step_record()
    assert record.losses is given and record.features is h and record.total is total and record.loss_scale == 1.0
    assert model.take_step_record() is None  # the module let go of it
    with torch.no_grad():  # validation: no record, so nothing stale reaches the next training step
        model.mt2st_loss({t: torch.tensor(1.0) for t in model.tasks})
    assert model.take_step_record() is None


def test_a_head_that_shares_a_submodule_is_refused():
    class SharedSubmodule(MT2STMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 8)
            shared_proj = nn.Linear(8, 8)
            self.heads = nn.ModuleDict(
                {"label": nn.Sequential(shared_proj, nn.Linear(8, 3)), "count": nn.Sequential(shared_proj, nn.Linear(8, 1))}
            )
            self.declare_tasks(primary="label", heads=self.heads)

    with pytest.raises(ValueError, match=r"heads\.label\.0\.weight is tied to a parameter of the auxiliary head "
                                         r"'count' \(a shared parameter or submodule 'heads\.label\.0'\)"):
        SharedSubmodule()


def test_an_aliased_head_is_not_a_tie():
    class Aliased(MT2STMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleDict({"label": nn.Linear(4, 3), "count": nn.Linear(4, 1)})
            self.count_head = self.heads["count"]  # the same head under a second name: nothing else is frozen
            self.declare_tasks(primary="label", heads=self.heads)

    assert Aliased().auxiliary_tasks == ("count",)


def test_a_dropped_head_comes_back_with_the_users_own_requires_grad_flags():
    model = toy_model()
    frozen = model.heads["recon"][0].bias
    frozen.requires_grad_(False)  # the user's choice, before any drop
    model.drop_task("recon")
    assert not any(p.requires_grad for p in model.heads["recon"].parameters())
    model._undrop_task("recon")  # what loading a checkpoint from before the drop does
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.heads["recon"].parameters() if p is not frozen)


def test_the_step_record_lists_the_primary_loss_first_whatever_the_order_given():
    model = toy_model()
    x = torch.zeros(())
    losses = {"recon": x + 2.0, "parity": x + 3.0, "label": x + 1.0}  # primary last
    model.mt2st_loss(losses)
    record = model.take_step_record()
    assert list(record.losses) == ["label", "recon", "parity"]  # the policies read the first one as the primary's
    assert record.losses["label"] is losses["label"]
