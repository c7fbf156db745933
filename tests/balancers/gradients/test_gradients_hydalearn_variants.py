"""HydaLearn's labelled variants (our extensions): cosine gain, main gradient on a held-out batch."""

from __future__ import annotations

import pytest
import torch
from test_gradients_hydalearn import TASKS, setup, shared_jacobian
from toy import toy_batch, toy_losses

import taskbalance
from taskbalance import GradientStep
from taskbalance.balancers.gradients.hydalearn import HydaLearn

F64 = torch.float64


def weights_of(jacobian: torch.Tensor, **options) -> torch.Tensor:
    k = jacobian.shape[0]
    balancer = HydaLearn([f"t{i}" for i in range(k)], main="t0", **options)
    return balancer.aggregate(GradientStep.of(jacobian)).weights


def test_cosine_gain_bounds_each_auxiliary_by_the_main_gradient_whatever_its_scale():
    g = torch.Generator().manual_seed(0)
    main = torch.randn(20, generator=g, dtype=F64)
    aux = torch.randn(4, 20, generator=g, dtype=F64) + main  # positively aligned
    for scale in (1.0, 10.0, 1000.0):
        jacobian = torch.cat([main[None], scale * aux])
        cosine = weights_of(jacobian, gain="cosine")
        contributions = cosine[1:, None] * jacobian[1:]
        cos = (jacobian[1:] @ main) / (jacobian[1:].norm(dim=1) * main.norm())
        torch.testing.assert_close(contributions.norm(dim=1), cos.clamp_min(0) * main.norm())
        # each contribution is the main gradient's projection on the auxiliary's direction
        unit = jacobian[1:] / jacobian[1:].norm(dim=1, keepdim=True)
        torch.testing.assert_close(contributions, (unit @ main)[:, None] * unit)
    # the reconstruction's contributions grow with ‖g_a‖²: the reason for the variant
    small = weights_of(torch.cat([main[None], aux]))[1:, None] * aux
    large = weights_of(torch.cat([main[None], 10 * aux]))[1:, None] * (10 * aux)
    torch.testing.assert_close(large.norm(dim=1), 100 * small.norm(dim=1))


def test_cosine_gain_switches_off_opposed_auxiliaries_and_keeps_the_main_weight_one():
    g = torch.randn(9, generator=torch.Generator().manual_seed(1), dtype=F64)
    weights = weights_of(torch.stack([g, -3 * g, 2 * g]), gain="cosine")
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 0.5], dtype=F64))


def test_held_out_gains_use_the_held_out_main_gradient():
    model, x, y = setup(dtype=F64)
    x_val, y_val = toy_batch(TASKS, seed=7)
    x_val, y_val = x_val.to(F64), {t: v.to(F64) for t, v in y_val.items()}
    _, losses = toy_losses(model, x, y)
    jacobian = shared_jacobian(model, losses)
    _, held = toy_losses(model, x_val, y_val)
    h = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(held["a"], list(model.trunk.parameters()))])
    for gain in ("projection", "cosine"):
        model.zero_grad(set_to_none=True)
        _, losses = toy_losses(model, x, y)
        balancer = taskbalance.make("hydalearn", TASKS, main="a", main_gradient="held_out", gain=gain)
        assert (balancer.extra_batches, balancer.extra_batch_source) == (1, "validation")
        record = balancer.backward(
            losses, shared=model.trunk.parameters(), extra_losses=lambda: toy_losses(model, x_val, y_val)[1]
        )
        delta = jacobian @ h
        torch.testing.assert_close(record.extras["gain"], delta)
        if gain == "projection":
            expected = (delta / delta[0]).clamp_min(0)
        else:
            norms = jacobian.norm(dim=1)
            expected = (delta / (h.norm() * norms) * norms[0] / norms).clamp_min(0)
        expected[0] = 1.0
        torch.testing.assert_close(record.weights, expected)
        assert all(p.grad is not None for p in model.heads["b"].parameters())  # heads trained as usual


def test_held_out_mode_says_what_it_needs():
    model, x, y = setup()
    _, losses = toy_losses(model, x, y)
    balancer = taskbalance.make("hydalearn", TASKS, main_gradient="held_out")
    with pytest.raises(ValueError, match="extra_losses=fn"):
        balancer.backward(losses, shared=model.trunk.parameters())
    with pytest.raises(ValueError, match="gradients='parameters'"):
        taskbalance.make("hydalearn", TASKS, main_gradient="held_out", gradients="features")
    with pytest.raises(ValueError, match="gain"):
        taskbalance.make("hydalearn", TASKS, gain="angle")


def test_registry_marks_the_variants_as_our_extension():
    from taskbalance.balancers.registry import method_info

    assert "held_out" in method_info("hydalearn").extension
