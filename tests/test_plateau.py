"""``PlateauSwitch`` (strategy="plateau"): drops the auxiliary heads where Lightning's EarlyStopping would stop.

The reference is Lightning's own ``EarlyStopping``, driven through its public ``on_validation_end`` hook, not a
copy of its logic.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import Logger
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tests.conftest import TASKS as TOY_TASKS
from tests.conftest import toy_loader, toy_model, toy_trainer
from tests.test_app import compose_train

from mt2st_lightning import MT2STCallback
from mt2st_lightning.examples.models import MLPEncoder, MultiTaskModel
from mt2st_lightning.app.run_format import VAL_LOSS, VAL_PRIMARY_METRIC
from mt2st_lightning.names import SWITCH_STEP_PREFIX
from mt2st_lightning.policies.plateau import PlateauSwitch
from mt2st_lightning.app.train import train

SETTINGS = settings(max_examples=300, deadline=None)
TASKS = ("recon", "parity")
KEY = "val/score"


class OneRank:
    """The reducer of a single device: every decision is the local one."""

    def __init__(self) -> None:
        self.any_calls: list[bool] = []

    def mean(self, value):
        return value

    def all(self, decision: bool) -> bool:
        return bool(decision)

    def any(self, decision: bool) -> bool:
        self.any_calls.append(bool(decision))
        return bool(decision)


class OtherRankPlateaued(OneRank):
    """Two ranks, the other one of which has run out of patience."""

    def any(self, decision: bool) -> bool:
        super().any(decision)
        return True


def early_stopping_check(values, *, mode, patience, min_delta):
    """The index of the validation check at which Lightning's EarlyStopping signals the trainer to stop."""
    es = EarlyStopping(
        monitor=KEY,
        mode=mode,
        patience=patience,
        min_delta=min_delta,
        check_finite=False,
        check_on_train_epoch_end=False,
    )
    for i, value in enumerate(values):
        trainer = SimpleNamespace(
            callback_metrics={KEY: value},
            fast_dev_run=False,
            should_stop=False,
            current_epoch=i,
            sanity_checking=False,
            state=SimpleNamespace(fn=TrainerFn.FITTING),
            global_rank=0,
            world_size=1,
            strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        )
        es.on_validation_end(trainer, None)
        if trainer.should_stop:
            return i
    return None


def plateau_check(policy: PlateauSwitch, values, start: int = 0, reduce=None) -> int | None:
    """Feed validation checks 0, 1, ... (check i at step 10 * i) and return the index of the deciding one."""
    reduce = reduce or OneRank()
    for i, value in enumerate(values, start=start):
        policy.observe_validation(10 * i, {KEY: value, "val/loss": torch.tensor(0.0)}, reduce)
        if policy.decided_at is not None:
            return policy.decided_at // 10
    return None


# Halves and a few float32 neighbours: ties, and exact "improved by min_delta" boundaries, happen often.
metric_values = st.one_of(
    st.integers(-6, 6).map(lambda v: v / 2),
    st.floats(min_value=-3, max_value=3, width=32),
    st.just(1.0 + 2**-23),
    st.just(math.nan),
).map(lambda v: torch.tensor(v, dtype=torch.float32))
sequences = st.lists(metric_values, min_size=1, max_size=25)
modes = st.sampled_from(["min", "max"])
patiences = st.integers(1, 5)
min_deltas = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2**-23, 1e-7])


# ------------------------------------------------------------------------------ the EarlyStopping property
@pytest.mark.filterwarnings("ignore:.*is not finite")
@SETTINGS
@given(values=sequences, mode=modes, patience=patiences, min_delta=min_deltas)
# In float32, as EarlyStopping computes, 1 + 2**-23 (the next float after 1) minus 1e-7 rounds back to 1: no
# improvement over 1, though there is one in float64.
@example(values=[torch.tensor(1.0), torch.tensor(1.0 + 2**-23)], mode="max", patience=1, min_delta=1e-7)
@example(values=[torch.tensor(1.0 + 2**-23), torch.tensor(1.0)], mode="min", patience=1, min_delta=1e-7)
def test_decides_exactly_where_early_stopping_stops(values, mode, patience, min_delta):
    policy = PlateauSwitch(KEY, mode=mode, patience=patience, min_delta=min_delta)
    policy.bind(TASKS, total=None, unit="step")
    decided = plateau_check(policy, values)
    assert decided == early_stopping_check(values, mode=mode, patience=patience, min_delta=min_delta)


