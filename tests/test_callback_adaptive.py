"""The adaptive strategies through the callback: the weights in force are the measured factors (eqs. 13-15)."""

from __future__ import annotations

import pytest
import torch
import lightning.pytorch as pl
from torch.testing import assert_close

from mt2st_lightning import MT2STCallback
from mt2st_lightning.adaptive import (
    ema,
    fisher_trace_weights,
    grad_norm_ratio_weights,
    inverse_variance_weights,
)
from tests.conftest import TASKS, LossTap, toy_loader, toy_model, toy_trainer

AUX = ("recon", "parity")


class Oracle(LossTap):
    """Records the weights in force and, independently of the callback, each task's squared gradient norm
    on the shared features given to ``mt2st_loss`` if any (``on="parameters"``: on the shared encoder), as
    ``measure_on="auto"`` does, and each task's loss."""

    def __init__(self, on: str = "auto") -> None:
        super().__init__()
        self.on = on
        self.weights: list[dict[str, float]] = []
        self.sq: list[dict[str, float]] = []
        self.losses: list[dict[str, float]] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.weights.append(dict(pl_module.task_weights))
        on_features = self.on == "auto" and self.features is not None
        shared = [self.features] if on_features else list(pl_module.encoder.parameters())
        sq, values = {}, {}
        for task, value in self.tapped.items():
            grads = torch.autograd.grad(value, shared, retain_graph=True, allow_unused=True)
            sq[task] = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            values[task] = float(value.detach())
        self.sq.append(sq)
        self.losses.append(values)


def run(tmp_path, strategy, max_steps=8, on="auto", **kwargs):
    oracle = Oracle(on)
    if on == "parameters":
        kwargs["measure_on"] = "parameters"
    callback = MT2STCallback(strategy, adapt_every=1, **kwargs)
    trainer = toy_trainer(tmp_path, [callback, oracle], max_steps=max_steps, max_epochs=None)
    model = toy_model()
    trainer.fit(model, toy_loader())
    return oracle, callback, model


def _aux(weights: dict[str, float]) -> torch.Tensor:
    return torch.tensor([weights[t] for t in AUX], dtype=torch.float64)


@pytest.mark.parametrize("on", ["auto", "parameters"])
@pytest.mark.parametrize("strategy", ["gradnorm", "fisher"])
def test_gradient_strategies_apply_last_steps_measurement(tmp_path, strategy, on):
    oracle, _, _ = run(tmp_path, strategy, on=on, adapt_decay=0.0, budget=2.0)
    # Before anything is measured the budget is shared equally.
    assert_close(_aux(oracle.weights[0]), torch.tensor([1.0, 1.0], dtype=torch.float64))
    for step in range(1, len(oracle.weights)):
        sq = oracle.sq[step - 1]  # measured on the previous step, applied from this one on
        aux_sq = torch.tensor([sq[t] for t in AUX], dtype=torch.float64)
        if strategy == "fisher":
            expected = fisher_trace_weights(aux_sq, 2.0)
        else:
            expected = grad_norm_ratio_weights(torch.tensor(sq["label"], dtype=torch.float64), aux_sq, 2.0)
        assert_close(_aux(oracle.weights[step]), expected, rtol=1e-4, atol=1e-6)
        assert sum(oracle.weights[step][t] for t in AUX) == pytest.approx(2.0, rel=1e-6)
        assert oracle.weights[step]["label"] == 1.0
    # The measured factors are not the equal split: the test would pass vacuously otherwise.
    assert abs(oracle.weights[-1]["recon"] - oracle.weights[-1]["parity"]) > 1e-3


def test_noise_strategy_weighs_by_inverse_loss_variance(tmp_path):
    decay = 0.5
    oracle, _, _ = run(tmp_path, "noise", adapt_decay=decay)
    mean = sq = None
    for step in range(1, len(oracle.weights)):
        v = torch.tensor([oracle.losses[step - 1][t] for t in AUX], dtype=torch.float64)
        mean, sq = ema(mean, v, decay), ema(sq, v * v, decay)
        expected = inverse_variance_weights(sq - mean**2, 1.0)
        assert_close(_aux(oracle.weights[step]), expected, rtol=1e-3, atol=1e-6)


