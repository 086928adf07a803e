"""The policies on their own: a fake single-process reducer, hand-made step records, no Trainer."""

from __future__ import annotations

import dataclasses
import math
import pickle
import typing

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.testing import assert_close

from mt2st_lightning import adaptive
from mt2st_lightning.policies import (
    ADAPTIVE_STRATEGIES,
    REGISTRY,
    STRATEGIES,
    FisherPolicy,
    GradNormPolicy,
    MeasuredPolicy,
    NoisePolicy,
    Policy,
    SchedulePolicy,
    policy_for,
    schedules_for,
)
from mt2st_lightning.policies.params import parameters_of
from mt2st_lightning.schedules import Constant, Diminish, Product, Schedule, Switch
from mt2st_lightning.step_record import StepRecord

SETTINGS = settings(max_examples=60, deadline=None)
AUX = ("a", "b")


class LocalReducer:
    """One process: every reduction is the identity. ``other`` simulates a second rank for ``mean``."""

    def __init__(self, other: Tensor | None = None) -> None:
        self.other = other
        self.calls = 0

    def mean(self, value: Tensor) -> Tensor:
        self.calls += 1
        return value if self.other is None else (value + self.other.to(value)) / 2

    def all(self, decision: bool) -> bool:
        return decision

    def any(self, decision: bool) -> bool:
        return decision


