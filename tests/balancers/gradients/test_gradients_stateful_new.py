"""ExcessMTL, MoCo and CR-MOGM: stateful gradient methods, checked over sequences of steps.

* ExcessMTL ↔ TorchJD ``ExcessMTL`` (float64, same sequence of Jacobians, with and without warm-up);
* MoCo ↔ LibMTL's ``MoCo.backward`` formula (re-written below, ``weight_update="softmax"``);
* CR-MOGM ↔ TorchJD ``CRMOGMWeighting`` around ``UPGradWeighting``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchjd import aggregation as tjd
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance as tb
from taskbalance import GradientStep

TASKS = ["a", "b", "c", "d"]


def jacobians(steps: int = 8, k: int = 4, p: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(1, p, generator=g, dtype=torch.float64)
    for _ in range(steps):
        j = common + torch.randn(k, p, generator=g, dtype=torch.float64)
        yield j * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("warmup", [0, 3])
def test_excess_mtl_agrees_with_torchjd_over_steps(warmup):
    ours = tb.make("excess-mtl", TASKS, warmup_steps=warmup, robust_step_size=0.5)
    theirs = tjd.ExcessMTL(robust_step_size=0.5, n_warmup_steps=warmup)
    for j in jacobians():
        update = ours.aggregate(GradientStep.of(j)).shared_update(j)
        torch.testing.assert_close(update, theirs(j), rtol=1e-10, atol=1e-12)


def test_excess_mtl_raises_the_weight_of_the_task_with_the_largest_excess_risk():
    balancer = tb.make("excess-mtl", TASKS)
    j = torch.ones(4, 8, dtype=torch.float64)
    balancer.aggregate(GradientStep.of(j))  # baseline step
    j2 = j.clone()
    j2[2] *= 3.0  # task c's excess risk grows relative to its baseline
    before = balancer.weights.clone()
    after = balancer.aggregate(GradientStep.of(j2)).weights
    assert after.argmax() == 2 and after[2] > before[2]
    torch.testing.assert_close(after.sum(), torch.tensor(1.0, dtype=torch.float64))


def libmtl_moco(js, losses, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
    """LibMTL's MoCo update, written from its description (normalised grads × loss, tracking, softmax λ)."""
    k = js[0].shape[0]
    y = torch.zeros_like(js[0])
    lambd = torch.ones(k, dtype=torch.float64) / k
    out = []
    for step, (j, loss) in enumerate(zip(js, losses, strict=True), start=1):
        grads = torch.stack([j[i] / (j[i].norm() + 1e-8) * loss[i] for i in range(k)])
        y = y - (beta / step**beta_sigma) * (y - grads)
        lambd = F.softmax(lambd - (gamma / step**gamma_sigma) * (y @ y.t() + rho * torch.eye(k)) @ lambd, -1)
        out.append(y.t() @ lambd)
    return out


def test_moco_softmax_variant_agrees_with_libmtl_formula():
    js = list(jacobians())
    g = torch.Generator().manual_seed(3)
    losses = [torch.rand(4, generator=g, dtype=torch.float64) + 0.1 for _ in js]
    expected = libmtl_moco(js, losses, rho=0.1)
    balancer = tb.make("moco", TASKS, weight_update="softmax", rho=0.1)
    for j, loss, reference in zip(js, losses, expected, strict=True):
        update = balancer.aggregate(GradientStep.of(j, losses=loss)).shared_update(j)
        balancer.step_count += 1  # what backward does after each step
        torch.testing.assert_close(update, reference, rtol=1e-10, atol=1e-12)


def test_moco_with_constant_gradients_tends_to_the_min_norm_point():
    j = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.4, 0.0, 1.0]], dtype=torch.float64)
    losses = torch.ones(3, dtype=torch.float64)
    balancer = tb.make("moco", TASKS[:3], gamma=1.0, gamma_sigma=0.0, beta_sigma=0.0)
    for _ in range(3000):
        update = balancer.aggregate(GradientStep.of(j, losses=losses)).shared_update(j)
        balancer.step_count += 1
    unit = j / (j.norm(dim=1, keepdim=True) + 1e-8)
    min_norm = tb.make("mgda", TASKS[:3]).aggregate(GradientStep.of(unit)).shared_update(unit)
    torch.testing.assert_close(update, min_norm, rtol=1e-4, atol=1e-6)


