"""torch.compile: a compiled model with an eager balancer gives the gradients of the eager model.

Backends "eager" (Dynamo graph capture only) and "aot_eager" (AOTAutograd: compiled forward *and* backward
graphs, which is what the batched Jacobian must go through). Inductor compiles the same graphs to C++ and
takes tens of seconds on a CPU, too slow for a unit test; docs/scaling.md reports what we measured with it.
Gradient-level methods back-propagate the same graph several times (the Jacobian, then the heads), so
AOTAutograd's donated buffers must be off: ``torch._functorch.config.donated_buffer = False``.
Feature-level methods need the shared features to be a graph boundary (compile the trunk and the heads
separately): a whole-model graph is one autograd node, and the heads cannot be told apart from the trunk.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._functorch.config as functorch_config
from toy import ToyMultiTask, toy_batch

import taskbalance

TASKS = ["a", "b", "c"]
CASES = {
    "ema": ("ema", {}, "parameters"),
    "pcgrad": ("pcgrad", {"seed": 1}, "parameters"),
    "mgda": ("mgda", {}, "parameters"),
    "mgda-features": ("mgda", {}, "features"),
}


@pytest.fixture(scope="module", params=["eager", "aot_eager"])
def compiled(request):
    """One model compiled once per backend, whole and by parts (re-used across methods: initial weights are
    reloaded in place)."""
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, width=16)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with functorch_config.patch(donated_buffer=False):
        whole = torch.compile(model, backend=request.param, dynamic=False)
        trunk = torch.compile(model.trunk, backend=request.param, dynamic=False)
        heads = {t: torch.compile(model.heads[t], backend=request.param, dynamic=False) for t in TASKS}

        def by_parts(x):
            z = trunk(x)
            return z, {t: heads[t](z).squeeze(-1) for t in TASKS}

        yield model, {"parameters": whole, "features": by_parts}, initial
    torch._dynamo.reset()


def _run(model, runner, method: str, steps: int = 2):
    name, hyperparameters, level = CASES[method]
    kwargs = dict(hyperparameters)
    if taskbalance.method_info(name).family == "gradient":
        kwargs["gradients"] = level
    balancer = taskbalance.make(name, TASKS, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(steps):
        x, y = toy_batch(TASKS, n=32, seed=step, scales={"a": 1.0, "b": 5.0, "c": 0.2})
        optimizer.zero_grad(set_to_none=True)
        z, out = runner(x)
        losses = {t: ((out[t] - y[t]) ** 2).mean() for t in TASKS}
        balancer.backward(losses, shared=model.trunk.parameters(), features=z)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_compiled_model_with_eager_balancer_matches_the_eager_model(compiled, method):
    model, runners, initial = compiled
    runner = runners[CASES[method][2]]
    model.load_state_dict(initial)
    eager = _run(model, model, method)
    model.load_state_dict(initial)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the batched Jacobian must not fall back to a loop
        got = _run(model, runner, method)
    for step, (a, b) in enumerate(zip(got, eager, strict=True)):
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")