def reduce_lr_on_plateau_check(values, *, mode, patience, threshold):
    """The index of the check at which PyTorch's ReduceLROnPlateau (threshold_mode="rel") first lowers the
    learning rate: after more than ``patience - 1`` bad checks, i.e. at the ``patience``-th."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = ReduceLROnPlateau(
        optimizer, mode=mode, factor=0.5, patience=patience - 1, threshold=threshold, threshold_mode="rel"
    )
    for i, value in enumerate(values):
        scheduler.step(float(value))
        if optimizer.param_groups[0]["lr"] < 1.0:
            return i
    return None


# Positive values and margins that are exact in float32 and float64 alike (ReduceLROnPlateau computes in Python
# floats, the policy in the monitored tensor's dtype), so that "improved by exactly the margin" is the same
# verdict in both; NaN as a check without improvement. Ties at the margin happen often.
positive_values = st.one_of(
    st.integers(1, 32).map(lambda v: v / 8),
    st.just(math.nan),
).map(lambda v: torch.tensor(v, dtype=torch.float32))
relative_margins = st.sampled_from([0.0, 0.125, 0.25, 0.5])


@pytest.mark.filterwarnings("ignore:.*is not finite")
@SETTINGS
@given(values=st.lists(positive_values, min_size=1, max_size=25), mode=modes, patience=patiences, rel=relative_margins)
def test_a_relative_margin_decides_where_reduce_lr_on_plateau_reduces(values, mode, patience, rel):
    policy = PlateauSwitch(KEY, mode=mode, patience=patience, min_delta=rel, min_delta_mode="rel")
    policy.bind(TASKS, total=None, unit="step")
    decided = plateau_check(policy, values)
    assert decided == reduce_lr_on_plateau_check(values, mode=mode, patience=patience, threshold=rel)


@pytest.mark.parametrize(
    ("mode", "best", "not_enough", "enough"),
    [
        ("min", 1.0, 0.75, 0.7499),  # 25 % of |1.0| = 0.25: 0.75 only ties the margin
        ("max", 2.0, 2.5, 2.5001),  # 25 % of |2.0| = 0.5
        ("max", -2.0, -1.5, -1.4999),  # a negative best: the margin is 25 % of its magnitude, 0.5
        ("min", -2.0, -2.5, -2.5001),
    ],
)
def test_a_relative_margin_is_a_fraction_of_the_best_values_magnitude(mode, best, not_enough, enough):
    for value, improves in ((not_enough, False), (enough, True)):
        policy = PlateauSwitch(KEY, mode=mode, patience=1, min_delta=0.25, min_delta_mode="rel")
        policy.bind(TASKS, total=None, unit="step")
        policy.observe_validation(10, {KEY: torch.tensor(best)}, OneRank())
        policy.observe_validation(20, {KEY: torch.tensor(value)}, OneRank())
        assert (policy.decided_at is None) is improves, (value, policy.best_score)
        assert float(policy.best_score) == pytest.approx(value if improves else best)


def test_a_loss_that_keeps_falling_by_more_than_the_margin_never_decides_and_a_flattening_one_does():
    # 10 % lower each check against a 5 % margin: never a plateau. Then it flattens (2 % a check): the first
    # such check (index 10) starts the wait, the second (index 11) ends it with patience 2.
    falling = [0.9**k for k in range(10)]
    flattening = falling + [falling[-1] * 0.98**k for k in range(1, 6)]
    for values, expected in ((falling, None), (flattening, 11)):
        policy = PlateauSwitch(KEY, mode="min", patience=2, min_delta=0.05, min_delta_mode="rel")
        policy.bind(TASKS, total=None, unit="step")
        assert plateau_check(policy, [torch.tensor(v) for v in values]) == expected
    # An absolute margin of 0 (the EarlyStopping default) sees the 2 % gains as improvement: never decides.
    policy = PlateauSwitch(KEY, mode="min", patience=2)
    policy.bind(TASKS, total=None, unit="step")
    assert plateau_check(policy, [torch.tensor(v) for v in flattening]) is None


@pytest.mark.parametrize(
    ("patience_steps", "total", "decided"),
    [
        (None, None, 20),  # 2 checks alone: the second check after the best (step 0)
        (0, None, 20),
        (39, None, 40),  # checks every 10 steps: the first check at least 39 steps after the best
        (40, None, 40),  # exactly 40 steps after the best is enough
        (41, None, 50),
        (0.25, 200.0, 50),  # a fraction of the run: 50 steps
    ],
)
def test_patience_steps_makes_the_wait_last_a_time_as_well(patience_steps, total, decided):
    policy = PlateauSwitch(KEY, mode="min", patience=2, patience_steps=patience_steps)
    policy.bind(TASKS, total=total, unit="step")
    for t in range(0, 100, 10):  # the best at step 0, never improved on
        policy.observe_validation(t, {KEY: torch.tensor(1.0)}, OneRank())
    assert policy.best_time == 0 and policy.decided_at == decided


def test_patience_steps_counts_from_the_check_that_set_the_best():
    policy = PlateauSwitch(KEY, mode="min", patience=1, patience_steps=25)
    policy.bind(TASKS, total=None, unit="step")
    for t, value in [(0, 1.0), (10, 1.0), (20, 0.5), (30, 0.9), (40, 0.9)]:
        policy.observe_validation(t, {KEY: torch.tensor(value)}, OneRank())
        assert policy.decided_at is None  # 20 steps since the best at step 20: not yet 25
    assert (policy.best_time, policy.wait_count) == (20, 2)
    policy.observe_validation(50, {KEY: torch.tensor(0.9)}, OneRank())
    assert policy.decided_at == 50


def test_the_same_patience_steps_decides_alike_at_two_cadences():
    # One loss curve, sampled every 10 and every 25 steps: it improves by more than 5 % until step 100, then
    # by 1 % per 10 steps. patience_steps=50 decides at the first check 50 steps after the last real gain,
    # whatever the cadence; a patience of 2 checks alone would decide 20 steps after it at the fine cadence.
    def loss(step):
        return 0.8 ** (step / 10) if step <= 100 else 0.8**10 * 0.99 ** ((step - 100) / 10)

    def decision(every, patience_steps):
        policy = PlateauSwitch(
            KEY, mode="min", patience=2, patience_steps=patience_steps, min_delta=0.05, min_delta_mode="rel"
        )
        policy.bind(TASKS, total=400.0, unit="step")
        for t in range(0, 400, every):
            policy.observe_validation(t, {KEY: torch.tensor(loss(t))}, OneRank())
        return policy.best_time, policy.decided_at

    assert decision(10, 50) == decision(25, 50) == (100, 150)
    assert decision(10, None) == (100, 120) and decision(25, None) == (100, 150)


def test_a_fresh_fit_forgets_the_time_of_the_best_and_an_old_checkpoint_without_it_still_loads():
    policy = PlateauSwitch(KEY, patience=5, patience_steps=30)
    policy.bind(TASKS, total=None, unit="step")
    plateau_check(policy, [torch.tensor(1.0), torch.tensor(2.0)])
    assert policy.best_time == 0
    policy.bind(TASKS, total=None, unit="step")
    assert policy.best_time is None
    old = {k: v for k, v in policy.state_dict().items() if k != "best_time"}  # written before patience_steps
    policy.load_state_dict({**old, "wait_count": 1})
    assert policy.best_time is None and policy.wait_count == 1


@pytest.mark.filterwarnings("ignore:.*is not finite")
@SETTINGS
@given(
    values=sequences,
    mode=modes,
    patience=patiences,
    min_delta=min_deltas,
    min_delta_mode=st.sampled_from(["abs", "rel"]),
    patience_steps=st.sampled_from([None, 0, 15, 30]),  # checks come every 10 steps (plateau_check)
    cut=st.integers(0, 25),
)
def test_a_resume_mid_wait_decides_at_the_same_check(
    values, mode, patience, min_delta, min_delta_mode, patience_steps, cut
):
    cut = min(cut, len(values))
    if min_delta_mode == "rel":
        min_delta = min(min_delta, 0.5)  # a fraction of |best|, < 1
    kwargs = dict(
        mode=mode, patience=patience, min_delta=min_delta, min_delta_mode=min_delta_mode, patience_steps=patience_steps
    )
    uninterrupted = PlateauSwitch(KEY, **kwargs)
    uninterrupted.bind(TASKS, total=None, unit="step")
    expected = plateau_check(uninterrupted, values)

    first = PlateauSwitch(KEY, **kwargs)
    first.bind(TASKS, total=None, unit="step")
    decided = plateau_check(first, values[:cut])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # through a checkpoint's serialisation
    buffer.seek(0)
    resumed = PlateauSwitch(KEY, **kwargs)
    resumed.bind(TASKS, total=None, unit="step")  # a resumed fit binds, then gets the checkpoint's state
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.wait_count == first.wait_count and torch.equal(resumed.best_score, first.best_score)
    assert resumed.best_time == first.best_time
    if decided is None:
        decided = plateau_check(resumed, values[cut:], start=cut)
    assert decided == expected


def test_the_first_step_after_the_deciding_check_drops_every_active_head():
    policy = PlateauSwitch(KEY, mode="max", patience=2, gamma0={"recon": 0.5, "parity": 2.0})
    policy.bind(TASKS, total=100, unit="step")
    reduce = OneRank()
    for t, value in [(10, 0.5), (20, 0.6), (30, 0.6)]:
        policy.observe_validation(t, {KEY: torch.tensor(value)}, reduce)
        assert policy.finished(t, TASKS) == ()
        assert policy.weights(t, TASKS) == {"recon": 0.5, "parity": 2.0}
    assert policy.wait_count == 1 and policy.decided_at is None
    policy.observe_validation(40, {KEY: torch.tensor(0.55)}, reduce)  # the second check without improvement
    assert policy.decided_at == 40
    assert reduce.any_calls == [False, False, False, True]
    before = policy.state_dict()
    assert set(policy.finished(40, TASKS)) == set(TASKS)
    assert set(policy.finished(40, TASKS)) == set(TASKS)  # a question: asked twice, the same answer
    assert policy.state_dict() == before  # ...and no state changed by asking
    assert policy.finished(41, ()) == ()  # nothing left to drop
    # Decided once and for all: later checks neither undo it nor count on.
    policy.observe_validation(50, {KEY: torch.tensor(0.99)}, reduce)
    assert policy.decided_at == 40 and len(reduce.any_calls) == 4


def test_a_plateau_on_another_rank_is_a_plateau_on_every_rank():
    policy = PlateauSwitch(KEY, mode="min", patience=3)
    policy.bind(TASKS, total=None, unit="step")
    reduce = OtherRankPlateaued()
    policy.observe_validation(7, {KEY: torch.tensor(1.0)}, reduce)  # locally an improvement
    assert reduce.any_calls == [False]
    assert policy.decided_at == 7 and set(policy.finished(7, TASKS)) == set(TASKS)


def test_min_step_defers_the_drop_and_max_step_forces_it():
    policy = PlateauSwitch(KEY, mode="min", patience=1, min_step=0.2, max_step=80)
    policy.bind(TASKS, total=100, unit="step")
    reduce = OneRank()
    policy.observe_validation(5, {KEY: torch.tensor(1.0)}, reduce)
    policy.observe_validation(10, {KEY: torch.tensor(1.0)}, reduce)
    assert policy.decided_at == 10
    assert policy.finished(10, TASKS) == () and policy.finished(19, TASKS) == ()  # never before min_step = 20
    assert set(policy.finished(20, TASKS)) == set(TASKS) and set(policy.finished(21, TASKS)) == set(TASKS)

    never_plateaus = PlateauSwitch(KEY, mode="min", patience=1, max_step=0.5)
    never_plateaus.bind(TASKS, total=100, unit="step")
    for t in range(0, 50, 5):
        never_plateaus.observe_validation(t, {KEY: torch.tensor(-float(t))}, reduce)
        assert never_plateaus.finished(t, TASKS) == ()
    assert set(never_plateaus.finished(50, TASKS)) == set(TASKS)
    assert never_plateaus.decided_at is None
    # Forced by max_step: later checks no longer count (the heads are gone), and decide nothing.
    never_plateaus.observe_validation(55, {KEY: torch.tensor(0.0)}, reduce)
    never_plateaus.observe_validation(60, {KEY: torch.tensor(0.0)}, reduce)
    assert never_plateaus.decided_at is None


def test_nonfinite_values_never_become_the_best_and_count_as_no_improvement():
    policy = PlateauSwitch(KEY, mode="max", patience=2)
    policy.bind(TASKS, total=None, unit="step")
    reduce = OneRank()
    policy.observe_validation(0, {KEY: torch.tensor(0.5)}, reduce)
    with pytest.warns(UserWarning, match="not finite"):
        policy.observe_validation(
            1, {KEY: torch.tensor(math.inf)}, reduce
        )  # EarlyStopping would call this best
    assert float(policy.best_score) == 0.5 and policy.wait_count == 1
    policy.observe_validation(2, {KEY: torch.tensor(math.nan)}, reduce)
    assert policy.decided_at == 2


def test_a_monitor_never_logged_names_the_logged_keys():
    policy = PlateauSwitch("val/acc", mode="max")
    policy.bind(TASKS, total=None, unit="step")
    with pytest.raises(KeyError, match=r"'val/acc'.*Logged keys: 'val/loss', 'val/primary_metric'"):
        policy.observe_validation(
            3, {"val/loss": torch.tensor(1.0), "val/primary_metric": torch.tensor(0.5)}, OneRank()
        )


def test_a_fresh_fit_starts_a_fresh_count_and_a_resumed_one_keeps_it():
    policy = PlateauSwitch(KEY, patience=5)
    policy.bind(TASKS, total=None, unit="step")
    plateau_check(policy, [torch.tensor(1.0), torch.tensor(2.0)])
    assert policy.wait_count == 1
    state = policy.state_dict()
    policy.bind(TASKS, total=None, unit="step")  # a second fit() without a checkpoint
    assert policy.wait_count == 0 and math.isinf(float(policy.best_score))
    policy.bind(TASKS, total=None, unit="step")
    policy.load_state_dict(state)  # a resumed fit
    assert policy.wait_count == 1 and float(policy.best_score) == 1.0


def test_a_checkpoint_of_another_monitor_is_refused():
    state = PlateauSwitch("val/loss").state_dict()
    with pytest.raises(ValueError, match="monitored 'val/loss'.*resume with the settings"):
        PlateauSwitch("val/primary_metric", mode="max").load_state_dict(state)


# ------------------------------------------------------------------------------ bad input, early and clear
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs monitor="),
        ({"monitor": KEY, "mode": "maximum"}, "mode must be 'min' or 'max'"),
        ({"monitor": KEY, "patience": 0}, "patience must be an int >= 1"),
        ({"monitor": KEY, "patience": True}, "patience must be an int >= 1"),
        ({"monitor": KEY, "patience": 2.0}, "patience must be an int >= 1"),
        ({"monitor": KEY, "min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"monitor": KEY, "min_delta_mode": "relative"}, "min_delta_mode must be 'abs' .* or 'rel'"),
        ({"monitor": KEY, "min_delta": 1.0, "min_delta_mode": "rel"}, r"min_delta is a fraction of \|best\| and must be < 1"),
        ({"monitor": KEY, "min_step": 1.5}, "min_step=1.5: a float is a fraction"),
        ({"monitor": KEY, "patience_steps": 1.5}, "patience_steps=1.5: a float is a fraction"),
        ({"monitor": KEY, "patience_steps": -10}, "patience_steps must be >= 0"),
        ({"monitor": KEY, "max_step": -1}, "max_step must be >= 0"),
        ({"monitor": KEY, "max_step": "10"}, r"max_step must be an int \(step or epoch\) or a float in \(0, 1\)"),
        ({"monitor": KEY, "min_step": 50, "max_step": 10}, "min_step=50 lies after max_step=10"),
        ({"monitor": KEY, "gamma0": -1.0}, "gamma0 must be a finite number >= 0"),
    ],
)
def test_bad_parameters_fail_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PlateauSwitch(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "total", "match"),
    [
        ({"max_step": 100}, 100.0, "max_step resolves to step 100, at or beyond the run's end"),
        ({"patience_steps": 100}, 100.0, "patience_steps resolves to 100 steps, as long as the run or longer"),
        ({"patience_steps": 0.5}, None, "patience_steps=0.5 is a fraction of the run, but the run's length is unknown"),
        ({"max_step": 0.5}, None, "max_step=0.5 is a fraction of the run, but the run's length is unknown"),
        ({"min_step": 0.9, "max_step": 50}, 100.0, "min_step resolves to step 90, after max_step"),
        ({"gamma0": {"recon": 1.0}}, 100.0, r"gamma0 gives no value for auxiliary task 'parity'"),
        (
            {"gamma0": {"recon": 1.0, "parity": 1.0, "edges": 1.0}},
            100.0,
            r"unknown auxiliary task\(s\) \['edges'\]",
        ),
    ],
)
def test_a_plan_that_cannot_be_carried_out_fails_at_bind(kwargs, total, match):
    policy = PlateauSwitch(KEY, **kwargs)
    with pytest.raises(ValueError, match=match):
        policy.bind(TASKS, total=total, unit="step")


def test_defaults_are_early_stoppings():
    ours, theirs = inspect.signature(PlateauSwitch).parameters, inspect.signature(EarlyStopping).parameters
    for name in ("mode", "patience", "min_delta"):
        assert ours[name].default == theirs[name].default, name


def test_numpy_scalars_are_numbers():
    policy = PlateauSwitch(
        KEY,
        patience=np.int64(2),
        min_delta=np.float32(0.5),
        min_step=np.int32(3),
        max_step=np.float64(0.5),
        gamma0=np.float64(0.25),
    )
    policy.bind(TASKS, total=np.float64(10.0), unit="step")
    assert policy.patience == 2 and policy.weights(0, TASKS) == {"recon": 0.25, "parity": 0.25}
    assert policy.finished(5, TASKS) == TASKS


# ------------------------------------------------------------------------------ in a real fit
def scripted_model(scores):
    """The toy multi-task model, logging ``val/score = scores[epoch]`` in validation."""

    class Scripted(MultiTaskModel):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)
            self.log(KEY, scores[self.current_epoch], on_epoch=True, batch_size=batch["x"].shape[0])

    pl.seed_everything(0)
    return Scripted(MLPEncoder(in_features=16, hidden=32, depth=2), TOY_TASKS, primary="label", head_hidden=8)


class FirstStopSignal(pl.Callback):
    """The epoch at which a callback before this one first set ``trainer.should_stop``."""

    def __init__(self) -> None:
        self.epoch = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.should_stop and self.epoch is None and not trainer.sanity_checking:
            self.epoch = trainer.current_epoch


class MemoryLogger(Logger):
    """Keeps what is logged, as (step, metrics) rows."""

    name, version = "memory", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):
        pass


# Checks at the end of epochs 0..7: best 0.5 at epoch 2; no improvement at 3, 4, 5 (0.5 is not > 0.5).
SCORES = [0.1, 0.3, 0.5, 0.5, 0.45, 0.5, 0.6, 0.7]
BATCHES = 6  # toy_loader(): 96 samples, batch size 16


def plateau_fit(tmp_path, max_epochs, ckpt_path=None, extra=(), logger=False, unit="step"):
    mt2st = MT2STCallback("plateau", monitor=KEY, mode="max", patience=3, unit=unit)
    model = scripted_model(SCORES)
    trainer = toy_trainer(
        tmp_path,
        [mt2st, *extra],
        max_epochs=max_epochs,
        min_epochs=max_epochs,
        limit_val_batches=1,
        logger=logger,
        log_every_n_steps=1,
    )
    trainer.fit(model, toy_loader(), toy_loader(n=16), ckpt_path=ckpt_path)
    return mt2st, model, trainer


@pytest.mark.slow
def test_a_real_fit_switches_at_the_step_after_early_stopping_signals(tmp_path):
    early_stopping = EarlyStopping(KEY, mode="max", patience=3, check_on_train_epoch_end=False)
    signal = FirstStopSignal()
    logger = MemoryLogger()
    mt2st, model, trainer = plateau_fit(tmp_path, 8, extra=[early_stopping, signal], logger=logger)
    assert signal.epoch == 5  # EarlyStopping's verdict; min_epochs keeps the fit going past it
    switch_step = (signal.epoch + 1) * BATCHES
    assert mt2st.policy.decided_at == switch_step
    assert mt2st.drop_times == {"recon": switch_step, "parity": switch_step}
    assert model.active_tasks == ("label",) and trainer.global_step == 8 * BATCHES
    logged = {k: v for _, row in logger.rows for k, v in row.items() if k.startswith(SWITCH_STEP_PREFIX)}
    assert logged == {SWITCH_STEP_PREFIX + "recon": switch_step, SWITCH_STEP_PREFIX + "parity": switch_step}


@pytest.mark.slow
def test_with_unit_epoch_the_heads_leave_at_the_next_epoch(tmp_path):
    mt2st, model, _ = plateau_fit(tmp_path, 8, unit="epoch")
    assert mt2st.policy.decided_at == 5  # the check that ends epoch 5
    assert mt2st.drop_times == {"recon": 6, "parity": 6} and model.active_tasks == ("label",)


@pytest.mark.slow
def test_a_fit_resumed_mid_wait_switches_at_the_same_step(tmp_path):
    first, _, trainer = plateau_fit(tmp_path / "a", 4)  # checks at epochs 0..3: one check without improvement
    assert first.policy.wait_count == 1 and first.policy.decided_at is None
    trainer.save_checkpoint(tmp_path / "mid_wait.ckpt")
    resumed, model, _ = plateau_fit(tmp_path / "b", 8, ckpt_path=tmp_path / "mid_wait.ckpt")
    uninterrupted, _, _ = plateau_fit(tmp_path / "c", 8)
    assert resumed.drop_times == uninterrupted.drop_times == {"recon": 6 * BATCHES, "parity": 6 * BATCHES}
    assert resumed.policy.decided_at == uninterrupted.policy.decided_at
    assert model.active_tasks == ("label",)


def test_a_misspelled_monitor_stops_the_fit_naming_the_logged_keys(tmp_path):
    mt2st = MT2STCallback("plateau", monitor="val/scroe", mode="max")
    trainer = toy_trainer(tmp_path, [mt2st], max_epochs=1, limit_val_batches=1)
    with pytest.raises(KeyError, match=r"'val/scroe'.*Logged keys: .*'val/primary_metric'"):
        trainer.fit(toy_model(), toy_loader(), toy_loader(n=16))


# ------------------------------------------------------------------------------ under plain DDP
@pytest.mark.slow
def test_under_ddp_a_plateau_on_one_rank_switches_every_rank_at_the_same_step(tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_plateau.py"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # 128 samples over 2 ranks in batches of 16: 4 steps per epoch. Rank 1's value stops improving after epoch
    # 1, so its wait reaches patience 2 at the check ending epoch 3 (step 16); rank 0's never does.
    for state in ranks:
        assert state["world_size"] == 2 and state["global_step"] == 24
        assert state["decided_at"] == 16
        assert state["drop_times"] == {"recon": 16, "parity": 16}
        assert state["active"] == ("label",)
    assert ranks[0]["wait_count"] == 0 and ranks[1]["wait_count"] == 2  # only rank 1's own value said so
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"{name} differs between ranks"


# ------------------------------------------------------------------------------ from the Hydra app
def test_the_hydra_preset_monitors_the_apps_primary_validation_loss_with_a_relative_margin():
    # The values docs/strategies.md argues from the paper settings' measured validation curves.
    cfg = compose_train("strategy=plateau")
    callback = hydra.utils.instantiate(cfg.strategy)
    assert isinstance(callback.policy, PlateauSwitch)
    policy = callback.policy
    assert (
        policy.monitor,
        policy.mode,
        policy.patience,
        policy.patience_steps,
        policy.min_delta,
        policy.min_delta_mode,
    ) == (VAL_LOSS, "min", 2, 0.15, 0.05, "rel")


@pytest.mark.slow
def test_mt2st_train_switches_on_a_plateau(tmp_path):
    # Accuracy cannot improve by more than min_delta=1: the first check sets the best, the second (end of
    # epoch 1, step 8 of the smoke run's 4 batches per epoch) runs out of patience 1.
    cfg = compose_train(
        f"paths.output_dir={tmp_path}",
        "experiment=smoke",
        "strategy=plateau",
        f"strategy.monitor={VAL_PRIMARY_METRIC}",
        "strategy.mode=max",
        "strategy.min_delta_mode=abs",
        "strategy.patience_steps=null",
        "strategy.patience=1",
        "strategy.min_delta=1.0",
        "trainer.max_epochs=3",
    )
    summary = train(cfg)
    assert summary["strategy"] == "plateau"
    assert summary["drop_times"] == {"recon": 8, "edges": 8, "moments": 8}
    assert list(summary["phases"]) == ["digit+recon+edges+moments", "digit"]
