"""MT2STCallback on one process: weights at step boundaries, real head dropping, errors, precision."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from mt2st_lightning import Diminish, MT2STCallback, Switch
from tests.conftest import StepRecorder, nan_model, toy_loader, toy_model, toy_trainer

AUX = ("recon", "parity")


def fit(tmp_path, callback, recorder=None, model=None, loader=None, **trainer_kwargs):
    model = model or toy_model()
    callbacks = [callback] + ([recorder] if recorder else [])
    trainer = toy_trainer(tmp_path, callbacks, **trainer_kwargs)
    trainer.fit(model, loader or toy_loader())
    return trainer, model


# ---------------------------------------------------------------------------------------- the switch
def test_switch_drops_heads_for_real(tmp_path, recorder):
    trainer = toy_trainer(tmp_path, [MT2STCallback("switch", switch_at=4), recorder], max_epochs=2)
    model = toy_model()
    trainer.fit(model, toy_loader())

    assert model.active_tasks == ("label",)
    assert model.dropped_tasks == frozenset(AUX)
    rows = recorder.rows
    assert [r["step"] for r in rows] == list(range(12))
    for r in rows:
        if r["step"] < 4:
            assert r["active"] == ("label", *AUX) and r["weights"] == {"label": 1.0, "recon": 1.0, "parity": 1.0}
            expected = r["losses"]["label"] + r["losses"]["recon"] + r["losses"]["parity"]
            torch.testing.assert_close(r["total"], expected)
        else:
            # From the switch on, the heads do not run and the total *is* the primary loss.
            assert r["active"] == ("label",) and set(r["losses"]) == {"label"}
            assert torch.equal(r["total"], r["losses"]["label"])
    optimizer = trainer.optimizers[0]
    for task in AUX:
        for name, p in model.heads[task].named_parameters():
            assert p.grad is None and not p.requires_grad
            assert p not in optimizer.state, f"optimizer still holds state for heads.{task}.{name}"
    # The aux heads stopped changing after the switch: compare with a run stopped right at the switch.
    stopped = toy_model()
    # (the same 4 steps as multi-task training: a switch at a run's very end would be refused)
    toy_trainer(tmp_path, [MT2STCallback("mtl")], max_steps=4).fit(stopped, toy_loader())
    for task in AUX:
        for (name, p), (_, q) in zip(model.heads[task].named_parameters(), stopped.heads[task].named_parameters()):
            assert torch.equal(p, q), f"heads.{task}.{name} changed after the switch"
    # The primary head and the encoder kept training.
    assert not torch.equal(model.heads["label"][0].weight, stopped.heads["label"][0].weight)


def test_a_fit_that_ends_before_training_stops_unfreezing_heads_on_load():
    # Un-freezing on load is for a fit's own restore (MT2STCallback.on_fit_start, under FSDP2): once the fit has
    # ended, even before on_train_start, a later load (e.g. trainer.test(ckpt_path=...)) leaves dropped heads frozen.
    before_drop = toy_model()
    before_drop.track_drops_in_state_dict()
    state = before_drop.state_dict()
    model = toy_model()
    model.drop_task("recon")
    model.track_drops_in_state_dict(unfreeze_on_load=True)  # as on fit start
    MT2STCallback("switch", switch_at=2).teardown(None, model, "fit")  # type: ignore[arg-type]
    model.load_state_dict(state)
    assert model.dropped_tasks == {"recon"}


def test_release_heads_frees_their_weights_and_changes_nothing_else(tmp_path):
    kept = StepRecorder()
    _, kept_model = fit(tmp_path / "kept", MT2STCallback("switch", switch_at=4), kept)
    released = StepRecorder()
    _, model = fit(tmp_path / "released", MT2STCallback("switch", switch_at=4, release_heads=True), released)
    for got, want in zip(released.rows, kept.rows, strict=True):
        assert torch.equal(got["total"], want["total"]), f"step {want['step']}"
    for task in AUX:
        assert all(p.numel() == 0 for p in model.heads[task].parameters())
    single_task = sum(p.numel() for p in (*model.encoder.parameters(), *model.heads["label"].parameters()))
    assert sum(p.numel() for p in model.parameters()) == single_task
    # A module released by a checkpoint loads through Lightning: the heads are released before loading.
    trainer = toy_trainer(tmp_path, [], max_steps=1)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "released.ckpt")
    from mt2st_lightning.examples.models import MLPEncoder

    loaded = type(model).load_from_checkpoint(tmp_path / "released.ckpt", encoder=MLPEncoder(in_features=16, hidden=32))
    assert loaded.dropped_tasks == frozenset(AUX)
    for (name, p), (_, q) in zip(loaded.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_switch_fraction_of_run(tmp_path):
    callback = MT2STCallback("switch", switch_at=0.25)
    fit(tmp_path, callback, max_epochs=2)  # 12 optimizer steps
    assert callback.total == 12
    assert callback.drop_times == {"recon": 3, "parity": 3}


def test_switch_in_epochs(tmp_path, recorder):
    callback = MT2STCallback("switch", switch_at=1, unit="epoch")
    fit(tmp_path, callback, recorder, max_epochs=3)
    assert callback.drop_times == {"recon": 1, "parity": 1}  # in epochs
    assert [len(r["active"]) for r in recorder.rows] == [3] * 6 + [1] * 12


def test_stl_never_runs_aux_heads(tmp_path, recorder):
    _, model = fit(tmp_path, MT2STCallback("stl"), recorder)
    assert all(r["active"] == ("label",) for r in recorder.rows)
    assert all(p.grad is None for t in AUX for p in model.heads[t].parameters())


def test_mtl_keeps_all_heads(tmp_path, recorder):
    _, model = fit(tmp_path, MT2STCallback("mtl", gamma0=0.5), recorder)
    assert model.dropped_tasks == frozenset()
    assert all(r["weights"] == {"label": 1.0, "recon": 0.5, "parity": 0.5} for r in recorder.rows)


def test_diminish_weights_follow_formula_and_prune(tmp_path, recorder):
    callback = MT2STCallback("diminish", gamma0=1.0, eta={"recon": 0.5, "parity": 0.05}, nu=1.0, prune_below=0.2)
    _, model = fit(tmp_path, callback, recorder)
    for r in recorder.rows:
        t = r["step"]
        for task, eta in (("recon", 0.5), ("parity", 0.05)):
            raw = math.exp(-eta * t)
            if raw < 0.2:
                assert task not in r["weights"], f"{task} should be pruned at step {t}"
            else:
                assert r["weights"][task] == pytest.approx(raw, rel=1e-12)
    # recon falls below 0.2 once 0.5 t > ln 5, i.e. t >= 4; parity never does within 12 steps.
    assert callback.drop_times == {"recon": 4}
    assert model.active_tasks == ("label", "parity")


def test_custom_schedules_compose(tmp_path, recorder):
    callback = MT2STCallback(schedules={"recon": Diminish(eta=0.1) * Switch(at=6), "parity": Switch(at=2, gamma0=0.3)})
    fit(tmp_path, callback, recorder)
    assert callback.drop_times == {"parity": 2, "recon": 6}
    assert recorder.rows[1]["weights"] == {"label": 1.0, "recon": pytest.approx(math.exp(-0.1)), "parity": 0.3}


def test_gradient_accumulation_keeps_weights_constant_within_a_window(tmp_path, recorder):
    callback = MT2STCallback("diminish", eta=0.3, prune_below=0.25)
    fit(tmp_path, callback, recorder, accumulate_grad_batches=3, max_epochs=4)
    windows: dict[int, list] = {}
    for r in recorder.rows:
        windows.setdefault(r["step"], []).append((r["weights"], r["active"]))
    assert all(len(w) == 3 for w in windows.values())  # 6 batches per epoch, 3 per optimizer step
    for step, entries in windows.items():
        assert all(e == entries[0] for e in entries), f"weights changed inside the window of step {step}"
    # The weights did move from window to window, and the prune happened at a window boundary.
    assert windows[0][0][0]["recon"] != windows[1][0][0]["recon"]
    assert callback.drop_times["recon"] == math.ceil(math.log(4) / 0.3)


def test_weights_are_logged(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path)
    fit(tmp_path, MT2STCallback("switch", switch_at=3), logger=logger, log_every_n_steps=1)
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    weights = [(int(r["step"]), float(r["mt2st/weight/recon"]), float(r["mt2st/active_tasks"]))
               for r in rows if r.get("mt2st/weight/recon")]
    assert (2, 1.0, 3.0) in weights and (3, 0.0, 1.0) in weights


# ---------------------------------------------------------------------------------------- precision, clipping, manual
def _precision(name):
    if name == "16-mixed+scaler":  # Lightning uses no GradScaler on CPU; bring one, as on a GPU
        from lightning.pytorch.plugins import MixedPrecision

        return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    return dict(precision=name)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "16-mixed+scaler"])
def test_mixed_precision_and_gradient_clipping_across_the_switch(tmp_path, recorder, precision):
    _, model = fit(tmp_path, MT2STCallback("switch", switch_at=5), recorder, gradient_clip_val=0.5,
                   **_precision(precision))
    assert model.active_tasks == ("label",)
    assert all(r["total"].dtype == torch.float32 for r in recorder.rows)  # the weighted sum is float32
    assert all(torch.isfinite(r["total"]) for r in recorder.rows)
    assert all(p.grad is None for t in AUX for p in model.heads[t].parameters())


class ManualModel(type(toy_model())):
    def __init__(self, *args, n_optimizers=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.n_optimizers = n_optimizers

    def training_step(self, batch, batch_idx):
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        loss = super().training_step(batch, batch_idx)
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        return loss

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return [torch.optim.SGD(self.encoder.parameters(), lr=0.1), torch.optim.SGD(self.heads.parameters(), lr=0.1)]


def _manual_model(**kwargs):
    pl.seed_everything(0)
    from mt2st_lightning.examples.models import MLPEncoder
    from tests.conftest import TASKS

    return ManualModel(MLPEncoder(in_features=16, hidden=32), TASKS, primary="label", head_hidden=8, **kwargs)


def test_manual_optimization_with_one_optimizer(tmp_path, recorder):
    callback = MT2STCallback("switch", switch_at=3)
    _, model = fit(tmp_path, callback, recorder, model=_manual_model())
    assert callback.drop_times == {"recon": 3, "parity": 3}
    assert [len(r["active"]) for r in recorder.rows] == [3] * 3 + [1] * 9


def test_several_optimizers_need_epoch_unit(tmp_path):
    with pytest.raises(RuntimeError, match="optimizers.*unit='epoch'"):
        fit(tmp_path, MT2STCallback("switch", switch_at=3), model=_manual_model(n_optimizers=2))
    callback = MT2STCallback("switch", switch_at=1, unit="epoch")
    fit(tmp_path, callback, model=_manual_model(n_optimizers=2))
    assert callback.drop_times == {"recon": 1, "parity": 1}


# ---------------------------------------------------------------------------------------- non-finite losses
def test_nonfinite_aux_loss_raises_naming_the_task(tmp_path):
    # log_every_n_steps=1: the guard reads in the step that went wrong, so it can name the task.
    with pytest.raises(FloatingPointError, match=r"non-finite loss in task\(s\) \['parity'\] at step 2, found at step 2"):
        fit(tmp_path, MT2STCallback("mtl"), model=nan_model(), log_every_n_steps=1)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed+scaler"])
def test_nonfinite_aux_loss_skip_leaves_parameters_unchanged(tmp_path, precision):
    before = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:
                before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                for n, p in pl_module.named_parameters():
                    assert torch.equal(p, before[n]), f"{n} changed on the skipped step"

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # After MT2STCallback's hook: the skipped step's gradients are gone, whatever the precision plugin
            # (a GradScaler would skip a NaN step on its own, so the parameters alone would not tell).
            if trainer.global_step == 2:
                assert all(p.grad is None for p in pl_module.parameters())

    model = nan_model()
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl", on_nonfinite="skip"), Watch()], max_epochs=1,
                          **_precision(precision))
    trainer.fit(model, toy_loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 6


# ---------------------------------------------------------------------------------------- bad input, before training
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(strategy="swtich", switch_at=3), ValueError, "unknown MT2ST strategy 'swtich'; choose one of stl, mtl, diminish, switch"),
        (dict(strategy="mtl", gamma0=-1.0), ValueError, "gamma0 must be a finite number >= 0"),
        (dict(strategy="diminish", eta=-0.1), ValueError, "eta must be a finite number >= 0"),
        (dict(strategy="diminish", nu=0.0), ValueError, "nu must be > 0"),
        (dict(strategy="diminish", nu=-1.0), ValueError, "nu must be a finite number >= 0"),
        (dict(strategy="switch"), ValueError, "needs switch_at"),
        (dict(strategy="switch", switch_at=1.5), ValueError, "fraction of the run and must lie in"),
        (dict(strategy="switch", switch_at=3, unit="batch"), ValueError, "unit must be 'step' or 'epoch'"),
        (dict(strategy="switch", switch_at=3, on_nonfinite="ignore"), ValueError, "on_nonfinite must be"),
        (dict(), ValueError, "give MT2STCallback a strategy"),
        (dict(strategy="switch", schedules={"recon": Switch(at=2)}), ValueError, "got both strategy='switch' and schedules"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MT2STCallback(**kwargs)


class Steps(pl.Callback):
    def __init__(self):
        self.n = 0

    def on_train_batch_start(self, *args):
        self.n += 1


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        (MT2STCallback("switch", switch_at=13), r"switch point 13 lies beyond the run's end \(12\)"),
        (MT2STCallback("switch", switch_at={"recon": 2, "edges": 3}), r"switch_at names unknown auxiliary task\(s\) \['edges'\]"),
        (MT2STCallback("diminish", eta={"recon": 0.1}), r"eta gives no value for auxiliary task 'parity'"),
        (MT2STCallback(schedules={"recon": Switch(at=2), "edge": Switch(at=2)}), r"unknown \['edge'\]; missing \['parity'\]"),
    ],
)
def test_bad_plans_fail_before_the_first_step(tmp_path, callback, match):
    steps = Steps()
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, callback, recorder=steps)
    assert steps.n == 0


def test_a_plan_that_is_single_task_from_the_start_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"finished at step 0 of 2.0, so this run trains the primary task alone"):
        fit(tmp_path, MT2STCallback("switch", switch_at=0.2), max_steps=2, max_epochs=None)


def test_save_single_task_warns_when_no_head_was_dropped(tmp_path):
    with pytest.warns(UserWarning, match="no auxiliary head was dropped"):
        fit(tmp_path, MT2STCallback("mtl", save_single_task="single.ckpt"), max_steps=2, max_epochs=None)
    assert not (tmp_path / "single.ckpt").exists()


def test_ddp_communication_hooks_are_refused():
    from lightning.pytorch.strategies import DDPStrategy
    from mt2st_lightning.heads import check_can_drop as _check_can_drop

    with pytest.raises(RuntimeError, match="communication hooks"):
        _check_can_drop(DDPStrategy(ddp_comm_hook=lambda state, bucket: bucket.buffer()))
    _check_can_drop(DDPStrategy())


def test_tied_auxiliary_head_is_refused():
    from mt2st_lightning.examples.models import MLPEncoder, MultiTaskModel
    from tests.conftest import TASKS

    class Tied(MultiTaskModel):
        def __init__(self):
            encoder = MLPEncoder(in_features=16, hidden=16, depth=1)
            heads_hidden = 16
            super().__init__(encoder, TASKS, primary="label", head_hidden=heads_hidden)

        def declare_tasks(self, primary, heads):
            self.heads["recon"][0].weight = self.encoder.net[1].weight  # an MLM-style tie, 16x16
            super().declare_tasks(primary, heads)

    with pytest.raises(ValueError, match=r"encoder\.net\.1\.weight is tied to a parameter of the auxiliary head 'recon'"):
        Tied()


def test_module_without_mixin_is_rejected(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(16, 3)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["x"].flatten(1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"mixes in MT2STMixin.*class Plain\(MT2STMixin, L.LightningModule\)"):
        fit(tmp_path, MT2STCallback("mtl"), model=Plain())


def test_switch_fraction_needs_a_known_run_length(tmp_path):
    with pytest.raises(ValueError, match="run's length is unknown"):
        fit(tmp_path, MT2STCallback("switch", switch_at=0.5, unit="epoch"), max_epochs=-1, max_steps=5)


# ---------------------------------------------------------------------------------------- the deployable model
def test_single_task_export_loads_without_aux_heads(tmp_path):
    callback = MT2STCallback("switch", switch_at=3, save_single_task="single.ckpt")
    trainer, model = fit(tmp_path, callback)
    path = tmp_path / "single.ckpt"
    assert path.exists()
    checkpoint = torch.load(path, weights_only=False)
    assert not any(k.startswith(("heads.recon", "heads.parity")) for k in checkpoint["state_dict"])
    from mt2st_lightning.examples.models import MLPEncoder

    loaded = type(model).load_from_checkpoint(path, encoder=MLPEncoder(in_features=16, hidden=32), strict=False)
    assert loaded.active_tasks == ("label",)
    x = toy_loader().dataset.tensors["x"][:8]
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x)["label"], model(x)["label"])


# ---------------------------------------------------------------------------------------- promises (issue 10, part 6)
def test_gradient_accumulation_keeps_adaptive_weights_constant_within_a_window(tmp_path, recorder):
    # gradnorm measures on the first micro-batch of a step: its new factors must wait for the next step.
    fit(tmp_path, MT2STCallback("gradnorm", adapt_every=1, adapt_decay=0.0), recorder, accumulate_grad_batches=3,
        max_epochs=2)
    windows: dict[int, list] = {}
    for r in recorder.rows:
        windows.setdefault(r["step"], []).append(r["weights"])
    assert len(windows) == 4 and all(len(w) == 3 for w in windows.values())
    for step, weights in windows.items():
        assert all(w == weights[0] for w in weights), f"weights changed inside the window of step {step}"
    assert windows[1][0] != windows[2][0]  # the measurements did move the weights, from window to window


def test_weights_are_logged_on_logging_steps_only(tmp_path):
    import csv

    logger = pl.loggers.CSVLogger(tmp_path)
    fit(tmp_path, MT2STCallback("diminish", eta=0.1), logger=logger, log_every_n_steps=4)
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    steps = sorted(int(r["step"]) for r in rows if r.get("mt2st/weight/recon"))
    # The run's first step, then Lightning's logging steps: (step + 1) % log_every_n_steps == 0
    assert steps == [0, 3, 7, 11]
    weight_at = {int(r["step"]): float(r["mt2st/weight/recon"]) for r in rows if r.get("mt2st/weight/recon")}
    assert weight_at[0] == 1.0  # gamma0: the curve starts where the run does
    assert weight_at[7] == pytest.approx(math.exp(-0.7))


def test_the_drop_step_is_logged_and_announced(tmp_path, caplog):
    import csv
    import logging

    logger = pl.loggers.CSVLogger(tmp_path)
    caplog.set_level(logging.INFO, logger="mt2st_lightning")
    logging.getLogger("mt2st_lightning").propagate = True  # let caplog see it
    try:
        fit(tmp_path, MT2STCallback("switch", switch_at=5), logger=logger)
    finally:
        logging.getLogger("mt2st_lightning").propagate = False
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    dropped = {(int(r["step"]), float(r["mt2st/dropped_at/recon"])) for r in rows if r.get("mt2st/dropped_at/recon")}
    assert dropped == {(5, 5.0)}
    assert any("['recon', 'parity'] left the computation" in m for m in caplog.messages)


# ---------------------------------------------------------------------------------------- the step record
class Bypass(type(toy_model())):
    """A training_step that does not return mt2st_loss's total (``how``: "sum" skips mt2st_loss, "scaled"
    changes its total)."""

    how = "sum"

    def training_step(self, batch, batch_idx):
        if self.how == "scaled":
            return super().training_step(batch, batch_idx) * 2.0
        h = self.encoder(batch["x"])
        return sum(self.task_loss(t, self.heads[t](h), batch[t]) for t in self.active_tasks)


def _bypass(how):
    pl.seed_everything(0)
    from mt2st_lightning.examples.models import MLPEncoder
    from tests.conftest import TASKS

    model = Bypass(MLPEncoder(in_features=16, hidden=32), TASKS, primary="label", head_hidden=8)
    model.how = how
    return model


@pytest.mark.parametrize("how", ["sum", "scaled"])
def test_a_policy_that_measures_needs_the_loss_of_mt2st_loss(tmp_path, how):
    with pytest.raises(RuntimeError, match="mt2st_loss"):
        fit(tmp_path, MT2STCallback("gradnorm", adapt_every=1), model=_bypass(how), max_steps=2, max_epochs=None)


def test_a_schedule_warns_when_mt2st_loss_is_bypassed(tmp_path):
    with pytest.warns(UserWarning, match=r"training_step did not call self.mt2st_loss\(losses\)"):
        fit(tmp_path, MT2STCallback("switch", switch_at=1), model=_bypass("sum"), max_steps=2, max_epochs=None)


# ---------------------------------------------------------------------------------------- user policies
from mt2st_lightning.policies import Policy  # noqa: E402


class Spy(Policy):
    """Halves the auxiliary weight every step, finishes nothing, and observes every step (recording which)."""

    name = "spy"

    def __init__(self):
        self.observed: list[int] = []
        self.validated: list[int] = []

    def weights(self, t, active):
        return {task: 0.5**t for task in active}

    def finished(self, t, active):
        return []

    def wants_step(self, t):
        return True

    def observe_step(self, t, record, reduce):
        assert torch.isfinite(record.total)
        self.observed.append(t)

    def observe_validation(self, t, metrics, reduce):
        self.validated.append(t)


def test_a_user_policy_decides_the_weights_and_sees_steps_and_validation(tmp_path, recorder):
    spy = Spy()
    trainer = toy_trainer(tmp_path, [MT2STCallback(policy=spy), recorder], max_epochs=2, limit_val_batches=2,
                          num_sanity_val_steps=2)
    trainer.fit(toy_model(), toy_loader(), toy_loader(n=32))
    assert [r["weights"]["recon"] for r in recorder.rows] == [0.5**t for t in range(12)]
    assert spy.observed == list(range(12))
    assert spy.validated == [6, 12]  # after each epoch's validation, not after the sanity check


def test_a_user_policy_takes_no_strategy_parameters():
    with pytest.raises(ValueError, match=r"policy=\.\.\.\) is the whole decision; drop strategy, switch_at"):
        MT2STCallback("switch", policy=Spy(), switch_at=3)
    with pytest.raises(TypeError, match="must be a mt2st_lightning.policies.Policy"):
        MT2STCallback(policy=object())


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_nonfinite_step_is_never_observed(tmp_path, mode):
    spy = Spy()
    model = nan_model()  # parity is NaN at step 2
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=r"task\(s\) \['parity'\] at step 2, found at step 2"):
            fit(tmp_path, MT2STCallback(policy=spy, on_nonfinite=mode), model=model, max_epochs=1)
    else:
        fit(tmp_path, MT2STCallback(policy=spy, on_nonfinite=mode), model=model, max_epochs=1)
    assert 2 not in spy.observed and spy.observed[:2] == [0, 1]


# ---------------------------------------------------------------------------------------- second fit
def test_a_second_fit_after_a_switch_says_where_the_drop_came_from(tmp_path):
    _, model = fit(tmp_path, MT2STCallback("switch", switch_at=3))
    with pytest.raises(ValueError, match="dropped \\(by an earlier fit of this module, not from a checkpoint\\)") as error:
        fit(tmp_path, MT2STCallback("switch", switch_at=5), model=model)
    assert "restored from the checkpoint" not in str(error.value)


class Eager(Spy):
    """Changes its weights the moment it observes a step (no deferral of its own): only the callback, asking
    once per optimizer step, keeps them constant within an accumulation window."""

    def weights(self, t, active):
        return {task: 1.0 / (1 + len(self.observed)) for task in active}


def test_the_callback_asks_for_weights_once_per_optimizer_step(tmp_path, recorder):
    fit(tmp_path, MT2STCallback(policy=Eager()), recorder, accumulate_grad_batches=3, max_epochs=1)
    windows: dict[int, set] = {}
    for r in recorder.rows:
        windows.setdefault(r["step"], set()).add(r["weights"]["recon"])
    assert windows == {0: {1.0}, 1: {0.5}}


def test_constructor_type_hints_parse_with_jsonargparse():
    # LightningCLI parses MT2STCallback's signature: an int switch point stays an int, "raw" reaches gradnorm,
    # and a misspelled strategy reaches the library's own error (plain `str`, not a Literal).
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(MT2STCallback, "cb")
    assert parser.parse_args(["--cb.strategy=switch", "--cb.switch_at=5"]).cb.switch_at == 5
    assert type(parser.parse_args(["--cb.strategy=switch", "--cb.switch_at=5"]).cb.switch_at) is int
    assert parser.parse_args(["--cb.strategy=switch", "--cb.switch_at=0.3"]).cb.switch_at == 0.3
    callback = parser.instantiate(parser.parse_args(["--cb.strategy=gradnorm", "--cb.budget=raw"])).cb
    assert callback.policy.budget is None
    with pytest.raises(ValueError, match="unknown MT2ST strategy 'swtich'"):
        parser.instantiate(parser.parse_args(["--cb.strategy=swtich"]))
