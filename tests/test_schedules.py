"""Tests of the pure weight schedules: exact values computed by hand, properties over many inputs, errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mt2st_lightning.schedules import Constant, Diminish, Product, Switch

SETTINGS = settings(max_examples=200, deadline=None)

# ----------------------------------------------------------------------------------------------- strategies
# Valid parameters, kept in ranges where t ** nu cannot overflow a float (t <= 2e4, nu <= 3).
gammas = st.floats(min_value=0.0, max_value=10.0)
positive_gammas = st.floats(min_value=1e-3, max_value=10.0)
etas = st.just(0.0) | st.floats(min_value=1e-300, max_value=2.0)
nus = st.floats(min_value=0.1, max_value=3.0)
fractions = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)
int_ats = st.integers(min_value=0, max_value=1000)
totals = st.integers(min_value=1, max_value=10_000) | st.integers(min_value=1, max_value=10_000).map(float)
times = st.integers(min_value=0, max_value=20_000) | st.floats(min_value=0.0, max_value=20_000.0)

constants = st.builds(Constant, gammas)
diminishes = st.builds(
    Diminish,
    gamma0=gammas,
    eta=etas,
    nu=nus,
    prune_below=st.none() | st.floats(min_value=1e-6, max_value=10.0),
)
switches = st.builds(Switch, at=int_ats | fractions, gamma0=gammas)
leaves = st.one_of(constants, diminishes, switches)
schedules = st.recursive(
    leaves,
    lambda children: st.lists(children, min_size=1, max_size=3).map(lambda fs: Product(tuple(fs))),
    max_leaves=6,
)


def ordered_times(draw_pair: tuple[float, float]) -> tuple[float, float]:
    return tuple(sorted(draw_pair))  # type: ignore[return-value]


time_pairs = st.tuples(times, times).map(ordered_times)


# ------------------------------------------------------------------------------------------------- Constant
def test_constant_values():
    assert Constant()(0) == 1.0
    assert Constant(2.5)(123, total=1000) == 2.5
    assert Constant(3)(7) == 3.0 and isinstance(Constant(3)(7), float)
    assert not Constant(1.0).finished(10**9)
    assert Constant(0.0).finished(0)
    assert Constant(0.0)(0) == 0.0


# ------------------------------------------------------------------------------------------ Diminish values
@pytest.mark.parametrize(
    ("t", "expected"),
    [
        # gamma0=2, eta=0.1, nu=0.5: 2 * exp(-0.1 * t ** 0.5)
        (0, 2.0),  # 2 * exp(0) = 2
        (4, 2.0 * math.exp(-0.2)),  # 4 ** 0.5 = 2 -> 2 * exp(-0.2) = 1.6374615061559636
        (100, 2.0 * math.exp(-1.0)),  # 100 ** 0.5 = 10 -> 2 * exp(-1) = 0.7357588823428847
    ],
)
def test_diminish_hand_computed(t, expected):
    assert Diminish(gamma0=2.0, eta=0.1, nu=0.5)(t) == pytest.approx(expected, rel=1e-12)


def test_diminish_hand_computed_literals():
    d = Diminish(gamma0=2.0, eta=0.1, nu=0.5)
    assert d(4) == pytest.approx(1.6374615061559636, rel=1e-12)
    assert d(100) == pytest.approx(0.7357588823428847, rel=1e-12)
    # nu=1, eta=0.01: plain exponential decay, exp(-1) at t=100, exp(-2) at t=200.
    e = Diminish(gamma0=1.0, eta=0.01, nu=1.0)
    assert e(100) == pytest.approx(0.36787944117144233, rel=1e-12)
    assert e(200) == pytest.approx(0.1353352832366127, rel=1e-12)
    # nu=2: 3 * exp(-0.5 * 2 ** 2) = 3 * exp(-2)
    assert Diminish(gamma0=3.0, eta=0.5, nu=2.0)(2) == pytest.approx(3 * 0.1353352832366127, rel=1e-12)
    # total does not matter for Diminish.
    assert d(4, total=10) == d(4, total=None) == d(4)


def test_diminish_defaults():
    d = Diminish()
    assert (d.gamma0, d.eta, d.nu, d.prune_below) == (1.0, 0.01, 1.0, None)
    assert d(100) == pytest.approx(math.exp(-1.0), rel=1e-12)
    assert not d.finished(10**6)
    assert d.prune_time() is None


def test_diminish_eta_zero_is_constant():
    d = Diminish(gamma0=1.5, eta=0.0, nu=0.7)
    assert [d(t) for t in (0, 1, 10, 10**6)] == [1.5] * 4
    assert not d.finished(10**6)


def test_diminish_gamma0_zero_is_finished_from_the_start():
    d = Diminish(gamma0=0.0)
    assert d.finished(0) and d(0) == 0.0


def test_diminish_prune_hand_computed():
    # 1 * exp(-0.01 * t) < 0.5  <=>  t > ln(2) / 0.01 = 69.31471805599453
    d = Diminish(gamma0=1.0, eta=0.01, nu=1.0, prune_below=0.5)
    assert d.prune_time() == pytest.approx(69.31471805599453, rel=1e-12)
    assert not d.finished(69) and d(69) == pytest.approx(math.exp(-0.69), rel=1e-12)
    assert d.finished(70) and d(70) == 0.0
    # nu=0.5: 2 * exp(-0.1 * sqrt(t)) < 2 * exp(-1)  <=>  sqrt(t) > 10  <=>  t > 100
    e = Diminish(gamma0=2.0, eta=0.1, nu=0.5, prune_below=2.0 * math.exp(-1.0))
    assert e.prune_time() == pytest.approx(100.0, rel=1e-9)
    assert not e.finished(99) and e.finished(101)


def test_diminish_prune_below_above_gamma0_is_finished_at_zero():
    d = Diminish(gamma0=1.0, eta=0.1, prune_below=2.0)
    assert d.prune_time() == 0.0
    assert d.finished(0) and d(0) == 0.0


def test_diminish_prune_at_threshold_is_not_finished():
    # "finished once the weight falls below prune_below": a weight equal to it is kept.
    d = Diminish(gamma0=0.5, eta=0.1, prune_below=0.5)
    assert not d.finished(0) and d(0) == 0.5
    assert d.prune_time() == 0.0  # ln(0.5 / 0.5) / 0.1 = 0
    assert d.finished(1) and d(1) == 0.0
    flat = Diminish(gamma0=0.5, eta=0.0, prune_below=0.5)
    assert not flat.finished(10**6) and flat(10**6) == 0.5
    assert flat.prune_time() is None


def test_diminish_prune_never_without_decay():
    assert Diminish(gamma0=1.0, eta=0.0, prune_below=0.5).prune_time() is None
    assert not Diminish(gamma0=1.0, eta=0.0, prune_below=0.5).finished(10**9)


# -------------------------------------------------------------------------------------- Diminish properties
@SETTINGS
@given(gamma0=gammas, eta=etas, nu=nus)
def test_diminish_starts_at_gamma0(gamma0, eta, nu):
    assert Diminish(gamma0=gamma0, eta=eta, nu=nu)(0) == gamma0


@SETTINGS
@given(gamma0=gammas, eta=etas, nu=nus, t=times)
def test_diminish_matches_formula(gamma0, eta, nu, t):
    expected = gamma0 * math.exp(-eta * float(t) ** nu)
    assert Diminish(gamma0=gamma0, eta=eta, nu=nu)(t) == pytest.approx(expected, rel=1e-12, abs=0.0)


@SETTINGS
@given(gamma0=positive_gammas, eta=st.floats(min_value=1e-3, max_value=2.0), nu=nus, ts=time_pairs)
def test_diminish_strictly_decays_when_not_underflowing(gamma0, eta, nu, ts):
    t1, t2 = ts
    d = Diminish(gamma0=gamma0, eta=eta, nu=nu)
    assert d(t1) >= d(t2)
    assert d(t2) <= gamma0


@SETTINGS
@given(
    gamma0=positive_gammas,
    eta=st.floats(min_value=1e-3, max_value=2.0),
    nu=st.floats(min_value=0.2, max_value=3.0),
    ratio=st.floats(min_value=0.01, max_value=0.99),
)
def test_diminish_prune_time_is_the_threshold(gamma0, eta, nu, ratio):
    prune_below = gamma0 * ratio
    d = Diminish(gamma0=gamma0, eta=eta, nu=nu, prune_below=prune_below)
    pt = d.prune_time()
    assert pt is not None and pt > 0
    # At prune_time the raw weight equals the threshold (up to rounding).
    assert d._raw(pt) == pytest.approx(prune_below, rel=1e-9)
    before, after = pt * (1 - 1e-6), pt * (1 + 1e-6)
    assert not d.finished(before) and d(before) >= prune_below
    assert d(before) == pytest.approx(gamma0 * math.exp(-eta * before**nu), rel=1e-12)
    assert d.finished(after) and d(after) == 0.0
    assert gamma0 * math.exp(-eta * after**nu) < prune_below


@SETTINGS
@given(
    gamma0=positive_gammas,
    eta=etas,
    nu=nus,
    prune_below=st.floats(min_value=1e-6, max_value=10.0),
    t=times,
)
def test_diminish_finished_iff_raw_below_threshold(gamma0, eta, nu, prune_below, t):
    d = Diminish(gamma0=gamma0, eta=eta, nu=nu, prune_below=prune_below)
    raw = gamma0 * math.exp(-eta * float(t) ** nu)
    # Stay clear of the float-rounding band around the threshold.
    assume(abs(raw - prune_below) > 1e-9 * prune_below)
    assert d.finished(t) == (raw < prune_below)
    assert d(t) == (0.0 if raw < prune_below else pytest.approx(raw, rel=1e-12))
    pt = d.prune_time()
    if pt is None:
        assert not d.finished(t)
    elif abs(t - pt) > 1e-6 * max(1.0, pt):
        assert d.finished(t) == (t > pt)


@pytest.mark.parametrize(
    ("eta", "nu"),
    [
        (3e-273, 0.5),  # (ln(2 / 1e-3) / 3e-273) ** 2 ~ (2.5e273) ** 2 ~ 6e546
        (1e-4, 0.01),  # (ln(2 / 1e-3) / 1e-4) ** 100 = 76009 ** 100 ~ 1e488
    ],
)
def test_diminish_prune_time_far_away_does_not_raise(eta, nu):
    d = Diminish(gamma0=2.0, eta=eta, nu=nu, prune_below=1e-3)
    pt = d.prune_time()
    # The crossing lies beyond the float range: inf (or any huge float) is the right answer, not an exception.
    assert pt is not None and pt >= 1e300
    assert not d.finished(1e6)


def test_diminish_large_t_pow_nu_does_not_raise():
    # t ** nu = (1e7) ** 50 = 1e350 overflows a float; the weight is exp(-huge) = 0 (underflow), not an error.
    d = Diminish(gamma0=1.0, eta=0.01, nu=50.0)
    assert d(10**7) == 0.0
    assert Diminish(gamma0=1.0, eta=0.01, nu=50.0, prune_below=1e-3).finished(10**7)


# --------------------------------------------------------------------------------------------------- Switch
def test_switch_hand_computed():
    s = Switch(at=10, gamma0=0.5)
    assert [s(t) for t in (0, 5, 9, 10, 11, 1000)] == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert [s.finished(t) for t in (0, 9, 10, 11)] == [False, False, True, True]
    assert Switch(at=3)(2) == 1.0  # default gamma0 = 1


def test_switch_fraction_hand_computed():
    s = Switch(at=0.25)
    assert s.switch_time(100) == 25
    assert s.switch_time(100.0) == 25 and isinstance(s.switch_time(100.0), int)
    assert s.switch_time(10) == 2  # 2.5 -> round() -> 2 (a tie; 0.25 * 10 is exactly 2.5)
    assert Switch(at=0.3).switch_time(10) == 3  # 0.3 * 10 = 3.0000000000000004
    assert Switch(at=0.37).switch_time(10) == 4  # 3.7 -> 4
    assert s(24, total=100) == 1.0 and s(25, total=100) == 0.0
    assert not s.finished(24, 100) and s.finished(25, 100)


def test_switch_at_zero_is_finished_from_the_start():
    assert Switch(at=0).finished(0) and Switch(at=0)(0) == 0.0


def test_switch_int_at_ignores_total():
    s = Switch(at=7)
    assert s.switch_time(None) == 7 == s.switch_time(1000)
    assert s(6, total=None) == 1.0 and s(7, total=None) == 0.0


@SETTINGS
@given(at=st.integers(min_value=1, max_value=10_000), gamma0=positive_gammas)
def test_switch_exact_at_boundary(at, gamma0):
    s = Switch(at=at, gamma0=gamma0)
    assert s(0) == gamma0
    assert s(at - 1) == gamma0 and not s.finished(at - 1)
    assert s(at) == 0.0 and s.finished(at)
    # Between the last step before and the switch point (a real-valued time still counts as before).
    assert s(at - 0.5) == gamma0


@SETTINGS
@given(at=fractions, total=totals, gamma0=positive_gammas)
def test_switch_fraction_resolves_to_rounded_product(at, total, gamma0):
    s = Switch(at=at, gamma0=gamma0)
    k = s.switch_time(total)
    assert isinstance(k, int)
    assert k == round(at * total)
    assert abs(k - at * total) <= 0.5
    assert 0 <= k <= total
    if k < total:
        s.validate(total)
    else:  # rounds up to the run's end, where time never gets: the switch would never happen
        with pytest.raises(ValueError, match="at the run's end"):
            s.validate(total)
    if k > 0:
        assert s(k - 1, total) == gamma0
    assert s(k, total) == 0.0 and s.finished(k, total)


# --------------------------------------------------------------------------------------------- any schedule
@SETTINGS
@given(schedule=schedules, total=totals, ts=time_pairs)
def test_weights_non_negative_and_non_increasing(schedule, total, ts):
    t1, t2 = ts
    w1, w2 = schedule(t1, total), schedule(t2, total)
    assert isinstance(w1, float)
    assert w1 >= 0.0 and w2 >= 0.0
    assert w1 >= w2


@SETTINGS
@given(schedule=schedules, total=totals, ts=time_pairs)
def test_finished_is_permanent_and_zero(schedule, total, ts):
    t1, t2 = ts
    if schedule.finished(t1, total):
        assert schedule.finished(t2, total)
        assert schedule(t1, total) == 0.0
        assert schedule(t2, total) == 0.0


@SETTINGS
@given(gamma0=positive_gammas, eta=etas, nu=nus, at=st.integers(min_value=1, max_value=1000))
def test_weight_at_zero_is_gamma0(gamma0, eta, nu, at):
    assert Diminish(gamma0=gamma0, eta=eta, nu=nu)(0) == gamma0
    assert Switch(at=at, gamma0=gamma0)(0) == gamma0
    assert Constant(gamma0)(0) == gamma0


# -------------------------------------------------------------------------------------------------- Product
def test_product_hand_computed():
    p = Diminish(gamma0=2.0, eta=0.1, nu=0.5) * Switch(at=50, gamma0=0.5)
    assert isinstance(p, Product)
    assert p(4) == pytest.approx(2.0 * math.exp(-0.2) * 0.5, rel=1e-12)  # 0.8187307530779818
    assert p(4) == pytest.approx(0.8187307530779818, rel=1e-12)
    assert p(49) > 0 and not p.finished(49)
    assert p(50) == 0.0 and p.finished(50)
    assert (Constant(2.0) * Constant(3.0))(0) == 6.0


def test_product_flattens():
    a, b, c, d = Constant(2.0), Diminish(), Switch(at=3), Constant(0.5)
    assert Product((a, Product((b, c)))).factors == (a, b, c)
    assert ((a * b) * c).factors == (a, b, c)
    assert (a * (b * c)).factors == (a, b, c)
    assert ((a * b) * (c * d)).factors == (a, b, c, d)
    assert Product([a, b]).factors == (a, b)  # a list is stored as a tuple
    assert not any(isinstance(f, Product) for f in Product((a * b, c * (d * a))).factors)


def test_product_with_non_schedule_is_a_type_error():
    with pytest.raises(TypeError):
        Diminish() * 2.0  # type: ignore[operator]
    with pytest.raises(TypeError):
        2.0 * Switch(at=3)  # type: ignore[operator]


def test_product_finished_by_any_factor():
    p = Constant(1.0) * Diminish(gamma0=1.0, eta=0.01, prune_below=0.5) * Switch(at=1000)
    assert not p.finished(60)
    assert p.finished(70) and p(70) == 0.0  # the Diminish factor is pruned (prune time ~69.3)
    q = Diminish(eta=0.0) * Switch(at=5)
    assert not q.finished(4) and q(4) == 1.0
    assert q.finished(5) and q(5) == 0.0


def test_product_validate_checks_every_factor():
    with pytest.raises(ValueError, match="beyond the run's end"):
        (Diminish() * Switch(at=200)).validate(100)
    (Diminish() * Switch(at=50)).validate(100)


@SETTINGS
@given(factors=st.lists(leaves, min_size=1, max_size=4), total=totals, t=times)
def test_product_is_product_of_factors(factors, total, t):
    p = Product(tuple(factors))
    expected = math.prod(f(t, total) for f in factors)
    assert p(t, total) == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert p.finished(t, total) == any(f.finished(t, total) for f in factors)
    if p.finished(t, total):
        assert p(t, total) == 0.0


@SETTINGS
@given(a=leaves, b=leaves, c=leaves, total=totals, t=times)
def test_product_is_associative(a, b, c, total, t):
    left, right = (a * b) * c, a * (b * c)
    assert left.factors == right.factors == (a, b, c)
    assert left(t, total) == right(t, total)
    assert left.finished(t, total) == right.finished(t, total)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: Diminish(gamma0=-1.0),
            ValueError,
            r"Diminish\.gamma0 must be a finite number >= 0, got -1\.0",
        ),
        (lambda: Diminish(eta=-0.1), ValueError, r"Diminish\.eta must be a finite number >= 0, got -0\.1"),
        (lambda: Diminish(nu=0.0), ValueError, r"Diminish\.nu must be > 0"),
        (lambda: Diminish(nu=0), ValueError, r"Diminish\.nu must be > 0"),
        (lambda: Diminish(nu=-1.0), ValueError, r"Diminish\.nu must be"),
        (lambda: Diminish(gamma0=math.nan), ValueError, r"Diminish\.gamma0 must be a finite number"),
        (lambda: Diminish(gamma0=math.inf), ValueError, r"Diminish\.gamma0 must be a finite number"),
        (lambda: Diminish(eta=math.inf), ValueError, r"Diminish\.eta must be a finite number"),
        (lambda: Diminish(nu=math.nan), ValueError, r"Diminish\.nu must be a finite number"),
        (lambda: Diminish(nu=math.inf), ValueError, r"Diminish\.nu must be a finite number"),
        (
            lambda: Diminish(prune_below=math.nan),
            ValueError,
            r"Diminish\.prune_below must be a finite number",
        ),
        (
            lambda: Diminish(prune_below=math.inf),
            ValueError,
            r"Diminish\.prune_below must be a finite number",
        ),
        (lambda: Diminish(prune_below=0.0), ValueError, r"Diminish\.prune_below must be > 0, or None"),
        (
            lambda: Diminish(prune_below=-0.5),
            ValueError,
            r"Diminish\.prune_below must be a finite number >= 0",
        ),
        (lambda: Diminish(gamma0="1"), TypeError, r"Diminish\.gamma0 must be a number, got '1'"),
        (lambda: Diminish(eta=True), TypeError, r"Diminish\.eta must be a number, got True"),
        (lambda: Constant(-1.0), ValueError, r"Constant\.value must be a finite number >= 0"),
        (lambda: Constant(math.nan), ValueError, r"Constant\.value must be a finite number >= 0"),
        (lambda: Constant(None), TypeError, r"Constant\.value must be a number"),
        (lambda: Switch(at=5, gamma0=-1.0), ValueError, r"Switch\.gamma0 must be a finite number >= 0"),
        (lambda: Switch(at=5, gamma0=math.inf), ValueError, r"Switch\.gamma0 must be a finite number >= 0"),
        (
            lambda: Switch(at=0.0),
            ValueError,
            r"Switch\.at=0\.0: a float is a fraction of the run and must lie in \(0, 1\)",
        ),
        (
            lambda: Switch(at=1.0),
            ValueError,
            r"Switch\.at=1\.0: a float is a fraction of the run and must lie in \(0, 1\)",
        ),
        (lambda: Switch(at=1.5), ValueError, r"must lie in \(0, 1\); pass an int for an absolute step"),
        (lambda: Switch(at=-0.5), ValueError, r"must lie in \(0, 1\)"),
        (lambda: Switch(at=math.nan), ValueError, r"must lie in \(0, 1\)"),
        (lambda: Switch(at=-1), ValueError, r"Switch\.at must be >= 0, got -1"),
        (
            lambda: Switch(at=True),
            TypeError,
            r"Switch\.at must be an int \(step or epoch\) or a float in \(0, 1\), got True",
        ),
        (lambda: Switch(at=False), TypeError, r"Switch\.at must be an int"),
        (lambda: Switch(at="10"), TypeError, r"Switch\.at must be an int"),
        (lambda: Switch(at=None), TypeError, r"Switch\.at must be an int"),
    ],
)
def test_bad_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("total", [None, math.inf])
def test_switch_fraction_needs_known_total(total):
    s = Switch(at=0.5)
    match = r"Switch\.at=0\.5 is a fraction of the run, but the run's length is unknown"
    with pytest.raises(ValueError, match=match):
        s.switch_time(total)
    with pytest.raises(ValueError, match=match):
        s(3, total)
    with pytest.raises(ValueError, match=match):
        s.finished(3, total)
    with pytest.raises(ValueError, match=match):
        s.validate(total)


def test_switch_validate_beyond_end():
    with pytest.raises(ValueError, match=r"the switch point 11 lies beyond the run's end \(10\)"):
        Switch(at=11).validate(10)
    with pytest.raises(ValueError, match=r"the switch point 500 lies beyond the run's end \(100\)"):
        Switch(at=500).validate(100.0)
    Switch(at=9).validate(10)
    with pytest.raises(ValueError, match=r"the switch point 10 lies at the run's end \(10\)"):
        Switch(at=10).validate(10)  # steps run 0..9: a switch at 10 never happens
    Switch(at=10**6).validate(None)  # unknown length: nothing to check
    Switch(at=10**6).validate(math.inf)
    Constant(1.0).validate(10)
    Diminish().validate(None)


@SETTINGS
@given(at=st.integers(min_value=0, max_value=10_000), total=st.integers(min_value=1, max_value=10_000))
def test_switch_validate_iff_within_run(at, total):
    s = Switch(at=at)
    if at >= total:
        with pytest.raises(ValueError, match="(beyond|at) the run's end"):
            s.validate(total)
    else:
        s.validate(total)


def test_schedules_are_immutable():
    d = Diminish()
    with pytest.raises(AttributeError):
        d.gamma0 = 2.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------- bind, NumPy scalars
def test_numpy_scalars_are_python_numbers():
    np = pytest.importorskip("numpy")
    sw = Switch(at=np.int64(7), gamma0=np.float32(0.5))
    assert sw == Switch(at=7, gamma0=0.5) and type(sw.at) is int and type(sw.gamma0) is float
    assert Switch(at=np.float64(0.25)).switch_time(100) == 25
    d = Diminish(gamma0=np.float32(2.0), eta=np.float16(0.5), nu=np.int32(1), prune_below=np.float64(0.1))
    assert d == Diminish(gamma0=2.0, eta=0.5, nu=1, prune_below=0.1)
    assert Constant(np.int8(3)) == Constant(3)
    with pytest.raises(TypeError, match="Switch.at must be an int"):
        Switch(at=True)
    with pytest.raises(TypeError, match="Constant.value must be a number"):
        Constant(np.bool_(True))


@SETTINGS
@given(at=fractions, total=st.integers(min_value=1, max_value=10_000), g=positive_gammas)
def test_bind_resolves_a_fraction_once(at, total, g):
    sw = Switch(at=at, gamma0=g)
    bound = sw.bind(total)
    assert bound == Switch(at=int(round(at * total)), gamma0=g) and isinstance(bound.at, int)
    # The bound schedule no longer depends on the run's length; before binding it did.
    for t in range(max(0, bound.at - 2), bound.at + 2):
        assert bound(t, None) == sw(t, total) and bound.finished(t, 3 * total) == sw.finished(t, total)
    assert bound.bind(5 * total) == bound
    product = (Diminish(eta=0.1) * sw).bind(total)
    assert product == Product((Diminish(eta=0.1), bound))
    assert Constant(0.5).bind(None) == Constant(0.5) and Diminish().bind(None) == Diminish()


def test_bind_needs_the_length_for_a_fraction():
    with pytest.raises(ValueError, match=r"run's length is unknown; set Trainer\(max_steps=...\)"):
        Switch(at=0.5).bind(None)
    assert Switch(at=5).bind(None) == Switch(at=5)