def test_adaptive_envelope_switches_and_drops(tmp_path):
    oracle, callback, model = run(tmp_path, "fisher", switch_at=4)
    assert model.active_tasks == ("label",)
    assert callback.drop_times == {"recon": 4, "parity": 4}
    assert all(w == {"label": 1.0} for w in oracle.weights[4:])
    assert all(set(w) == {"label", *AUX} for w in oracle.weights[:4])


class TinyAuxLoss(type(toy_model())):
    """An auxiliary loss so small that its fp16 gradients underflow to 0 unless the loss is scaled."""

    def task_loss(self, task, output, target):
        loss = super().task_loss(task, output, target)
        return loss * 1e-7 if task == "parity" else loss


@pytest.mark.slow
def test_fp16_measurement_uses_the_loss_scale(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(0)
    from mt2st_lightning.examples.models import MLPEncoder

    model = TinyAuxLoss(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)
    callback = MT2STCallback("fisher", adapt_every=1)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    trainer = toy_trainer(tmp_path, [callback], max_steps=3, max_epochs=None, plugins=[plugin])
    trainer.fit(model, toy_loader())
    parity = callback.state_dict()["policy"]["stats"]["sqnorm/parity"]
    assert torch.isfinite(parity) and parity > 0


def test_cost_meter_charges_the_measurement_once_per_measuring_step(tmp_path):
    from mt2st_lightning.flops import PhaseCostMeter

    meter = PhaseCostMeter(log=False)
    callback = MT2STCallback("gradnorm", adapt_every=2)
    trainer = toy_trainer(tmp_path, [callback, meter], max_steps=4, max_epochs=None, accumulate_grad_batches=3)
    trainer.fit(toy_model(), toy_loader())
    # 4 optimizer steps x 3 micro-batches; the measurement (extra backward passes) runs at steps 0 and 2, on
    # the first micro-batch of each window only.
    assert meter.batches == {"label+recon+parity/measuring": 2, "label+recon+parity": 10}
    measuring, plain = meter.flops_per_batch["label+recon+parity/measuring"], meter.flops_per_batch["label+recon+parity"]
    assert measuring > plain


def test_gradnorm_without_budget_keeps_the_raw_ratio_of_eq_13(tmp_path):
    oracle, _, _ = run(tmp_path, "gradnorm", adapt_decay=0.0, budget="raw")
    assert _aux(oracle.weights[0]).tolist() == [1.0, 1.0]
    for step in range(1, len(oracle.weights)):
        sq = oracle.sq[step - 1]
        expected = torch.tensor([(sq["label"] / sq[t]) ** 0.5 for t in AUX], dtype=torch.float64)
        assert_close(_aux(oracle.weights[step]), expected, rtol=1e-4, atol=1e-6)


def test_budget_none_is_for_gradnorm_only():
    with pytest.raises(ValueError, match="budget='raw' .* strategy='gradnorm' only, not 'fisher'"):
        MT2STCallback("fisher", budget="raw")


class NaNParityAt2(type(toy_model())):
    def task_loss(self, task, output, target):
        loss = super().task_loss(task, output, target)
        return loss * float("nan") if task == "parity" and self.trainer.global_step == 2 else loss


def test_a_skipped_nan_step_does_not_poison_noise(tmp_path):
    # Issue 10: under on_nonfinite="skip", a NaN on a noise measuring step turned its statistics into NaN for the
    # rest of the run and locked the weights at equal shares.
    pl.seed_everything(0)
    from mt2st_lightning.examples.models import MLPEncoder

    model = NaNParityAt2(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)
    callback = MT2STCallback("noise", adapt_every=1, adapt_decay=0.5, on_nonfinite="skip")
    toy_trainer(tmp_path, [callback], max_steps=10, max_epochs=None).fit(model, toy_loader())
    stats = callback.state_dict()["policy"]["stats"]
    assert stats and all(torch.isfinite(v).all() for v in stats.values())
    weights = model.task_weights
    assert abs(weights["recon"] - weights["parity"]) > 1e-3  # measured, not locked at equal shares
