"""``ConflictSwitch`` (strategy="conflict") and its gradient helpers: each auxiliary task leaves once its gradient
on the shared features keeps opposing the primary task's."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import toy_loader, toy_model, toy_trainer
from tests.test_app import compose_train
from tests.test_ddp import run_ddp
from tests.test_plateau import MemoryLogger
from torch import nn
from torch.testing import assert_close

from mt2st_lightning import MT2STCallback, MT2STMixin
from mt2st_lightning.adaptive import gradient_alignment, gradient_cosines
from mt2st_lightning.names import SWITCH_STEP_PREFIX
from mt2st_lightning.policies.conflict import ConflictSwitch
from mt2st_lightning.step_record import StepRecord
from mt2st_lightning.app.train import train

SETTINGS = settings(max_examples=100, deadline=None)
TASKS = ("agree", "fight", "side")


class OneRank:
    def mean(self, value):
        return value

    def all(self, decision):
        return bool(decision)

    def any(self, decision):
        return bool(decision)


class TwoRanks(OneRank):
    """Averages this rank's statistics with a fixed tensor from another rank, as an all-reduce mean does."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def mean(self, value):
        return (value + self.other) / 2


# ------------------------------------------------------------------------------ the gradient helpers
def test_alignment_and_cosines_hand_computed():
    h = torch.randn(2, 3, requires_grad=True)
    a, b, c = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-2.0, 1.0, 0.0]), torch.tensor([-1.0, -2.0, 0.0])
    losses = [(h * a).sum(), (h * b).sum(), (h * c).sum(), torch.tensor(3.0)]  # the last has no gradient
    stats = gradient_alignment(losses, [h])
    # Each gradient is the coefficient row repeated for both samples: <g_a, g_b> = 2 * (a . b).
    assert_close(stats[0], torch.tensor([10.0, 0.0, -10.0, 0.0]))
    assert_close(stats[1], torch.tensor([10.0, 10.0, 10.0, 0.0]))
    cos = gradient_cosines(stats)
    assert cos.dtype == torch.float64
    assert_close(cos[:2], torch.tensor([0.0, -1.0], dtype=torch.float64))
    assert math.isnan(cos[2])  # a zero gradient has no direction
    assert h.grad is None  # measuring never touches .grad


def test_gradients_on_the_features_never_run_the_encoder_backward():
    encoder = nn.Linear(4, 8)
    calls = []
    encoder.weight.register_hook(lambda grad: calls.append(1))
    h = encoder(torch.randn(5, 4))
    heads = [nn.Linear(8, 1) for _ in range(3)]
    losses = [head(h).pow(2).mean() for head in heads]
    gradient_alignment(losses, [h])
    assert calls == []
    losses[0].backward()
    assert calls == [1]  # the hook works: an ordinary backward does reach the encoder


def test_a_loss_that_does_not_reach_the_features_names_its_task():
    h = torch.randn(3, 2, requires_grad=True)
    other = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="loss of task 'side' does not depend on the shared features"):
        gradient_alignment([h.sum(), other.sum()], [h], names=["label", "side"], what="shared features")