def test_cr_mogm_agrees_with_torchjd_around_upgrad():
    ours = tb.make("cr-mogm", TASKS, method="upgrad", alpha=0.7)
    theirs = tjd.GramianWeightedAggregator(tjd.CRMOGMWeighting(tjd.UPGradWeighting(), alpha=0.7))
    for j in jacobians():
        update = ours.aggregate(GradientStep.of(j)).shared_update(j)
        reference = theirs(j)
        assert float((update - reference).norm() / reference.norm()) < 1e-4


@pytest.mark.parametrize("method", ["mgda", "imtl-g", "krum", "config", "fairgrad", "nash-mtl", "cagrad"])
def test_cr_mogm_alpha_zero_is_the_wrapped_method_and_constant_input_is_a_fixed_point(method):
    for alpha in (0.0, 0.8):
        wrapper = tb.make("cr-mogm", TASKS, method=method, alpha=alpha)
        plain = tb.make(method, TASKS)
        for j in [next(iter(jacobians()))] * 3:
            ours = wrapper.aggregate(GradientStep.of(j)).shared_update(j)
            expected = plain.aggregate(GradientStep.of(j)).shared_update(j)
            torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)


def test_cr_mogm_smooths_and_refuses_element_wise_methods():
    wrapper = tb.make("cr-mogm", TASKS, method="imtl-g", alpha=0.5)
    js = list(jacobians(steps=2))
    first = wrapper.aggregate(GradientStep.of(js[0])).shared_weights
    second = wrapper.aggregate(GradientStep.of(js[1])).shared_weights
    raw = tb.make("imtl-g", TASKS).aggregate(GradientStep.of(js[1])).weights
    torch.testing.assert_close(second, 0.5 * first + 0.5 * raw)
    with pytest.raises(ValueError, match="element-wise"):
        tb.make("cr-mogm", TASKS, method="trimmed-mean")
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        tb.make("cr-mogm", TASKS, method="upgrad", not_an_option=1)


@pytest.mark.parametrize(
    "name", ["excess-mtl", "moco", "cr-mogm", "krum", "trimmed-mean", "config", "fairgrad"]
)
def test_trains_a_model_with_a_missing_task_and_resumes_to_the_same_parameters(name):
    """Resume from state_dict mid-run. Compared to float32 rounding, not bit-for-bit: after other methods ran
    in the same process the engines' float32 matmuls can round differently (seen for stateless ConFIG too)."""

    def run(balancer, model, optimizer, steps):
        for step in steps:
            x, y = toy_batch(TASKS, seed=step)
            optimizer.zero_grad(set_to_none=True)
            _, losses = toy_losses(model, x, y)
            if step % 4 == 2:
                del losses["b"]
            record = balancer.backward(losses, shared=model.trunk.parameters())
            assert bool(torch.isfinite(record.weights).all()) and record.weight("b") == 0 or "b" in losses
            optimizer.step()

    def fresh():
        torch.manual_seed(0)
        model = ToyMultiTask(TASKS)
        balancer = tb.make(name, TASKS)
        return model, balancer, torch.optim.SGD(model.parameters(), lr=0.05)

    model, balancer, optimizer = fresh()
    run(balancer, model, optimizer, range(8))
    model2, balancer2, optimizer2 = fresh()
    run(balancer2, model2, optimizer2, range(4))
    state = (model2.state_dict(), balancer2.state_dict(), optimizer2.state_dict())
    model3, balancer3, optimizer3 = fresh()
    model3.load_state_dict(state[0])
    balancer3.load_state_dict(state[1])
    optimizer3.load_state_dict(state[2])
    run(balancer3, model3, optimizer3, range(4, 8))
    for (key, p), p3 in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        torch.testing.assert_close(p, p3, rtol=1e-5, atol=1e-7, msg=key)
