"""The Gramian engine reads the autograd graph anew at every step (docs/gramian.md): a head that changes
between steps — swapped, chosen by a condition in ``forward`` — takes exactly the gradient the Jacobian path
gives it, and a head no loss reaches any more takes none."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import taskbalance

TASKS = ["a", "b"]


class SwitchingHeads(nn.Module):
    """A shared trunk, and for task ``a`` one of two heads chosen per call."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.a_first = nn.Linear(12, 1)
        self.a_second = nn.Linear(12, 1)
        self.b = nn.Linear(12, 1)

    def losses(self, x: Tensor, y: Tensor, second: bool) -> dict[str, Tensor]:
        z = self.trunk(x)
        head_a = self.a_second if second else self.a_first
        return {
            "a": ((head_a(z).squeeze(-1) - y[:, 0]) ** 2).mean(),
            "b": ((self.b(z).squeeze(-1) - y[:, 1]) ** 2).mean(),
        }


def _steps(engine: str, model: SwitchingHeads) -> list[dict[str, Tensor | None]]:
    balancer = taskbalance.make("upgrad", TASKS, engine=engine)
    shared = list(model.trunk.parameters())
    grads = []
    for step, second in enumerate([False, True, True, False]):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 5, generator=generator, dtype=torch.float64)
        y = torch.randn(16, 2, generator=generator, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        balancer.backward(model.losses(x, y, second), shared=shared)
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})
    return grads


def test_a_head_switched_between_steps_gets_the_jacobian_paths_gradient_and_the_unused_one_none():
    torch.manual_seed(0)
    model = SwitchingHeads().double()
    twin = copy.deepcopy(model)
    gramian_steps = _steps("gramian", model)
    jacobian_steps = _steps("jacobian", twin)
    for step, (ours, reference) in enumerate(zip(gramian_steps, jacobian_steps, strict=True)):
        for name, grad in reference.items():
            if grad is None:
                assert ours[name] is None, (step, name)
            else:
                got = ours[name]
                assert got is not None, (step, name)
                torch.testing.assert_close(got, grad, rtol=1e-10, atol=1e-12, msg=f"step {step}, {name}")
    assert gramian_steps[1]["a_first.weight"] is None and gramian_steps[1]["a_second.weight"] is not None
    assert gramian_steps[3]["a_second.weight"] is None and gramian_steps[3]["a_first.weight"] is not None