@SETTINGS
@given(
    coefficients=st.lists(st.floats(-10, 10), min_size=9, max_size=9),
    scale=st.sampled_from([1.0, 2.0**-8, 2.0**16]),
)
def test_cosines_lie_in_range_and_ignore_the_loss_scale(coefficients, scale):
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor(coefficients, dtype=torch.float64).reshape(3, 3)
    losses = [(h @ row).sum() for row in rows]
    plain = gradient_cosines(gradient_alignment(losses, [h]))
    scaled = gradient_cosines(gradient_alignment([loss * scale for loss in losses], [h]))
    finite = ~torch.isnan(plain)
    assert torch.equal(finite, ~torch.isnan(scaled))
    assert (plain[finite].abs() <= 1).all()
    assert_close(plain[finite], scaled[finite], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the policy
class Heads:
    """Shared features h and one linear loss per task whose gradient on h is a chosen direction."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.h = torch.randn(6, 4, generator=g, requires_grad=True)
        self.u = torch.randn(4, generator=g)
        self.v = torch.randn(4, generator=g)
        self.v = self.v - (self.v @ self.u) / (self.u @ self.u) * self.u  # orthogonal to u: cosine 0

    def record(
        self, directions: dict[str, torch.Tensor], loss_scale: float = 1.0, features=True
    ) -> StepRecord:
        losses = {"label": (self.h @ self.u).mean()}
        losses.update({task: (self.h @ d).mean() for task, d in directions.items()})
        total = sum(losses.values())
        return StepRecord(
            losses=losses, features=self.h if features else None, total=total, loss_scale=loss_scale
        )


def measure(policy: ConflictSwitch, record: StepRecord, t: int, dropped: set[str], reduce=None) -> tuple[str, ...]:
    """One step boundary at t, then (if the policy asks) one observed step: what it drops at t (added to
    ``dropped``, the tasks whose heads left, as the callback keeps them)."""
    active = tuple(task for task in TASKS if task not in dropped)
    done = tuple(policy.finished(t, active))
    assert tuple(policy.finished(t, active)) == done  # a question: asking again changes nothing
    dropped.update(done)
    policy.weights(t, tuple(task for task in active if task not in done))
    if policy.wants_step(t):
        policy.observe_step(t, record, reduce or OneRank())
    return done


def test_a_fighting_task_leaves_after_window_measurements_the_others_stay():
    heads = Heads()
    policy = ConflictSwitch(threshold=0.0, window=3, adapt_every=2)
    policy.bind(TASKS, total=None, unit="step")
    record = heads.record({"agree": heads.u * 0.5, "fight": -heads.u + 0.1 * heads.v, "side": heads.v})
    dropped, gone = {}, set()
    for t in range(12):
        fight_active = "fight" not in gone
        rec = record if fight_active else heads.record({"agree": heads.u * 0.5, "side": heads.v})
        for task in measure(policy, rec, t, gone):
            dropped[task] = t
    # Measured at steps 0, 2, 4: the third conflicting measurement is at step 4, the drop at the next boundary.
    assert dropped == {"fight": 5}
    assert policy.last_cosines["agree"] == pytest.approx(1.0)
    assert policy.last_cosines["fight"] < -0.9
    # The orthogonal task's cosine is 0 up to rounding, i.e. maybe just below the threshold 0: its count moves
    # on noise alone, so nothing is asserted about it beyond the value.
    assert abs(policy.last_cosines["side"]) < 1e-5
    assert policy.conflict_counts["agree"] == 0 and policy.conflict_counts["fight"] == 3


def test_one_agreeing_measurement_resets_the_count():
    heads = Heads()
    policy = ConflictSwitch(threshold=0.5, window=2, adapt_every=1)
    policy.bind(("agree",), total=None, unit="step")
    fights, agrees = heads.record({"agree": -heads.u}), heads.record({"agree": heads.u})
    for t, rec in enumerate([fights, agrees, fights, agrees, fights]):
        assert policy.finished(t, ("agree",)) == ()
        policy.weights(t, ("agree",))
        policy.observe_step(t, rec, OneRank())
    assert policy.conflict_counts == {"agree": 1}
    policy.observe_step(5, fights, OneRank())
    assert policy.finished(6, ("agree",)) == ("agree",)


def test_cosines_are_formed_after_the_ranks_average_their_statistics():
    heads = Heads()
    policy = ConflictSwitch(threshold=0.0, window=1, adapt_every=1)
    policy.bind(("fight",), total=None, unit="step")
    record = heads.record({"fight": -heads.u})  # locally: cosine -1
    local = gradient_alignment(list(record.losses.values()), [heads.h])
    # The other rank's gradients agree strongly (dot +3x the local one's size): the global cosine is positive.
    other = torch.stack([torch.stack([local[0, 0], -3 * local[0, 1]]), local[1]])
    policy.weights(0, ("fight",))
    policy.observe_step(0, record, TwoRanks(other))
    assert policy.last_cosines["fight"] == pytest.approx(1.0)  # (-1 + 3) / 2 over norms averaged to the same
    assert policy.conflict_counts["fight"] == 0 and policy.finished(1, ("fight",)) == ()


def test_an_overflowed_measurement_is_ignored():
    heads = Heads()
    policy = ConflictSwitch(threshold=0.0, window=1, adapt_every=1)
    policy.bind(("fight",), total=None, unit="step")
    policy.weights(0, ("fight",))
    policy.observe_step(0, heads.record({"fight": -heads.u}, loss_scale=math.inf), OneRank())
    assert policy.conflict_counts == {} and policy.last_cosines == {}
    assert policy.finished(1, ("fight",)) == ()


def test_a_zero_gradient_leaves_the_count_as_it_was():
    heads = Heads()
    policy = ConflictSwitch(threshold=0.0, window=2, adapt_every=1)
    policy.bind(("fight",), total=None, unit="step")
    policy.weights(0, ("fight",))
    policy.observe_step(0, heads.record({"fight": -heads.u}), OneRank())
    policy.observe_step(1, heads.record({"fight": torch.zeros(4)}), OneRank())
    assert math.isnan(policy.last_cosines["fight"]) and policy.conflict_counts == {"fight": 1}


def test_missing_features_say_how_to_hand_them_over():
    heads = Heads()
    policy = ConflictSwitch()
    policy.bind(("fight",), total=None, unit="step")
    policy.weights(0, ("fight",))
    with pytest.raises(RuntimeError, match=r"mt2st_loss\(losses, features=h\)"):
        policy.observe_step(0, heads.record({"fight": -heads.u}, features=False), OneRank())


def test_measures_every_adapt_every_steps_while_a_task_is_active():
    policy = ConflictSwitch(adapt_every=5)
    policy.bind(("side",), total=None, unit="step")
    policy.weights(0, ("side",))
    assert [t for t in range(12) if policy.wants_step(t)] == [0, 5, 10]
    policy.weights(12, ())
    assert not policy.wants_step(15)  # single-task: nothing left to measure


def test_a_resume_continues_the_counts():
    heads = Heads()
    record = heads.record({"fight": -heads.u})
    first = ConflictSwitch(window=3, adapt_every=1)
    first.bind(("fight",), total=None, unit="step")
    for t in range(2):
        measure_one(first, record, t)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ConflictSwitch(window=3, adapt_every=1)
    resumed.bind(("fight",), total=None, unit="step")  # a resumed fit binds, then gets the checkpoint's state
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    resumed.weights(2, ("fight",))
    assert resumed.conflict_counts == {"fight": 2}
    assert measure_one(resumed, record, 2) == ()
    assert measure_one(resumed, record, 3) == ("fight",)
    first.bind(("fight",), total=None, unit="step")  # a second fit without a checkpoint starts from 0
    assert first.conflict_counts == {} and first.finished(3, ("fight",)) == ()


def measure_one(policy: ConflictSwitch, record: StepRecord, t: int) -> tuple[str, ...]:
    done = tuple(policy.finished(t, ("fight",)))
    policy.weights(t, () if done else ("fight",))
    if policy.wants_step(t):
        policy.observe_step(t, record, OneRank())
    return done


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 1.5}, r"threshold must be a cosine in \[-1, 1\]"),
        ({"threshold": "0"}, r"threshold must be a cosine"),
        ({"window": 0}, "window must be an int >= 1"),
        ({"window": 2.0}, "window must be an int >= 1"),
        ({"adapt_every": True}, "adapt_every must be an int >= 1"),
        ({"gamma0": math.nan}, "gamma0 must be a finite number >= 0"),
    ],
)
def test_bad_parameters_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConflictSwitch(**kwargs)


def test_numpy_scalars_are_numbers():
    policy = ConflictSwitch(
        threshold=np.float32(-0.25), window=np.int64(2), adapt_every=np.int32(3), gamma0=np.float64(2)
    )
    policy.bind(("side",), total=None, unit="step")
    assert (policy.threshold, policy.window, policy.adapt_every) == (-0.25, 2, 3)
    assert policy.weights(0, ("side",)) == {"side": 2.0}


# ------------------------------------------------------------------------------ in a real fit
class Opposed(MT2STMixin, pl.LightningModule):
    """A primary head and two copies of it: ``twin`` learns the same task (its gradient on the features is the
    primary's), ``anti`` ascends it (its gradient is the primary's, negated)."""

    def __init__(self, hand_features: bool = True) -> None:
        super().__init__()
        pl.seed_everything(0)
        self.hand_features = hand_features
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        label = nn.Linear(32, 3)
        self.heads = nn.ModuleDict(
            {"label": label, "twin": copy.deepcopy(label), "anti": copy.deepcopy(label)}
        )
        self.declare_tasks(primary="label", heads=self.heads)

    def training_step(self, batch, batch_idx):
        h = self.encoder(batch["x"].flatten(1))
        losses = {}
        for task in self.active_tasks:
            loss = F.cross_entropy(self.heads[task](h), batch["label"])
            losses[task] = -loss if task == "anti" else loss
        return self.mt2st_loss(losses, features=h) if self.hand_features else self.mt2st_loss(losses)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_real_fit_drops_the_task_whose_gradient_opposes_the_primary(tmp_path):
    mt2st = MT2STCallback("conflict", threshold=0.0, window=3, adapt_every=2)
    logger = MemoryLogger()
    model = Opposed()
    trainer = toy_trainer(tmp_path, [mt2st], max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(model, toy_loader())
    # Measured at steps 0, 2, 4 (cosine about -1 each time); dropped at the next step boundary.
    assert mt2st.drop_times == {"anti": 5}
    assert model.active_tasks == ("label", "twin")
    assert mt2st.policy.last_cosines["anti"] < -0.9
    assert mt2st.policy.last_cosines["twin"] == pytest.approx(1.0)  # twin and primary heads train identically
    logged = {k: v for _, row in logger.rows for k, v in row.items() if k.startswith(SWITCH_STEP_PREFIX)}
    assert logged == {SWITCH_STEP_PREFIX + "anti": 5}
    # Each measurement's cosines reach the loggers at its step: both tasks at 0, 2, 4; then twin alone.
    cosines = [(step, row) for step, row in logger.rows if any(k.startswith("mt2st/conflict/cosine/") for k in row)]
    assert [step for step, _ in cosines] == list(range(0, trainer.global_step, 2))
    assert all(row["mt2st/conflict/cosine/anti"] < -0.9 for step, row in cosines if step <= 4)
    assert all("mt2st/conflict/cosine/anti" not in row for step, row in cosines if step > 4)
    assert all(row["mt2st/conflict/cosine/twin"] == pytest.approx(1.0) for _, row in cosines)


def test_the_app_model_hands_its_features_over(tmp_path):
    mt2st = MT2STCallback("conflict", threshold=-1.0, window=1, adapt_every=1)  # cosine < -1 never happens
    trainer = toy_trainer(tmp_path, [mt2st], max_epochs=1, limit_train_batches=2)
    trainer.fit(toy_model(), toy_loader())
    assert set(mt2st.policy.last_cosines) == {"recon", "parity"}
    assert all(-1.0 <= c <= 1.0 for c in mt2st.policy.last_cosines.values())


def test_a_module_without_features_is_told_how_to_hand_them_over(tmp_path):
    trainer = toy_trainer(
        tmp_path, [MT2STCallback("conflict", adapt_every=1)], max_epochs=1, limit_train_batches=1
    )
    with pytest.raises(RuntimeError, match=r"mt2st_loss\(losses, features=h\)"):
        trainer.fit(Opposed(hand_features=False), toy_loader())


@pytest.mark.slow
def test_mt2st_train_drops_conflicting_tasks(tmp_path):
    # threshold 1: every measured cosine is below it, so each task leaves after its first measurement (step 0).
    cfg = compose_train(
        f"paths.output_dir={tmp_path}",
        "experiment=smoke",
        "strategy=conflict",
        "strategy.threshold=1.0",
        "strategy.window=1",
        "strategy.adapt_every=1",
    )
    summary = train(cfg)
    assert summary["strategy"] == "conflict"
    assert summary["drop_times"] == {"recon": 1, "edges": 1, "moments": 1}


@pytest.mark.slow
def test_under_ddp_both_ranks_drop_the_same_task_at_the_same_step(tmp_path):
    # The toy tasks' cosines lie near 0, where each rank's own batch would often say otherwise than the other's:
    # only statistics averaged before the cosine is formed keep the ranks' drops in step (without that, the
    # ranks rebuild their DDP reducers over different parameters and the run hangs).
    result = run_ddp(tmp_path, "conflict", "threshold=0.0", "window=2", "adapt_every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["drop_times"] == ranks[1]["drop_times"] != {}
    assert ranks[0]["active"] == ranks[1]["active"] != ("label",)  # dropped per task: one is still active
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 12
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"{name} differs between ranks"


def test_a_measurement_reads_the_device_once():
    spec = importlib.util.spec_from_file_location(
        "sync_probe", Path(__file__).parents[1] / "benchmarks" / "sync_probe.py"
    )
    sync_probe = sys.modules.setdefault("sync_probe", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sync_probe)
    heads = Heads()
    policy = ConflictSwitch(window=2, adapt_every=1)
    policy.bind(TASKS, total=None, unit="step")
    policy.weights(0, TASKS)
    record = heads.record({"agree": heads.u, "fight": -heads.u, "side": heads.v})
    with sync_probe.count_syncs() as counter:
        policy.observe_step(0, record, OneRank())
    assert counter.total == 1, counter.where
