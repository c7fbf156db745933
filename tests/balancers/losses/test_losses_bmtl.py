"""BMTL (Liang & Zhang; docs/method-notes.md §4.2): minimise Σ h(L_k) with h(z) = exp(z/T)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance

TASKS = ["a", "b", "c"]


def leaves(values):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(TASKS, values, strict=True)}


def model_gradient(balancer_kwargs=None, objective=None) -> torch.Tensor:
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS, scales={"b": 2.0})
    _, losses = toy_losses(model, x, y)
    if objective is not None:
        objective(losses).backward()
    else:
        taskbalance.make("bmtl", TASKS, **(balancer_kwargs or {})).backward(losses)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_gradient_equals_sum_of_exp_weights_times_task_gradients(temperature):
    """Test 1: ∇ Σ exp(L_k/T) = Σ exp(L_k/T)/T ∇L_k, against autograd of the literal objective."""
    got = model_gradient({"temperature": temperature})
    expected = model_gradient(objective=lambda ls: sum(torch.exp(v / temperature) for v in ls.values()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    record = taskbalance.make("bmtl", TASKS, temperature=temperature).backward(leaves([0.1, 0.7, 1.3]))
    expected_weights = torch.exp(torch.tensor([0.1, 0.7, 1.3]) / temperature) / temperature
    torch.testing.assert_close(record.weights, expected_weights)


def test_large_temperature_tends_to_uniform_weights():
    """Test 2: T → ∞ gives equal weighting (normalised weights → 1/K)."""
    values = [0.2, 1.0, 5.0]
    gaps = []
    for temperature in [1.0, 10.0, 100.0, 1e4]:
        w = taskbalance.make("bmtl", TASKS, temperature=temperature).backward(leaves(values)).weights
        gaps.append(float((w / w.sum() - 1 / 3).abs().max()))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3


def test_small_temperature_tends_to_the_largest_loss():
    """Test 3: T → 0 puts all the weight on argmax L (normalized mode, which does not overflow)."""
    values = [0.2, 1.0, 0.9]
    w = taskbalance.make("bmtl", TASKS, temperature=1e-3, mode="normalized").backward(leaves(values)).weights
    torch.testing.assert_close(w, torch.tensor([0.0, 3.0, 0.0]))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
def test_normalized_and_faithful_modes_give_parallel_gradients(temperature):
    """Test 4: same direction, only the step scale differs."""
    faithful = model_gradient({"temperature": temperature})
    normalized = model_gradient({"temperature": temperature, "mode": "normalized"})
    cosine = F.cosine_similarity(faithful, normalized, dim=0)
    torch.testing.assert_close(cosine, torch.tensor(1.0), rtol=0, atol=1e-5)
    record = taskbalance.make("bmtl", TASKS, mode="normalized").backward(leaves([0.1, 0.7, 1.3]))
    torch.testing.assert_close(record.weights.sum(), torch.tensor(3.0))


@pytest.mark.parametrize(
    ("transform", "match"),
    [(torch.log1p, "convex"), (torch.sqrt, "convex|finite"), (lambda z: -z, "increasing"),
     (lambda z: torch.exp(-z), "increasing"), (lambda z: torch.exp(100 * z), "finite"),
     (lambda z: z.sum(), "elementwise")],
)
def test_concave_decreasing_or_invalid_transforms_are_rejected(transform, match):
    """Test 5."""
    with pytest.raises(ValueError, match=match):
        taskbalance.make("bmtl", TASKS, transform=transform)


def test_custom_convex_transform_is_used_with_its_derivative_as_weight():
    def h(z):
        return z**2 + F.softplus(z)

    balancer = taskbalance.make("bmtl", TASKS, transform=h)
    losses = leaves([0.5, 1.0, 2.0])
    record = balancer.backward(losses)
    z = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(record.weights, 2 * z + torch.sigmoid(z))
    torch.testing.assert_close(torch.stack([losses[t].grad for t in TASKS]), record.weights)
    normalized_balancer = taskbalance.make("bmtl", TASKS, transform=h, mode="normalized")
    normalized = normalized_balancer.backward(leaves([0.5, 1.0, 2.0]))
    torch.testing.assert_close(normalized.weights, 3 * record.weights / record.weights.sum())


def test_normalized_mode_survives_losses_that_overflow_the_faithful_mode():
    losses = [200.0, 150.0, 1.0]
    with pytest.warns(RuntimeWarning, match="temperature"):  # exp(200) overflows float32: max-shifted
        faithful = taskbalance.make("bmtl", TASKS).backward(leaves(losses)).weights
    assert bool(torch.isfinite(faithful).all())
    normalized = taskbalance.make("bmtl", TASKS, mode="normalized").backward(leaves(losses)).weights
    assert bool(torch.isfinite(normalized).all())
    torch.testing.assert_close(normalized, torch.tensor([3.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": 0.0}, "temperature"), ({"mode": "soft"}, "mode"),
     ({"transform": torch.exp, "temperature": 2.0}, "temperature"),
     ({"transform": torch.exp, "transform_domain": (1.0, 0.0)}, "transform_domain")],
)
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        taskbalance.make("bmtl", TASKS, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_faithful_mode_is_exact_below_the_overflow_point(dtype, temperature):
    """Where exp(L/T) is representable, the max-shift is 0 and the weights are exactly exp(L/T)/T."""
    values = torch.tensor([1.0, 30.0, 40.0], dtype=dtype)
    losses = {t: v.clone().requires_grad_() for t, v in zip(TASKS, values, strict=True)}
    record = taskbalance.make("bmtl", TASKS, temperature=temperature).backward(losses)
    expected = torch.exp(values / temperature) / temperature
    assert torch.equal(record.weights, expected)
    for k, t in enumerate(TASKS):
        assert torch.equal(losses[t].grad, expected[k])


@pytest.mark.parametrize("big", [100.0, 1e4, 1e20])
def test_faithful_mode_stays_finite_and_warns_naming_temperature_when_exp_overflows(big):
    """Above the overflow point the exponent is max-shifted: finite weights, the faithful direction
    (ratios exp((L_i - L_j)/T)), and a RuntimeWarning naming temperature."""
    values = [big, big - 2.0, 1.0]
    losses = {t: torch.tensor(v, requires_grad=True) for t, v in zip(TASKS, values, strict=True)}
    with pytest.warns(RuntimeWarning, match="temperature=1.0"):
        record = taskbalance.make("bmtl", TASKS).backward(losses)
    weights = record.weights
    assert bool(torch.isfinite(weights).all()) and float(weights[0]) > 0
    for k, t in enumerate(TASKS):
        assert torch.equal(losses[t].grad, weights[k])
    if big < 1e6:  # beyond that float32 cannot resolve L - 2 from L: the ratio is no longer measurable
        torch.testing.assert_close(weights[1] / weights[0], torch.exp(torch.tensor(-2.0)), rtol=1e-5, atol=0)
        ratio = weights[2].double() / weights[0].double()
        torch.testing.assert_close(ratio, torch.exp(torch.tensor(1.0 - big, dtype=torch.float64)), rtol=1e-4,
                                   atol=1e-300)
    else:
        assert float(weights[2]) == 0.0  # exp(1 - 1e20) underflows, as the faithful ratio says


def test_model_gradient_is_finite_when_a_task_loss_overflows_the_exponential():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS, scales={"b": 30.0})  # loss b ~ 450 > 88: exp overflows float32
    _, losses = toy_losses(model, x, y)
    with pytest.warns(RuntimeWarning, match="temperature"):
        taskbalance.make("bmtl", TASKS).backward(losses)
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