class Net(nn.Module):
    """A shared encoder and three heads: ``p`` (primary), ``a``, ``b``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in ("p", *AUX)})

    def record(self, x: Tensor, scale: float = 1.0, zero: tuple[str, ...] = (), with_features: bool = True) -> StepRecord:
        h = self.encoder(x)
        losses = {}
        for task, head in self.heads.items():
            losses[task] = torch.zeros(()) if task in zero else head(h).pow(2).mean()
        total = sum(losses.values())
        return StepRecord(losses=losses, features=h if with_features else None, total=total, loss_scale=scale)


def _bound(policy: Policy, total: float | None = 100, tasks=AUX) -> Policy:
    policy.bind(tasks, total, "step")
    return policy


def _sq(record: StepRecord, inputs) -> dict[str, float]:
    return {t: float(sum(g.pow(2).sum() for g in torch.autograd.grad(v, inputs, retain_graph=True))) for t, v in record.losses.items()}


def _step(policy: Policy, t: int, record: StepRecord, reduce=None) -> dict[str, float]:
    """One optimizer step as the callback runs it: weights at the boundary, then the measurement if wanted."""
    w = policy.weights(t, AUX)
    if policy.wants_step(t):
        policy.observe_step(t, record, reduce or LocalReducer())
    return w


# ---------------------------------------------------------------------------------------------- names
def test_strategy_names_exist_once():
    # The registry is the one list of strategies: names, the README's order, the adaptive ones.
    assert STRATEGIES == tuple(REGISTRY)
    assert ADAPTIVE_STRATEGIES == tuple(name for name, cls in REGISTRY.items() if issubclass(cls, MeasuredPolicy))
    assert {"stl", "mtl", "diminish", "switch", "gradnorm", "fisher", "noise", "plateau", "conflict"} <= set(STRATEGIES)
    import mt2st_lightning
    import mt2st_lightning.schedules

    assert mt2st_lightning.STRATEGIES is STRATEGIES
    assert not hasattr(mt2st_lightning.schedules, "STRATEGIES")  # schedules.py is just schedules


# The parameters each strategy needs to be built at all (everything else has a default).
REQUIRED = {"switch": {"switch_at": 10}, "plateau": {"monitor": "val/loss"}}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_registered_strategy_is_a_typed_policy_class(name):
    cls = REGISTRY[name]
    assert isinstance(cls, type) and issubclass(cls, Policy) and cls.name == name
    policy = policy_for(name, **REQUIRED.get(name, {}))
    assert type(policy) is cls and policy.name == name
    # Its parameters are its typed keyword arguments: the one place the strategy declares them.
    hints = typing.get_type_hints(cls.__init__)
    for param in parameters_of(cls):
        assert param in hints, f"{cls.__name__}({param}=...) has no type: LightningCLI could not check it"
    # A class built directly is the same policy (the Lightning-native `policy: {class_path: ...}` form).
    direct = cls(**REQUIRED.get(name, {}))
    assert type(direct) is cls and direct.state_dict().keys() == policy.state_dict().keys()


def test_policy_for_builds_each_strategy():
    kinds = {"gradnorm": GradNormPolicy, "fisher": FisherPolicy, "noise": NoisePolicy}
    for name, kind in kinds.items():
        assert type(policy_for(name)) is kind
    for name in ("stl", "mtl", "diminish", "switch"):
        assert isinstance(policy_for(name, **REQUIRED.get(name, {})), SchedulePolicy)
    assert policy_for("plateau", monitor="val/loss").name == "plateau"
    assert policy_for("conflict").name == "conflict"
    custom = policy_for(None, schedules={"a": Constant(0.5)})
    assert type(custom) is SchedulePolicy and custom.name == "custom"


def test_policy_defaults():
    g = policy_for("gradnorm")
    assert (g.budget, g.adapt_every, g.adapt_decay, g.measure_on) == (1.0, 10, 0.9, "auto")
    _bound(g)
    assert g.schedules == {"a": Constant(1.0), "b": Constant(1.0)}
    d = _bound(policy_for("diminish"))
    assert d.schedules["a"] == Diminish(gamma0=1.0, eta=0.01, nu=1.0, prune_below=None)


@pytest.mark.parametrize(
    ("strategy", "params", "named"),
    [
        ("mtl", dict(switch_at=10), "switch_at"),
        ("diminish", dict(switch_at=10), "switch_at"),
        ("diminish", dict(switch_at=10, prune_below=0.1), "switch_at"),
        ("switch", dict(switch_at=10, eta=0.1), "eta"),
        ("switch", dict(switch_at=10, prune_below=0.1), "prune_below"),
        ("switch", dict(switch_at=10, budget=2.0), "budget"),
        ("stl", dict(gamma0=1.0), "gamma0"),
        ("mtl", dict(adapt_every=5), "adapt_every"),
        ("gradnorm", dict(eta=0.1), "eta"),
        ("fisher", dict(prune_below=0.1), "prune_below"),
        ("noise", dict(measure_on="representation"), "measure_on"),
        ("plateau", dict(monitor="val/loss", budget=1.0), "budget"),
    ],
)
def test_ignored_parameters_are_errors_naming_them(strategy, params, named):
    with pytest.raises(ValueError, match=rf"strategy='{strategy}' ignores {named}"):
        policy_for(strategy, **params)


def test_schedules_with_parameters_they_would_ignore():
    with pytest.raises(ValueError, match="got both strategy='switch' and schedules"):
        policy_for("switch", schedules={"a": Constant(1.0)})
    with pytest.raises(ValueError, match="ignores gamma0"):
        policy_for(None, schedules={"a": Constant(1.0)}, gamma0=2.0)
    with pytest.raises(ValueError, match="ignores switch_at"):
        policy_for("gradnorm", schedules={"a": Constant(1.0)}, switch_at=5)
    envelope = _bound(policy_for("fisher", schedules={"a": Switch(at=0.5), "b": Constant(2.0)}, budget=3.0))
    assert envelope.schedules == {"a": Switch(at=50), "b": Constant(2.0)} and envelope.budget == 3.0
    with pytest.raises(ValueError, match="give a strategy"):
        policy_for(None)
    with pytest.raises(ValueError, match=r"unknown MT2ST strategy 'swtich'; choose one of stl, mtl, diminish"):
        policy_for("swtich")


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (dict(adapt_every=True), "adapt_every must be an int >= 1"),
        (dict(adapt_every=0), "adapt_every must be an int >= 1"),
        (dict(adapt_every=2.0), "adapt_every must be an int >= 1"),
        (dict(adapt_decay=1.0), r"adapt_decay must be a number in \[0, 1\)"),
        (dict(adapt_decay=False), r"adapt_decay must be a number in \[0, 1\)"),
        (dict(budget=0.0), "budget must be a finite number > 0"),
        (dict(budget=math.inf), "budget must be a finite number > 0"),
        (dict(measure_on="encoder"), "measure_on must be 'auto', 'representation' or 'parameters'"),
        (dict(gamma0={"a": 1.0, "b": -1.0}), "gamma0 must be a finite number >= 0"),
        (dict(switch_at={"a": 1.5}), r"must lie in \(0, 1\)"),
    ],
)
def test_bad_values_fail_at_construction(params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        policy_for("fisher", **params)


def test_budget_none_is_gradnorm_only():
    assert policy_for("gradnorm", budget=None).budget is None
    assert policy_for("gradnorm", budget="raw").budget is None
    for name in ("fisher", "noise"):
        for raw in (None, "raw"):
            with pytest.raises(ValueError, match=f"applies to strategy='gradnorm' only, not '{name}'"):
                policy_for(name, budget=raw)
    with pytest.raises(ValueError, match="budget must be a finite number > 0, got 'rwa'"):
        policy_for("gradnorm", budget="rwa")


def test_numpy_scalars_are_accepted():
    g = policy_for(
        "gradnorm",
        adapt_every=np.int64(5),
        adapt_decay=np.float32(0.5),
        budget=np.float64(2.0),
        gamma0={"a": np.float32(0.5), "b": np.int32(1)},
        switch_at=np.int16(40),
    )
    assert (g.adapt_every, g.adapt_decay, g.budget) == (5, 0.5, 2.0) and type(g.adapt_every) is int
    _bound(g)
    assert g.schedules == {"a": Switch(at=40, gamma0=0.5), "b": Switch(at=40, gamma0=1)}
    d = _bound(policy_for("diminish", eta=np.float32(0.5), prune_below=np.float64(0.1), nu=np.int64(2)))
    assert d.schedules["a"] == Diminish(eta=0.5, prune_below=0.1, nu=2)


def test_policies_pickle():  # ddp_spawn pickles the callback, and with it the policy
    for name in STRATEGIES:
        params = {"switch": dict(switch_at=5), "plateau": dict(monitor="val/x")}.get(name, {})
        policy = policy_for(name, **params)
        assert type(pickle.loads(pickle.dumps(policy))) is type(policy)


# ------------------------------------------------------------------------------------ schedule policies
def test_schedule_policy_binds_a_fraction_once_and_refuses_a_switch_at_the_end():
    p = _bound(policy_for("switch", switch_at=0.25, gamma0=0.5), total=10)
    assert p.schedules == {"a": Switch(at=2, gamma0=0.5), "b": Switch(at=2, gamma0=0.5)}  # round(2.5) = 2
    assert p.weights(1, AUX) == {"a": 0.5, "b": 0.5} and p.finished(1, AUX) == []
    assert p.finished(2, AUX) == ["a", "b"] and p.weights(2, AUX) == {"a": 0.0, "b": 0.0}
    with pytest.raises(ValueError, match=r"the switch point 10 lies at the run's end \(10\)"):
        _bound(policy_for("switch", switch_at=10), total=10)
    with pytest.raises(ValueError, match="the run's length is unknown"):
        _bound(policy_for("switch", switch_at=0.5), total=None)


def test_schedule_policy_checks_task_names_at_bind():
    with pytest.raises(ValueError, match=r"switch_at names unknown auxiliary task\(s\) \['c'\]"):
        _bound(policy_for("switch", switch_at={"a": 1, "b": 2, "c": 3}))
    with pytest.raises(ValueError, match=r"cover exactly the module's auxiliary tasks \['a', 'b'\]: missing \['b'\]"):
        _bound(policy_for(None, schedules={"a": Constant(1.0)}))
    with pytest.raises(ValueError, match=r"unknown \['z'\]; missing \['b'\]"):
        _bound(policy_for(None, schedules={"a": Constant(1.0), "z": Constant(1.0)}))
    with pytest.raises(RuntimeError, match=r"bind\(tasks, total, unit\) must be called first"):
        policy_for("mtl").weights(0, AUX)
    with pytest.raises(TypeError, match="schedules must map task names to Schedule objects"):
        policy_for(None, schedules={"a": 1.0})


@SETTINGS
@given(
    at=st.integers(min_value=1, max_value=500) | st.floats(min_value=0.01, max_value=0.99),
    total=st.integers(min_value=600, max_value=5000),
    gamma0=st.floats(min_value=0.0, max_value=5.0),
    strategy=st.sampled_from(["switch", "gradnorm", "fisher", "noise"]),
)
def test_exact_at_the_switch_boundary(at, total, gamma0, strategy):
    policy = _bound(policy_for(strategy, switch_at=at, gamma0=gamma0), total=total)
    s = at if isinstance(at, int) else int(round(at * total))
    before, after = policy.weights(s - 1, AUX), policy.weights(s, AUX)
    share = 1.0 if strategy == "switch" else 0.5  # equal shares of budget 1 before any measurement
    assert before == {"a": gamma0 * share, "b": gamma0 * share}
    assert after == {"a": 0.0, "b": 0.0}
    assert policy.finished(s - 1, AUX) == ([] if gamma0 > 0 else list(AUX))
    assert policy.finished(s, AUX) == list(AUX)


@SETTINGS
@given(
    strategy=st.sampled_from(["stl", "mtl", "diminish", "switch"]),
    gamma0=st.floats(min_value=0.0, max_value=10.0),
    eta=st.floats(min_value=0.0, max_value=1.0),
    t=st.integers(min_value=0, max_value=10_000),
)
def test_schedule_policy_is_its_schedules(strategy, gamma0, eta, t):
    params = {
        "stl": {},
        "mtl": dict(gamma0=gamma0),
        "diminish": dict(gamma0=gamma0, eta=eta, prune_below=0.01),
        "switch": dict(gamma0=gamma0, switch_at=50),
    }[strategy]
    policy = _bound(policy_for(strategy, **params), total=20_000)
    schedules = schedules_for(strategy, AUX, **params)
    assert policy.weights(t, AUX) == {k: s(t, 20_000) for k, s in schedules.items()}
    assert policy.finished(t, AUX) == [k for k, s in schedules.items() if s.finished(t, 20_000)]
    assert all(w >= 0 for w in policy.weights(t, AUX).values())


def test_schedules_for_builds_each_kind():
    assert schedules_for("stl", AUX) == {"a": Constant(0.0), "b": Constant(0.0)}
    assert schedules_for("mtl", AUX, gamma0={"a": 0.0, "b": 0.7}) == {"a": Constant(0.0), "b": Constant(0.7)}
    assert schedules_for("diminish", AUX, eta={"a": 0.1, "b": 0.2})["b"] == Diminish(eta=0.2)
    assert schedules_for("switch", AUX, switch_at={"a": 10, "b": 0.5}) == {"a": Switch(at=10), "b": Switch(at=0.5)}
    assert schedules_for("envelope", AUX, switch_at={"a": 10, "b": None}, gamma0=0.3) == {
        "a": Switch(at=10, gamma0=0.3),
        "b": Constant(0.3),
    }
    with pytest.raises(ValueError, match="strategy='switch' needs switch_at"):
        schedules_for("switch", AUX, switch_at={"a": 5, "b": None})
    with pytest.raises(ValueError, match=r"eta gives no value for auxiliary task 'b'"):
        schedules_for("diminish", AUX, eta={"a": 0.1})
    with pytest.raises(ValueError, match="unknown schedule strategy 'gradnorm'"):
        schedules_for("gradnorm", AUX)
    with pytest.raises(ValueError, match=r"Diminish\.nu must be > 0"):
        schedules_for("diminish", AUX, nu={"a": 1.0, "b": 0.0})


# ---------------------------------------------------------------------------------- measured policies
def test_equal_shares_until_the_first_measurement_then_the_next_boundary():
    net = Net()
    policy = _bound(policy_for("fisher", adapt_every=1, adapt_decay=0.0, budget=2.0))
    record = net.record(torch.randn(8, 3))
    assert policy.weights(0, AUX) == {"a": 1.0, "b": 1.0}
    assert policy.wants_step(0)
    policy.observe_step(0, record, LocalReducer())
    assert not policy.wants_step(0)  # once per step
    # Within the step (an accumulation window) the weights cannot move, even if asked again.
    assert policy.weights(0, AUX) == {"a": 1.0, "b": 1.0}
    sq = _sq(record, [record.features])
    expected = adaptive.fisher_trace_weights(torch.tensor([sq["a"], sq["b"]], dtype=torch.float64), 2.0)
    assert_close(torch.tensor(list(policy.weights(1, AUX).values()), dtype=torch.float64), expected)
    assert abs(expected[0] - expected[1]) > 1e-3  # not the equal split by accident


def test_measures_on_the_first_of_every_adapt_every_steps():
    policy = _bound(policy_for("noise", adapt_every=3))
    net = Net()
    seen = []
    for t in range(10):
        policy.weights(t, AUX)
        if policy.wants_step(t):
            seen.append(t)
            policy.observe_step(t, net.record(torch.randn(4, 3)), LocalReducer())
    assert seen == [0, 3, 6, 9]
    policy.weights(10, ())  # every auxiliary task dropped: nothing left to measure
    assert not policy.wants_step(12)


@pytest.mark.parametrize("strategy", ["gradnorm", "fisher"])
def test_representation_mode_is_the_default_with_features(strategy):
    net = Net()
    policy = _bound(policy_for(strategy, adapt_every=1, adapt_decay=0.0))
    policy.use_shared_parameters(net.encoder.parameters())
    record = net.record(torch.randn(8, 3))
    policy.weights(0, AUX)
    policy.observe_step(0, record, LocalReducer())
    sq = _sq(record, [record.features])
    for task in ("p", *AUX):
        assert policy.stats[f"sqnorm/{task}"].item() == pytest.approx(sq[task], rel=1e-5)
    # measure_on="parameters" measures on the encoder instead, features or not.
    params = _bound(policy_for(strategy, adapt_every=1, adapt_decay=0.0, measure_on="parameters"))
    params.use_shared_parameters(net.encoder.parameters())
    params.weights(0, AUX)
    params.observe_step(0, record, LocalReducer())
    sq = _sq(record, list(net.encoder.parameters()))
    for task in ("p", *AUX):
        assert params.stats[f"sqnorm/{task}"].item() == pytest.approx(sq[task], rel=1e-5)
    assert all(p.grad is None for p in net.parameters())


def test_measuring_without_what_it_needs_is_a_clear_error():
    net = Net()
    no_features = net.record(torch.randn(4, 3), with_features=False)
    policy = _bound(policy_for("gradnorm", adapt_every=1))
    policy.weights(0, AUX)
    with pytest.raises(RuntimeError, match=r"call policy.use_shared_parameters\(module.shared_parameters\(\)\)"):
        policy.observe_step(0, no_features, LocalReducer())
    explicit = _bound(policy_for("gradnorm", measure_on="representation"))
    explicit.weights(0, AUX)
    with pytest.raises(ValueError, match=r"return self.mt2st_loss\(losses, features=h\)"):
        explicit.observe_step(0, no_features, LocalReducer())
    detached = dataclasses.replace(no_features, features=net.encoder(torch.randn(4, 3)).detach())
    with pytest.raises(ValueError, match="the features given to mt2st_loss do not require grad"):
        explicit.observe_step(0, detached, LocalReducer())
    other = dataclasses.replace(no_features, features=net.encoder(torch.randn(4, 3)))  # not the heads' input
    with pytest.raises(ValueError, match=r"the loss of task 'p' does not depend on the features given to mt2st_loss"):
        explicit.observe_step(0, other, LocalReducer())


@SETTINGS
@given(
    strategy=st.sampled_from(ADAPTIVE_STRATEGIES),
    budget=st.floats(min_value=0.1, max_value=10.0),
    decay=st.sampled_from([0.0, 0.5, 0.9]),
    seed=st.integers(min_value=0, max_value=2**16),
    steps=st.integers(min_value=1, max_value=5),
)
def test_weights_are_non_negative_and_sum_to_the_budget(strategy, budget, decay, seed, steps):
    net = Net(seed)
    policy = _bound(policy_for(strategy, adapt_every=1, adapt_decay=decay, budget=budget))
    g = torch.Generator().manual_seed(seed)
    for t in range(steps + 1):
        w = _step(policy, t, net.record(torch.randn(6, 3, generator=g) * (1 + t)))
        assert all(v >= 0 and math.isfinite(v) for v in w.values())
        assert sum(w.values()) == pytest.approx(budget, rel=1e-9)


@SETTINGS
@given(
    strategy=st.sampled_from(["gradnorm", "fisher"]),
    exponent=st.integers(min_value=-8, max_value=16),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_the_loss_scale_never_changes_a_weight(strategy, exponent, seed):
    # The scale changes from step to step (as GradScaler's does) while the statistics are smoothed: a scale
    # left in the statistics would mix differently scaled values and move the weights.
    net = Net(seed)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(6, 3, generator=g) * (1 + t) for t in range(3)]
    runs = []
    for scales in ((1.0, 1.0, 1.0), (2.0**exponent, 1.0, 2.0**-exponent)):
        budget = None if strategy == "gradnorm" else 1.0
        policy = _bound(policy_for(strategy, adapt_every=1, adapt_decay=0.5, budget=budget))
        weights = [_step(policy, t, net.record(x, scale=s)) for t, (x, s) in enumerate(zip(xs, scales))]
        runs.append((weights + [policy.weights(3, AUX)], policy.stats))
    (w0, stats0), (w1, stats1) = runs
    for a, b in zip(w0, w1):
        assert a == pytest.approx(b, rel=1e-5)
    for key in stats0:
        assert stats0[key].item() == pytest.approx(stats1[key].item(), rel=1e-5)


@pytest.mark.parametrize("strategy", ["gradnorm", "fisher"])
def test_an_overflowing_measurement_updates_no_statistic(strategy):
    net = Net()
    policy = _bound(policy_for(strategy, adapt_every=1, adapt_decay=0.5))
    _step(policy, 0, net.record(torch.randn(6, 3)))
    before = policy.state_dict()
    _step(policy, 1, net.record(torch.randn(6, 3), scale=1e30))  # scaled fp32 gradients overflow
    after = policy.state_dict()
    assert after["factors"] == before["factors"]
    assert after["stats"].keys() == before["stats"].keys()
    assert all(torch.equal(after["stats"][k], before["stats"][k]) for k in before["stats"])


def test_a_nan_loss_never_enters_the_noise_statistics():
    net = Net()
    policy = _bound(policy_for("noise", adapt_every=1, adapt_decay=0.5))
    for t in range(3):
        _step(policy, t, net.record(torch.randn(6, 3)))
    before = policy.state_dict()
    bad = net.record(torch.randn(6, 3))
    bad = dataclasses.replace(bad, losses={**bad.losses, "a": torch.tensor(float("nan"))})
    _step(policy, 3, bad)
    assert all(torch.equal(policy.stats[k], v) for k, v in before["stats"].items())
    assert policy.factors == before["factors"]
    _step(policy, 4, net.record(torch.randn(6, 3)))
    assert all(torch.isfinite(v).all() for v in policy.stats.values())
    w = policy.weights(5, AUX)
    assert w["a"] != pytest.approx(w["b"])  # not locked at equal shares


@pytest.mark.parametrize("strategy", ["gradnorm", "fisher"])
def test_a_zero_gradient_keeps_the_task_factor(strategy):
    net = Net()
    policy = _bound(policy_for(strategy, adapt_every=1, adapt_decay=0.0, budget=1.0))
    # First measurement with task b's loss constant (no labels in the batch): b keeps its equal share.
    _step(policy, 0, net.record(torch.randn(6, 3), zero=("b",)))
    w = policy.weights(1, AUX)
    assert w["b"] == pytest.approx(0.5) and w["a"] == pytest.approx(0.5)
    _step(policy, 1, net.record(torch.randn(6, 3)))
    measured = policy.weights(2, AUX)
    assert measured["a"] != pytest.approx(0.5)
    # A later zero gradient neither takes the whole budget nor loses it: b keeps its factor and statistic.
    b_stat = policy.stats["sqnorm/b"].clone()
    _step(policy, 2, net.record(torch.randn(6, 3), zero=("b",)))
    w = policy.weights(3, AUX)
    assert w["b"] == pytest.approx(measured["b"])
    assert w["a"] == pytest.approx(1.0 - measured["b"])
    assert torch.equal(policy.stats["sqnorm/b"], b_stat)


def test_gradnorm_budget_none_keeps_raw_ratios():
    net = Net()
    policy = _bound(policy_for("gradnorm", adapt_every=1, adapt_decay=0.0, budget=None))
    record = net.record(torch.randn(8, 3))
    assert policy.weights(0, AUX) == {"a": 1.0, "b": 1.0}
    _step(policy, 0, record)
    sq = _sq(record, [record.features])
    w = policy.weights(1, AUX)
    for task in AUX:
        assert w[task] == pytest.approx(math.sqrt(sq["p"]) / math.sqrt(sq[task]), rel=1e-5)


def test_noise_without_smoothing_uses_the_last_two_measurements():
    policy = _bound(policy_for("noise", adapt_every=1, adapt_decay=0.0, budget=1.0))
    values = [(1.0, 2.0), (3.0, 2.5), (2.0, 2.4)]

    def record(a: float, b: float) -> StepRecord:
        losses = {"p": torch.tensor(0.0), "a": torch.tensor(a), "b": torch.tensor(b)}
        return StepRecord(losses=losses, features=None, total=sum(losses.values()))

    _step(policy, 0, record(*values[0]))
    assert policy.weights(1, AUX) == {"a": 0.5, "b": 0.5}  # one sample: no variance yet
    for t, (prev, cur) in enumerate(zip(values, values[1:]), start=1):
        _step(policy, t, record(*cur))
        var = torch.tensor([((c - p) / 2) ** 2 for c, p in zip(cur, prev)], dtype=torch.float64)
        expected = adaptive.inverse_variance_weights(var, 1.0)
        assert list(policy.weights(t + 1, AUX).values()) == pytest.approx(expected.tolist(), rel=1e-5)  # float32 losses
    assert policy.weights(3, AUX)["b"] > 0.9  # b's loss barely moves: it gets most of the budget


@pytest.mark.parametrize("strategy", ADAPTIVE_STRATEGIES)
def test_measurements_are_averaged_across_ranks(strategy):
    net = Net()
    records = [net.record(torch.randn(8, 3)) for _ in range(2)]
    # The other rank's statistics: squared norms (p, a, b), or the auxiliary losses (a, b) for noise.
    other = torch.tensor([0.3, 0.05]) if strategy == "noise" else torch.tensor([4.0, 0.1, 9.0])
    reducer = LocalReducer(other)
    policy = _bound(policy_for(strategy, adapt_every=1, adapt_decay=0.5))
    for t, record in enumerate(records):
        _step(policy, t, record, reducer)
    assert reducer.calls == 2
    # The same statistics computed by hand, averaged with the other rank's, then smoothed.
    if strategy == "noise":
        mine = [torch.stack([r.losses[t].detach() for t in AUX]).double() for r in records]
    else:
        mine = [torch.tensor([v for v in _sq(r, [r.features]).values()], dtype=torch.float64) for r in records]
    mean = [(m + other.double()) / 2 for m in mine]
    smooth = 0.5 * mean[0] + 0.5 * mean[1]
    if strategy == "noise":
        sq = 0.5 * mean[0] ** 2 + 0.5 * mean[1] ** 2
        expected = adaptive.inverse_variance_weights(sq - smooth**2, 1.0)
    elif strategy == "fisher":
        expected = adaptive.fisher_trace_weights(smooth[1:], 1.0)
    else:
        expected = adaptive.grad_norm_ratio_weights(smooth[0], smooth[1:], 1.0)
    assert list(policy.weights(2, AUX).values()) == pytest.approx(expected.tolist(), rel=1e-4)
    assert abs(expected[0] - expected[1]) > 1e-3


@SETTINGS
@given(
    strategy=st.sampled_from(ADAPTIVE_STRATEGIES),
    decay=st.sampled_from([0.0, 0.7]),
    cut=st.integers(min_value=1, max_value=6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_state_dict_round_trip_resumes_exactly(strategy, decay, cut, seed):
    net = Net(seed)
    g = torch.Generator().manual_seed(seed)
    records = [net.record(torch.randn(5, 3, generator=g) * (t + 1)) for t in range(8)]

    def make():
        return _bound(policy_for(strategy, adapt_every=2, adapt_decay=decay, switch_at=7, budget=1.5))

    straight = make()
    expected = [_step(straight, t, r) for t, r in enumerate(records)]
    first = make()
    got = [_step(first, t, r) for t, r in enumerate(records[:cut])]
    state = pickle.loads(pickle.dumps(first.state_dict()))  # as a checkpoint stores it
    assert all(v.device.type == "cpu" for v in state["stats"].values())
    resumed = make()
    resumed.load_state_dict(state)
    got += [_step(resumed, t, r) for t, r in enumerate(records[cut:], start=cut)]
    assert got == expected
    assert resumed.finished(7, AUX) == list(AUX)


def test_schedule_policy_state_is_empty():
    policy = _bound(policy_for("switch", switch_at=3))
    assert policy.state_dict() == {}
    policy.load_state_dict({})
    assert policy.finished(3, AUX) == list(AUX)


def test_a_user_schedule_works_through_the_policy():
    class Halving(Schedule):
        def __call__(self, t, total=None):
            return 0.5 ** t

        def finished(self, t, total=None):
            return False

    policy = _bound(policy_for(None, schedules={"a": Halving(), "b": Halving() * Switch(at=3)}))
    assert policy.weights(2, AUX) == {"a": 0.25, "b": 0.25}
    assert policy.finished(3, AUX) == ["b"]
    assert isinstance(policy.schedules["b"], Product)


def test_each_fit_measures_afresh():
    net = Net()
    policy = _bound(policy_for("gradnorm", adapt_every=1))
    _step(policy, 0, net.record(torch.randn(6, 3)))
    assert policy.factors and policy.stats
    _bound(policy)  # the next fit (a resumed one loads its state after this)
    assert (policy.factors, policy.stats, policy.measured_at) == ({}, {}, None)
    assert policy.weights(0, AUX) == {"a": 0.5, "b": 0.5} and policy.wants_step(0)


def test_auto_measures_on_the_parameters_without_features():
    net = Net()
    record = net.record(torch.randn(8, 3), with_features=False)
    policy = _bound(policy_for("fisher", adapt_every=1, adapt_decay=0.0))
    policy.use_shared_parameters(net.encoder.parameters())
    _step(policy, 0, record)
    sq = _sq(record, list(net.encoder.parameters()))
    for task in ("p", *AUX):
        assert policy.stats[f"sqnorm/{task}"].item() == pytest.approx(sq[task], rel=1e-5)


@pytest.mark.parametrize("strategy", ["gradnorm", "noise", "conflict"])
def test_a_resume_inside_a_measured_time_does_not_measure_it_again(strategy):
    # unit="epoch" resumed from a mid-epoch checkpoint asks wants_step again for the same epoch.
    policy = policy_for(strategy, adapt_every=1)
    policy.bind(["a", "b"], 10.0, "epoch")
    policy.weights(3, ("a", "b"))
    policy.measured_at = 3  # as observe_step leaves it
    resumed = policy_for(strategy, adapt_every=1)
    resumed.bind(["a", "b"], 10.0, "epoch")
    resumed.load_state_dict(pickle.loads(pickle.dumps(policy.state_dict())))
    resumed.weights(3, ("a", "b"))
    assert not resumed.wants_step(3) and resumed.wants_step(4)


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", STRATEGIES)
def test_finished_is_a_question_for_every_strategy(name):
    # The callback asks finished() at every step boundary and at the start of a (resumed) fit: the answer must
    # not depend on how often it is asked, and asking must change no state.
    policy = _bound(policy_for(name, **REQUIRED.get(name, {})))
    before = policy.state_dict()
    for t in (0, 10, 50, 99, 10):
        first, second = policy.finished(t, AUX), policy.finished(t, AUX)
        assert list(first) == list(second), f"{name}: finished({t}) answered {first}, then {second}"
    assert _same_state(policy.state_dict(), before), f"{name}.finished() changed the policy's state"
