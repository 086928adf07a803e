"""Tests of the adaptive weight factors (MT2ST eqs. 13-15): hand-computed values, properties, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from mt2st_lightning.adaptive import (
    ema,
    fisher_trace_weights,
    grad_norm_ratio_weights,
    inverse_variance_weights,
    squared_grad_norms,
)

SETTINGS = settings(max_examples=200, deadline=None)

# ----------------------------------------------------------------------------------------------- strategies
positive = st.floats(min_value=1e-3, max_value=1e3)
budgets = st.floats(min_value=0.1, max_value=10.0)
scales = st.floats(min_value=1e-2, max_value=1e2)


def vectors(elements=positive, min_size=1, max_size=8):
    return st.lists(elements, min_size=min_size, max_size=max_size).map(
        lambda xs: torch.tensor(xs, dtype=torch.float64)
    )


def check_budget(weights: torch.Tensor, n: int, budget: float) -> None:
    assert weights.shape == (n,)
    assert torch.isfinite(weights).all()
    assert (weights >= 0).all()
    assert weights.sum().item() == pytest.approx(budget, rel=1e-9)


# -------------------------------------------------------------------------------------------- hand-computed
def test_grad_norm_ratio_raw_hand_computed():
    # ||g_0|| = sqrt(16) = 4; ||g_k|| = sqrt(4, 1, 64) = (2, 1, 8): ratios 4/2, 4/1, 4/8.
    primary = torch.tensor(16.0, dtype=torch.float64)
    aux = torch.tensor([4.0, 1.0, 64.0], dtype=torch.float64)
    assert_close(
        grad_norm_ratio_weights(primary, aux, budget=None, eps=0.0),
        torch.tensor([2.0, 4.0, 0.5], dtype=torch.float64),
    )
    # With the default eps = 1e-12 the ratios move by a relative 1e-12 at most.
    assert_close(
        grad_norm_ratio_weights(primary, aux, budget=None),
        torch.tensor([2.0, 4.0, 0.5], dtype=torch.float64),
        rtol=1e-10,
        atol=0.0,
    )
    # ratio = 3 / (0 + 1e-12) = 3e12 for a zero auxiliary gradient (the eps keeps it finite)
    zero = grad_norm_ratio_weights(
        torch.tensor(9.0, dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), None
    )
    assert zero.item() == pytest.approx(3e12, rel=1e-12)


def test_grad_norm_ratio_budget_hand_computed():
    # ratios proportional to 1/||g_k|| = (1/1, 1/2) -> shares (2/3, 1/3) of budget 1, (2, 1) of budget 3.
    primary = torch.tensor(25.0, dtype=torch.float64)
    aux = torch.tensor([1.0, 4.0], dtype=torch.float64)
    assert_close(
        grad_norm_ratio_weights(primary, aux, eps=0.0), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    )
    assert_close(
        grad_norm_ratio_weights(primary, aux, budget=3.0, eps=0.0),
        torch.tensor([2.0, 1.0], dtype=torch.float64),
    )


def test_fisher_trace_hand_computed():
    assert_close(fisher_trace_weights(torch.tensor([1.0, 3.0]), budget=2.0), torch.tensor([0.5, 1.5]))
    assert_close(fisher_trace_weights(torch.tensor([2.0, 0.0, 6.0])), torch.tensor([0.25, 0.0, 0.75]))
    # Negative estimates are clamped to 0.
    assert_close(fisher_trace_weights(torch.tensor([-5.0, 1.0])), torch.tensor([0.0, 1.0]))


def test_inverse_variance_hand_computed():
    # 1/1 : 1/4 = 4 : 1 -> (0.8, 0.2)
    v = torch.tensor([1.0, 4.0], dtype=torch.float64)
    assert_close(inverse_variance_weights(v, eps=0.0), torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert_close(
        inverse_variance_weights(v, budget=5.0, eps=0.0), torch.tensor([4.0, 1.0], dtype=torch.float64)
    )
    # a zero variance gets 1/eps = 1e8 against 1/(1 + 1e-8): almost the whole budget, but finite
    w = inverse_variance_weights(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert w[0].item() == pytest.approx(1e8 / (1e8 + 1.0), rel=1e-12)
    # negative variances (cancellation in E[x^2] - E[x]^2) count as 0
    assert_close(
        inverse_variance_weights(torch.tensor([-1e-9, 0.0], dtype=torch.float64)),
        torch.tensor([0.5, 0.5], dtype=torch.float64),
    )


def test_weights_keep_dtype_and_device():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([1.0, 2.0], dtype=dtype)
        assert fisher_trace_weights(x).dtype == dtype
        assert inverse_variance_weights(x).dtype == dtype
        assert grad_norm_ratio_weights(x[0], x).dtype == dtype


# ------------------------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("budget", [1.0, 0.3, 4.0])
def test_all_zero_shares_budget_equally(n, budget):
    expected = torch.full((n,), budget / n, dtype=torch.float64)
    zeros = torch.zeros(n, dtype=torch.float64)
    assert_close(fisher_trace_weights(zeros, budget), expected)
    assert_close(fisher_trace_weights(-torch.ones(n, dtype=torch.float64), budget), expected)  # clamped to 0
    # primary gradient 0: every ratio is 0
    assert_close(
        grad_norm_ratio_weights(
            torch.tensor(0.0, dtype=torch.float64), torch.ones(n, dtype=torch.float64), budget
        ),
        expected,
    )
    # infinite variances: every 1/variance is 0
    assert_close(inverse_variance_weights(torch.full((n,), math.inf, dtype=torch.float64), budget), expected)


def test_non_finite_shares_budget_equally():
    expected = torch.tensor([0.5, 0.5])
    assert_close(fisher_trace_weights(torch.tensor([math.nan, 1.0])), expected)
    assert_close(fisher_trace_weights(torch.tensor([math.inf, 1.0])), expected)
    assert_close(grad_norm_ratio_weights(torch.tensor(math.nan), torch.tensor([1.0, 2.0])), expected)


@pytest.mark.parametrize(
    "traces",
    [
        torch.tensor([1e-40]),  # float32: 1 / 1e-40 = inf
        torch.tensor([1e-40, 3e-40]),
        torch.tensor([5e-324], dtype=torch.float64),
    ],
)
def test_tiny_positive_total_still_sums_to_budget(traces):
    w = fisher_trace_weights(traces, 1.0)
    assert torch.isfinite(w).all()
    assert w.sum().item() == pytest.approx(1.0, rel=1e-5)


def test_fisher_weights_stay_finite_when_aux_gradients_vanish():
    # The callback's path: squared norms (float32) smoothed by ema, then fisher_trace_weights. If the
    # auxiliary gradients become exactly 0 the EMA decays into the float32 subnormals and stays at ~5.6e-45
    # (0.9 * x rounds back to x there), and budget / total overflows to inf from about step 850 on.
    state = None
    for step in range(1000):
        sq = torch.tensor([1.0, 2.0]) if step == 0 else torch.zeros(2)
        state = ema(state, sq, 0.9)
        w = fisher_trace_weights(state, 1.0)
        assert torch.isfinite(w).all(), f"step {step}: state={state.tolist()} weights={w.tolist()}"


def test_budget_none_is_not_normalised():
    r = grad_norm_ratio_weights(torch.tensor(0.0), torch.tensor([1.0, 4.0]), budget=None)
    assert_close(r, torch.tensor([0.0, 0.0]))  # no fallback without a budget


# ----------------------------------------------------------------------------------------------- properties
@SETTINGS
@given(primary=positive, aux=vectors(), budget=budgets)
def test_grad_norm_ratio_sums_to_budget(primary, aux, budget):
    w = grad_norm_ratio_weights(torch.tensor(primary, dtype=torch.float64), aux, budget)
    check_budget(w, aux.numel(), budget)


@SETTINGS
@given(traces=vectors(), budget=budgets)
def test_fisher_sums_to_budget(traces, budget):
    check_budget(fisher_trace_weights(traces, budget), traces.numel(), budget)


@SETTINGS
@given(variances=vectors(), budget=budgets)
def test_inverse_variance_sums_to_budget(variances, budget):
    check_budget(inverse_variance_weights(variances, budget), variances.numel(), budget)


@SETTINGS
@given(
    values=vectors(st.just(0.0) | positive),
    budget=budgets,
)
def test_fisher_with_zeros_sums_to_budget(values, budget):
    # Zeros mixed in (or all zero, the fallback): still non-negative and summing to the budget.
    w = fisher_trace_weights(values, budget)
    check_budget(w, values.numel(), budget)
    if values.sum() > 0:
        assert ((w == 0) == (values == 0)).all()


@SETTINGS
@given(primary=positive, aux=vectors(), budget=budgets, c=scales)
def test_grad_norm_ratio_scale_invariant(primary, aux, budget, c):
    p = torch.tensor(primary, dtype=torch.float64)
    assert_close(
        grad_norm_ratio_weights(p, c * aux, budget),
        grad_norm_ratio_weights(p, aux, budget),
        rtol=1e-8,
        atol=0,
    )
    # With a budget the primary norm cancels out: scaling it changes nothing either.
    assert_close(
        grad_norm_ratio_weights(c * p, aux, budget),
        grad_norm_ratio_weights(p, aux, budget),
        rtol=1e-8,
        atol=0,
    )


@SETTINGS
@given(primary=positive, aux=vectors(), budget=budgets)
def test_grad_norm_ratio_proportional_to_inverse_norm(primary, aux, budget):
    w = grad_norm_ratio_weights(torch.tensor(primary, dtype=torch.float64), aux, budget)
    product = w * aux.sqrt()  # gamma_k * ||g_k|| is the same for every k
    assert_close(product, torch.full_like(product, product[0].item()), rtol=1e-8, atol=0)
    raw = grad_norm_ratio_weights(torch.tensor(primary, dtype=torch.float64), aux, budget=None)
    assert_close(raw, math.sqrt(primary) / aux.sqrt(), rtol=1e-8, atol=0)


@SETTINGS
@given(traces=vectors(), budget=budgets, c=scales)
def test_fisher_scale_invariant(traces, budget, c):
    assert_close(
        fisher_trace_weights(c * traces, budget), fisher_trace_weights(traces, budget), rtol=1e-10, atol=0
    )


@SETTINGS
@given(variances=vectors(), budget=budgets, c=scales)
def test_inverse_variance_scale_invariant(variances, budget, c):
    # Exactly invariant without eps ...
    assert_close(
        inverse_variance_weights(c * variances, budget, eps=0.0),
        inverse_variance_weights(variances, budget, eps=0.0),
        rtol=1e-10,
        atol=0,
    )
    # ... and up to eps / min(variance) (<= 1e-8 / 1e-5 = 1e-3 here) with the default eps.
    assert_close(
        inverse_variance_weights(c * variances, budget),
        inverse_variance_weights(variances, budget),
        rtol=3e-3,
        atol=0,
    )


@SETTINGS
@given(variances=vectors(min_size=2), budget=budgets)
def test_inverse_variance_orders_inversely(variances, budget):
    w = inverse_variance_weights(variances, budget, eps=0.0)
    i, j = int(variances.argmin()), int(variances.argmax())
    assert w[i] >= w[j]
    assert_close(w * variances, torch.full_like(w, (w[0] * variances[0]).item()), rtol=1e-9, atol=0)


@SETTINGS
@given(value=positive, n=st.integers(min_value=1, max_value=8), budget=budgets, primary=positive)
def test_equal_inputs_equal_shares(value, n, budget, primary):
    x = torch.full((n,), value, dtype=torch.float64)
    expected = torch.full((n,), budget / n, dtype=torch.float64)
    assert_close(fisher_trace_weights(x, budget), expected, rtol=1e-12, atol=0)
    assert_close(inverse_variance_weights(x, budget), expected, rtol=1e-12, atol=0)
    assert_close(
        grad_norm_ratio_weights(torch.tensor(primary, dtype=torch.float64), x, budget),
        expected,
        rtol=1e-12,
        atol=0,
    )


@SETTINGS
@given(traces=vectors(min_size=2), budget=budgets)
def test_fisher_is_proportional_to_traces(traces, budget):
    w = fisher_trace_weights(traces, budget)
    assert_close(w, budget * traces / traces.sum(), rtol=1e-10, atol=0)


# --------------------------------------------------------------------------------------- squared_grad_norms
def _linear_setup():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    b = torch.nn.Parameter(torch.tensor(2.0))
    x = torch.tensor([4.0, 5.0, 6.0])
    return w, b, x


def test_squared_grad_norms_hand_computed():
    w, b, x = _linear_setup()
    l1 = (w * x).sum()  # d/dw = x = (4, 5, 6): 16 + 25 + 36 = 77
    l2 = (w**2).sum()  # d/dw = 2w = (2, 4, 6): 4 + 16 + 36 = 56
    l3 = (w * x).sum() + 3.0 * b  # 77 + 3^2 = 86
    out = squared_grad_norms([l1, l2, l3], [w, b])
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([77.0, 56.0, 86.0]))
    # only w measured: b's part of l3 does not count
    assert_close(squared_grad_norms([l3], [w]), torch.tensor([77.0]))


def test_squared_grad_norms_leaves_grad_and_graph():
    w, b, x = _linear_setup()
    loss = (w * x).sum() + b
    squared_grad_norms([loss, loss], [w, b])
    assert w.grad is None and b.grad is None
    loss.backward()  # the graph was retained
    assert_close(w.grad, x)
    assert_close(b.grad, torch.tensor(1.0))


def test_squared_grad_norms_does_not_add_to_existing_grad():
    w, _, x = _linear_setup()
    w.grad = torch.ones(3)
    squared_grad_norms([(w * x).sum()], [w])
    assert_close(w.grad, torch.ones(3))


def test_squared_grad_norms_loss_independent_of_params_is_zero():
    w, _, x = _linear_setup()
    head = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    unrelated = (head * 3.0).sum()  # depends on a head, not on the shared w
    out = squared_grad_norms([(w * x).sum(), unrelated], [w])
    assert_close(out, torch.tensor([77.0, 0.0]))
    assert out.dtype == torch.float32


def test_squared_grad_norms_constant_loss_is_zero():
    # e.g. an auxiliary loss that is torch.zeros(()) because the batch has no label for that task
    w, _, x = _linear_setup()
    out = squared_grad_norms([(w * x).sum(), torch.zeros(())], [w])
    assert_close(out, torch.tensor([77.0, 0.0]))


def test_squared_grad_norms_skips_frozen_params():
    w, b, x = _linear_setup()
    b.requires_grad_(False)
    assert_close(squared_grad_norms([(w * x).sum() + 5.0 * b], [w, b]), torch.tensor([77.0]))


def test_squared_grad_norms_applies_reduce():
    w, _, x = _linear_setup()
    seen = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return t / 2

    out = squared_grad_norms([(w * x).sum(), (w**2).sum()], [w], reduce)
    assert len(seen) == 1
    assert_close(seen[0], torch.tensor([77.0, 56.0]))
    assert_close(out, torch.tensor([38.5, 28.0]))


def test_squared_grad_norms_float64_loss():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    out = squared_grad_norms([(w * torch.tensor([3.0, 4.0], dtype=torch.float64)).sum()], [w])
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([25.0]))  # 9 + 16


@pytest.mark.parametrize(
    "params", [[], [torch.ones(2)], [torch.nn.Parameter(torch.ones(2), requires_grad=False)]]
)
def test_squared_grad_norms_without_trainable_params(params):
    loss = torch.nn.Parameter(torch.ones(())) * 2
    with pytest.raises(ValueError, match="no shared parameters that require grad to measure task gradients on"):
        squared_grad_norms([loss], params)


def test_squared_grad_norms_names_a_task_that_does_not_reach_the_inputs():
    w, _, x = _linear_setup()
    head = torch.nn.Parameter(torch.tensor([0.5, -1.0]))
    losses = [(w * x).sum(), (head * 3.0).sum()]
    # Unnamed: an unreachable input is a zero gradient (as before); named: an error naming the task.
    assert_close(squared_grad_norms(losses, [w]), torch.tensor([77.0, 0.0]))
    with pytest.raises(ValueError, match=r"the loss of task 'edges' does not depend on the features"):
        squared_grad_norms(losses, [w], names=["label", "edges"], what="features")
    # A constant loss (no labels of that task in the batch) stays a zero norm, named or not.
    assert_close(squared_grad_norms([(w * x).sum(), torch.zeros(())], [w], names=["a", "b"]), torch.tensor([77.0, 0.0]))


def test_squared_grad_norms_on_the_representation_runs_no_encoder_backward():
    calls = []

    class Probe(torch.autograd.Function):  # identity whose backward records that it ran
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            calls.append(1)
            return grad

    encoder = torch.nn.Linear(3, 4)
    heads = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 2)]
    h = Probe.apply(torch.tanh(encoder(torch.randn(5, 3))))  # the probe is the top of the encoder
    losses = [head(h).pow(2).mean() for head in heads]
    out = squared_grad_norms(losses, [h], names=["p", "a"], what="features")
    assert calls == []  # the encoder's backward never ran
    expected = [torch.autograd.grad(loss, h, retain_graph=True)[0].pow(2).sum() for loss in losses]
    assert_close(out, torch.stack(expected))
    assert all(p.grad is None for p in encoder.parameters())
    squared_grad_norms(losses, list(encoder.parameters()))
    assert len(calls) == 2  # the parameter mode: one encoder backward per task


@SETTINGS
@given(
    xs=st.lists(st.floats(min_value=-10.0, max_value=10.0), min_size=1, max_size=6),
    c=st.floats(min_value=-3.0, max_value=3.0),
)
def test_squared_grad_norms_of_linear_loss(xs, c):
    x = torch.tensor(xs, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(len(xs), dtype=torch.float64))
    # d/dw (c * <w, x>) = c * x
    out = squared_grad_norms([c * (w * x).sum()], [w])
    assert_close(out, torch.tensor([c * c * float((x * x).sum())], dtype=torch.float32), rtol=1e-5, atol=1e-5)
    assert w.grad is None


# ------------------------------------------------------------------------------------------------------ ema
def test_ema_first_value_as_is():
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    out = ema(None, v, 0.9)
    assert_close(out, torch.tensor([1.0, 2.0]))
    assert not out.requires_grad
    v.data.fill_(7.0)  # a copy, not a view of the input
    assert_close(out, torch.tensor([1.0, 2.0]))


def test_ema_hand_computed():
    assert ema(torch.tensor(2.0), torch.tensor(4.0), 0.9).item() == pytest.approx(2.2)  # 0.9*2 + 0.1*4
    # decay 0.5 over 4, 0, 8: 4 -> 0.5*4 + 0.5*0 = 2 -> 0.5*2 + 0.5*8 = 5
    state = None
    for value in (4.0, 0.0, 8.0):
        state = ema(state, torch.tensor(value), 0.5)
    assert state.item() == pytest.approx(5.0)
    assert ema(torch.tensor(3.0), torch.tensor(9.0), 0.0).item() == 9.0  # decay 0: the new value


def test_ema_detaches_new_value():
    v = torch.tensor(4.0, requires_grad=True)
    out = ema(torch.tensor(2.0), v * 1.0, 0.9)
    assert not out.requires_grad


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, math.nan])
def test_ema_bad_decay(decay):
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
        ema(None, torch.tensor(1.0), decay)
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\)"):
        ema(torch.tensor(0.0), torch.tensor(1.0), decay)


@SETTINGS
@given(
    prev=st.floats(min_value=-1e3, max_value=1e3),
    new=st.floats(min_value=-1e3, max_value=1e3),
    decay=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_ema_is_convex_combination(prev, new, decay):
    out = ema(torch.tensor(prev, dtype=torch.float64), torch.tensor(new, dtype=torch.float64), decay).item()
    assert out == pytest.approx(decay * prev + (1 - decay) * new, rel=1e-12, abs=1e-9)
    assert min(prev, new) - 1e-9 <= out <= max(prev, new) + 1e-9


@SETTINGS
@given(
    value=st.floats(min_value=-1e3, max_value=1e3),
    decay=st.floats(min_value=0.0, max_value=0.999),
    n=st.integers(1, 10),
)
def test_ema_of_constant_is_constant(value, decay, n):
    state = None
    for _ in range(n):
        state = ema(state, torch.tensor(value, dtype=torch.float64), decay)
    assert state.item() == pytest.approx(value, rel=1e-12, abs=1e-12)
