"""The contract every loss-level balancer keeps, checked generically over ``taskbalance.available()``.

The training-loop protocol is driven the same way for every method: ``backward`` each step, ``after_step``
with the re-evaluated losses when ``needs_post_step_losses``, and ``end_epoch`` every few steps.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import NonFiniteLossError, TaskError

TASKS = ["a", "b", "c"]
LOSS_METHODS = sorted(m.name for m in taskbalance.available() if m.family == "loss")
# Only to reach the later phases within a short run; every other method runs with its defaults.
SHORT_RUN = {"stch": {"warmup_epoch": 1}}
# Methods (and settings) whose objective is Σ_k sg(w_k) L_k: constant weights, no gradient through them.
LINEAR = {"ew": {}, "ema": {}, "dwa": {}, "rlw": {}, "bmtl": {"mode": "normalized"}}
STEPS_PER_EPOCH = 2
# Preference scalarisations whose effective weights ∂total/∂L_k are negative by definition for a task that is
# ahead of its preferred share (PBI's distance to the ray, COSMOS's cosine term); their sign is tested there.
SIGNED_WEIGHTS = {"pbi", "cosmos"}


def make(name: str, **extra):
    return taskbalance.make(name, TASKS, **{**SHORT_RUN.get(name, {}), **extra})


def test_every_method_file_is_registered():
    assert {"ew", "ema", "uw", "dwa", "rlw", "gls", "stch", "famo", "bmtl"} <= set(LOSS_METHODS)


# ---------------------------------------------------------------- resume
def run(model, optimizer, balancer, steps: range) -> None:
    """The generic training-loop protocol on deterministic batches (batch i depends only on i)."""
    for step in steps:
        x, y = toy_batch(TASKS, seed=step)
        optimizer.zero_grad(set_to_none=True)
        _, losses = toy_losses(model, x, y)
        if step % 5 == 3:  # a batch without labels for "b"
            del losses["b"]
        balancer.backward(losses)
        optimizer.step()
        if balancer.needs_post_step_losses:
            with torch.no_grad():
                _, after = toy_losses(model, x, y)
            balancer.after_step({t: after[t] for t in losses})
        if step % STEPS_PER_EPOCH == STEPS_PER_EPOCH - 1:
            balancer.end_epoch()


def fresh(name: str):
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = make(name)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=0.01)
    return model, optimizer, balancer


def assert_state_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        a, b = got[key], expected[key]
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        elif isinstance(b, dict):
            assert_state_equal(a, b)
        else:
            assert a == b, key


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_resume_from_state_dict_is_bit_identical(name):
    total, cut = 14, 7  # 7 epochs of 2 steps; the cut falls mid-epoch
    model, optimizer, balancer = fresh(name)
    run(model, optimizer, balancer, range(total))

    model2, optimizer2, balancer2 = fresh(name)
    run(model2, optimizer2, balancer2, range(cut))
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(),
                "balancer": balancer2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # global RNG state must not matter
    model3, optimizer3, balancer3 = ToyMultiTask(TASKS), None, make(name)
    balancer3.load_state_dict(saved["balancer"])
    model3.load_state_dict(saved["model"])
    optimizer3 = torch.optim.Adam([*model3.parameters(), *balancer3.parameters()], lr=0.01)
    optimizer3.load_state_dict(saved["optimizer"])
    run(model3, optimizer3, balancer3, range(cut, total))

    for (key, p), p3 in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(p, p3), key
    assert_state_equal(balancer3.state_dict(), balancer.state_dict())
    assert balancer3.step_count == total and balancer3.epoch_count == total // STEPS_PER_EPOCH


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_state_dict_round_trip_restores_every_entry(name):
    model, optimizer, balancer = fresh(name)
    run(model, optimizer, balancer, range(5))
    copy = make(name)
    copy.load_state_dict(balancer.state_dict())
    assert_state_equal(copy.state_dict(), balancer.state_dict())


# ---------------------------------------------------------------- missing / non-finite tasks
def warmed_up(name: str, **extra):
    """A balancer after a few protocol steps (so that its per-task state is non-trivial)."""
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS)
    balancer = make(name, **extra)
    optimizer = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=0.01)
    run(model, optimizer, balancer, range(6))
    optimizer.zero_grad(set_to_none=True)
    return model, balancer


def task_slices(state: dict, column: int) -> dict:
    """Per-task entries of a state dict: the ``column`` of every tensor whose last dimension is K."""
    return {k: v[..., column].clone() for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == len(TASKS)}


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_missing_task_gets_zero_weight_and_keeps_its_state(name):
    model, balancer = warmed_up(name)
    before = task_slices(balancer.state_dict(), TASKS.index("b"))
    x, y = toy_batch(TASKS, seed=99)
    _, losses = toy_losses(model, x, y)
    del losses["b"]
    record = balancer.backward(losses)
    if balancer.needs_post_step_losses:
        balancer.after_step({t: v.detach() * 0.9 for t, v in losses.items()})

    assert record.skipped == {"b": "missing"}
    assert record.weight("b") == 0
    assert record.present.tolist() == [True, False, True]
    assert bool(torch.isfinite(record.weights).all())
    assert name in SIGNED_WEIGHTS or bool((record.weights[[0, 2]] > 0).all())
    after = task_slices(balancer.state_dict(), TASKS.index("b"))
    for key in before:
        assert torch.equal(after[key], before[key]), f"{name}: {key} changed for the missing task"
    assert model.heads["b"].weight.grad is None
    for p in [*model.parameters(), *balancer.parameters()]:
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all())
    for p in balancer.parameters():  # learnable balancer parameters get no gradient for the missing task
        if p.grad is not None and p.shape[-1] == len(TASKS):
            assert p.grad[..., 1].abs().max() == 0


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_nonfinite_loss_raises_naming_the_task_and_leaves_state_unchanged(name):
    model, balancer = warmed_up(name)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in balancer.state_dict().items()}
    x, y = toy_batch(TASKS, seed=99)
    _, losses = toy_losses(model, x, y)
    losses["c"] = losses["c"] * float("nan")
    with pytest.raises(NonFiniteLossError, match="'c'") as caught:
        balancer.backward(losses)
    assert caught.value.tasks == ["c"]
    assert_state_equal(balancer.state_dict(), before)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_nonfinite_loss_is_skipped_on_request(name):
    model, balancer = warmed_up(name, on_nonfinite="skip")
    x, y = toy_batch(TASKS, seed=99)
    _, losses = toy_losses(model, x, y)
    losses["a"] = losses["a"] * float("inf")
    record = balancer.backward(losses)
    assert record.skipped == {"a": "non-finite"}
    assert record.weight("a") == 0
    assert bool(torch.isfinite(record.weights).all())
    for p in model.parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all())


# ---------------------------------------------------------------- bad inputs
def leaf_losses(values, names=TASKS):
    return {t: torch.tensor(float(v), requires_grad=True) for t, v in zip(names, values, strict=True)}


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_bad_task_lists_and_losses_are_rejected_clearly(name):
    with pytest.raises(TaskError, match="at least one task"):
        taskbalance.make(name, [])
    with pytest.raises(TaskError, match="duplicate"):
        taskbalance.make(name, ["a", "b", "a"])
    balancer = make(name)
    with pytest.raises(TaskError, match="unknown task.*'z'"):
        balancer.backward({**leaf_losses([1, 2, 3]), "z": torch.tensor(1.0, requires_grad=True)})
    with pytest.raises(ValueError, match="scalar"):
        balancer.backward({"a": torch.ones(2, requires_grad=True)})
    with pytest.raises(TaskError, match="no task losses"):
        balancer.backward({})
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        taskbalance.make(name, TASKS, not_a_hyperparameter=1)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_negative_losses_are_rejected_exactly_by_methods_that_take_their_log(name):
    balancer = make(name)
    losses = leaf_losses([1.0, -0.5, 2.0])
    if balancer.takes_log_of_losses:
        with pytest.raises(ValueError, match="negative.*'b'|'b'.*negative"):
            balancer.backward(losses)
        assert balancer.step_count == 0
    else:
        record = balancer.backward(losses)
        assert bool(torch.isfinite(record.weights).all())


# ---------------------------------------------------------------- properties over sampled losses
loss_value = st.floats(min_value=0.001, max_value=20.0, allow_nan=False).map(lambda v: float(torch.tensor(v)))
step_strategy = st.tuples(
    st.lists(loss_value, min_size=3, max_size=3),
    st.lists(st.booleans(), min_size=3, max_size=3).filter(any),
)


@pytest.mark.parametrize("name", LOSS_METHODS)
@settings(max_examples=15, deadline=None)
@given(steps=st.lists(step_strategy, min_size=1, max_size=8))
def test_weights_are_the_finite_non_negative_derivatives_of_the_objective(name, steps):
    balancer = make(name)
    for i, (values, mask) in enumerate(steps):
        losses = {t: v for t, v in leaf_losses(values).items() if mask[TASKS.index(t)]}
        record = balancer.backward(losses)
        if balancer.needs_post_step_losses:
            balancer.after_step({t: v.detach() * 0.8 for t, v in losses.items()})
        if i % 2 == 1:
            balancer.end_epoch()
        weights = record.weights
        assert bool(torch.isfinite(weights).all())
        assert name in SIGNED_WEIGHTS or bool((weights >= 0).all())
        for k, task in enumerate(TASKS):
            if task in losses:
                torch.testing.assert_close(losses[task].grad, weights[k], rtol=1e-5, atol=1e-7)
            else:
                assert weights[k] == 0 and record.skipped[task] == "missing"


@pytest.mark.parametrize("name", sorted(set(LINEAR) & set(LOSS_METHODS)))
@settings(max_examples=20, deadline=None)
@given(values=st.lists(loss_value, min_size=3, max_size=3), mask=st.lists(st.booleans(), min_size=3,
                                                                          max_size=3).filter(any))
def test_linear_methods_total_is_the_weighted_sum(name, values, mask):
    balancer = make(name, **LINEAR[name])
    losses = torch.tensor(values, dtype=torch.float32)
    present = torch.tensor(mask)
    losses = torch.where(present, losses, torch.zeros_like(losses))
    total, weights = balancer.objective(losses, present)
    torch.testing.assert_close(total, (weights * losses).sum())
    assert bool((weights[~present] == 0).all())
    assert math.isfinite(float(total))


# ---------------------------------------------------------------- validate before mutate
def _model_losses(model):
    x, y = toy_batch(TASKS, seed=99)
    return toy_losses(model, x, y)[1]


def _detach_all(losses):
    return {t: v.detach() for t, v in losses.items()}


LOSS_BAD_INPUTS = {
    "integer loss": (lambda ls: {**ls, "b": torch.tensor(2)}, TypeError, "'b'.*floating point"),
    "detached loss": (lambda ls: {**ls, "b": ls["b"].detach()}, TaskError, "'b'.*does not require grad"),
    "leaf loss": (lambda ls: {**ls, "b": ls["b"].detach().requires_grad_()}, TaskError, "'b'.*leaf"),
    "all losses detached": (_detach_all, TaskError, "none of the given losses requires grad"),
    "non-scalar loss": (lambda ls: {**ls, "b": ls["b"].expand(3)}, ValueError, "scalar"),
    "unknown task": (lambda ls: {**ls, "z": ls["a"] * 1}, TaskError, "unknown task"),
    "non-finite loss": (lambda ls: {**ls, "c": ls["c"] * float("nan")}, NonFiniteLossError, "'c'"),
}


@pytest.mark.parametrize("kind", sorted(LOSS_BAD_INPUTS))
@pytest.mark.parametrize("name", LOSS_METHODS)
def test_bad_input_raises_before_any_state_or_grad_is_written(name, kind):
    corrupt, error, match = LOSS_BAD_INPUTS[kind]
    model, balancer = warmed_up(name)
    model.heads["a"].weight.grad = torch.full_like(model.heads["a"].weight, 0.5)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in balancer.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        balancer.backward(corrupt(_model_losses(model)))
    assert_state_equal(balancer.state_dict(), before)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n


# ---------------------------------------------------------------- load_state_dict checks
@pytest.mark.parametrize("name", LOSS_METHODS)
def test_load_state_dict_refuses_another_method_task_order_or_nonfinite_state(name):
    _, balancer = warmed_up(name)
    state = balancer.state_dict()
    other = "ema" if name != "ema" else "dwa"
    with pytest.raises(TaskError, match=f"saved by a '{name}' balancer"):
        taskbalance.make(other, TASKS).load_state_dict(state)
    permuted = taskbalance.make(name, ["c", "b", "a"], **SHORT_RUN.get(name, {}))
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in permuted.state_dict().items()}
    with pytest.raises(TaskError, match="another order"):
        permuted.load_state_dict(state)
    assert_state_equal(permuted.state_dict(), before)
    floats = [k for k, v in state.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    for key in floats[:1]:
        bad = dict(state)
        bad[key] = torch.full_like(state[key], float("nan"))
        with pytest.raises(TaskError, match=f"NaN or inf in '{key}'"):
            make(name).load_state_dict(bad)
