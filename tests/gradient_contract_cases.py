"""Shared cases of the gradient-method contract: configurations, the training-loop driver, and every kind of
bad input with the outcome the contract expects. Used by ``test_gradient_contract.py`` and by
``contract_table.py`` (which prints the bad-input × method table)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import NonFiniteGradientError, NonFiniteLossError, TaskError

TASKS = ["a", "b", "c"]
STEPS_PER_EPOCH = 2
GRADIENT_METHODS = sorted(m.name for m in taskbalance.available() if m.family == "gradient")


def _levels(name: str) -> list[str]:
    level = taskbalance.method_info(name).feature_level
    return {"no": ["parameters"], "only": ["features"], "yes": ["parameters", "features"]}[level]


# every registered gradient method, at every level it is defined on
CONFIGS = [(name, level) for name in GRADIENT_METHODS for level in _levels(name)]
CONFIG_IDS = [f"{name}-{level[:4]}" for name, level in CONFIGS]


def make(name: str, level: str, **extra: Any) -> taskbalance.Balancer:
    return taskbalance.make(name, TASKS, gradients=level, **extra)


def fresh(name: str, level: str, **extra: Any):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, width=8)
    balancer = make(name, level, **extra)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    return model, optimizer, balancer


def forward(model: ToyMultiTask, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = toy_batch(TASKS, n=8, seed=step)
    return toy_losses(model, x, y)


def extra_losses_of(model, balancer):
    """The extra-batch closure: a deterministic batch per (step, draw), so runs and resumes replay it."""
    draws = iter(range(1000))

    def extra_losses():
        return forward(model, 10_000 + 10 * balancer.step_count + next(draws))[1]

    return extra_losses


def backward(balancer, model, losses, z, **overrides):
    kwargs = {"shared": list(model.trunk.parameters()), "features": z,
              "extra_losses": extra_losses_of(model, balancer), **overrides}
    return balancer.backward(losses, **kwargs)


def poison_gradient(losses: dict, z: torch.Tensor, task: str = "b") -> None:
    """Task ``task`` keeps its exact loss value but gets a NaN gradient on the trunk (``sqrt`` at 0)."""
    losses[task] = losses[task] + torch.sqrt((z * 0).sum())


def run(model, optimizer, balancer, steps: range) -> None:
    """The training-loop protocol on deterministic batches; step % 5 == 3 has no label for "b"."""
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        z, losses = forward(model, step)
        if step % 5 == 3:
            del losses["b"]
        backward(balancer, model, losses, z)
        optimizer.step()
        if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
            balancer.end_epoch()


def snapshot(balancer, model) -> tuple[dict, dict]:
    """Deep copies of the balancer's state and of every ``.grad`` (model and balancer parameters)."""
    grads = {}
    for prefix, module in (("model.", model), ("balancer.", balancer)):
        for n, p in module.named_parameters():
            grads[prefix + n] = None if p.grad is None else p.grad.clone()
    return copy.deepcopy(balancer.state_dict()), grads


def assert_same(got: Any, expected: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, where
        assert got.shape == expected.shape and torch.equal(got, expected), where
    elif isinstance(expected, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    else:
        assert got == expected, where


def all_finite(balancer, model) -> bool:
    tensors = [p.grad for p in model.parameters() if p.grad is not None]
    state = balancer.state_dict().values()
    tensors += [v for v in state if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---------------------------------------------------------------- bad inputs
@dataclass(frozen=True)
class BadInput:
    """One kind of wrong input: how to build it, which levels it applies to, and the error it must raise."""

    kind: str
    corrupt: Callable[[ToyMultiTask, dict, torch.Tensor], dict]  # returns backward() overrides
    error: type[BaseException]
    match: str
    levels: tuple[str, ...] = ("parameters", "features")


def _set(task: str, value: Callable[[dict, torch.Tensor], Any]):
    def corrupt(model, losses, z):
        losses[task] = value(losses, z)
        return {}
    return corrupt


def _unknown(model, losses, z):
    losses["zzz"] = losses["a"] * 1.0
    return {}


def _empty(model, losses, z):
    losses.clear()
    return {}


def _all_detached(model, losses, z):
    for t in list(losses):
        losses[t] = losses[t].detach()
    return {}


def _poisoned(model, losses, z):
    poison_gradient(losses, z)
    return {}


def _other_module_shared(model, losses, z):
    return {"shared": list(torch.nn.Linear(3, 3).parameters())}


def _frozen_shared(model, losses, z):
    return {"shared": [p.detach() for p in model.trunk.parameters()]}


def _second_forward_features(model, losses, z):
    x, _ = toy_batch(TASKS, n=8, seed=0)
    return {"features": model.trunk(x)}


BAD_INPUTS = [
    BadInput("unknown task", _unknown, TaskError, "unknown task.*'zzz'"),
    BadInput("no losses", _empty, TaskError, "no task losses"),
    BadInput("non-scalar loss", _set("b", lambda ls, z: ls["b"].expand(2)), ValueError, "scalar"),
    BadInput("non-tensor loss", _set("b", lambda ls, z: 1.0), TypeError, "torch.Tensor"),
    BadInput("integer loss", _set("b", lambda ls, z: torch.tensor(3)), TypeError, "'b'.*floating point"),
    BadInput("detached loss", _set("b", lambda ls, z: ls["b"].detach()), TaskError,
             "'b'.*does not require grad"),
    BadInput("leaf loss", _set("b", lambda ls, z: ls["b"].detach().requires_grad_()), TaskError, "'b'.*leaf"),
    BadInput("all losses detached", _all_detached, TaskError, "none of the given losses requires grad"),
    BadInput("non-finite loss", _set("c", lambda ls, z: ls["c"] * float("nan")), NonFiniteLossError, "'c'"),
    BadInput("non-finite gradient", _poisoned, NonFiniteGradientError, "'b'"),
    BadInput("shared missing", lambda m, ls, z: {"shared": None}, ValueError, "needs the shared parameters",
             ("parameters",)),
    BadInput("shared empty", lambda m, ls, z: {"shared": []}, ValueError, "no trainable parameter"),
    BadInput("shared frozen", _frozen_shared, ValueError, "no trainable parameter"),
    BadInput("shared not reached", _other_module_shared, ValueError, "shared="),
    BadInput("features missing", lambda m, ls, z: {"features": None}, ValueError, "features=z",
             ("features",)),
    BadInput("features detached", lambda m, ls, z: {"features": z.detach()}, ValueError,
             "does not require grad", ("features",)),
    BadInput("features not in graph", _second_forward_features, ValueError, "not in the losses' graph",
             ("features",)),
]
BAD_IDS = [b.kind.replace(" ", "-") for b in BAD_INPUTS]


def warmed_up(name: str, level: str, steps: int = 4, **extra: Any):
    model, optimizer, balancer = fresh(name, level, **extra)
    run(model, optimizer, balancer, range(steps))
    optimizer.zero_grad(set_to_none=True)
    # a partial gradient, so that "every .grad unchanged" is checked on non-None values too
    model.heads["a"].weight.grad = torch.full_like(model.heads["a"].weight, 0.5)
    return model, balancer


def attempt(bad: BadInput, name: str, level: str) -> tuple[str, bool]:
    """Apply one bad input to a warmed-up balancer: (outcome, state and every .grad unchanged)."""
    model, balancer = warmed_up(name, level)
    z, losses = forward(model, 99)
    overrides = bad.corrupt(model, losses, z)
    before = snapshot(balancer, model)
    try:
        backward(balancer, model, losses, z, **overrides)
    except Exception as error:  # noqa: BLE001 - the outcome is what we report
        after = snapshot(balancer, model)
        try:
            assert_same(after, before)
            unchanged = True
        except AssertionError:
            unchanged = False
        return f"raise {type(error).__name__}", unchanged
    return "accepted", False
