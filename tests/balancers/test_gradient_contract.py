"""The contract every gradient-level balancer keeps, checked generically over ``taskbalance.available()``:
registering a method puts it under every test here.

* resume from ``state_dict()`` through ``torch.load(weights_only=True)`` is bit-exact;
* a missing task gets weight 0, no head gradient and keeps its state;
* a non-finite loss or per-task gradient is raised (naming the task), skipped, or propagated as asked;
* every kind of bad input raises a clear error and leaves the state and every ``.grad`` exactly as they were;
* one bad step in 25 never poisons the steps after it.
"""

from __future__ import annotations

import io

import pytest
import torch
from gradient_contract_cases import (
    BAD_IDS,
    BAD_INPUTS,
    CONFIG_IDS,
    CONFIGS,
    GRADIENT_METHODS,
    STEPS_PER_EPOCH,
    TASKS,
    all_finite,
    assert_same,
    attempt,
    backward,
    forward,
    fresh,
    make,
    poison_gradient,
    run,
    snapshot,
    warmed_up,
)
from toy import ToyMultiTask

from taskbalance import NonFiniteGradientError, NonFiniteLossError, TaskError

# OL-AUX adds the accumulated agreements to the weights every `update_every` steps whether or not a task is
# present in that step (the reference's periodic flush): a missing task's entries may move on that step.
PERIODIC_STATE = {"ol-aux": {"weights", "accumulated"}}


def test_every_gradient_method_is_covered():
    assert {"mgda", "upgrad", "pcgrad", "db-mtl", "nash-mtl", "graddrop", "ol-aux"} <= set(GRADIENT_METHODS)
    assert {name for name, _ in CONFIGS} == set(GRADIENT_METHODS)


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize(("name", "level"), CONFIGS, ids=CONFIG_IDS)
def test_resume_through_weights_only_load_is_bit_exact(name, level):
    total, cut = 8, 5  # the cut falls mid-epoch, after a step without task "b"
    model, optimizer, balancer = fresh(name, level)
    run(model, optimizer, balancer, range(total))

    model2, optimizer2, balancer2 = fresh(name, level)
    run(model2, optimizer2, balancer2, range(cut))
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(),
                "balancer": balancer2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(123)  # the global RNG must not matter
    model3, _, balancer3 = fresh(name, level)
    balancer3.load_state_dict(saved["balancer"])
    model3.load_state_dict(saved["model"])
    optimizer3 = torch.optim.SGD([*model3.parameters(), *balancer3.parameters()], lr=0.05)
    optimizer3.load_state_dict(saved["optimizer"])
    run(model3, optimizer3, balancer3, range(cut, total))

    for (key, p), p3 in zip(model.state_dict().items(), model3.state_dict().values(), strict=True):
        assert torch.equal(p, p3), key
    assert_same(balancer3.state_dict(), balancer.state_dict())
    assert balancer3.step_count == total and balancer3.epoch_count == total // STEPS_PER_EPOCH


# ---------------------------------------------------------------- missing task
@pytest.mark.parametrize(("name", "level"), CONFIGS, ids=CONFIG_IDS)
def test_missing_task_gets_zero_weight_no_head_gradient_and_keeps_its_state(name, level):
    model, balancer = warmed_up(name, level)
    before = {k: v[..., 1].clone() for k, v in balancer.state_dict().items()
              if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == len(TASKS)}
    z, losses = forward(model, 99)
    del losses["b"]
    record = backward(balancer, model, losses, z)
    assert record.skipped == {"b": "missing"} and record.weight("b") == 0
    assert model.heads["b"].weight.grad is None
    assert all_finite(balancer, model)
    after = balancer.state_dict()
    for key, column in before.items():
        if key in PERIODIC_STATE.get(name, ()):
            continue
        assert torch.equal(after[key][..., 1], column), f"{key} changed for the missing task"


# ---------------------------------------------------------------- non-finite losses and gradients
@pytest.mark.parametrize(("name", "level"), CONFIGS, ids=CONFIG_IDS)
def test_nonfinite_gradient_of_a_finite_loss_is_skipped_on_request(name, level):
    model, balancer = warmed_up(name, level, on_nonfinite="skip")
    z, losses = forward(model, 99)
    poison_gradient(losses, z)
    record = backward(balancer, model, losses, z)
    assert record.skipped == {"b": "non-finite gradient"}
    assert record.weight("b") == 0 and bool(torch.isfinite(record.weights).all())
    assert model.heads["b"].weight.grad is None  # the task is out of the step, heads included
    assert all(p.grad is not None for p in model.trunk.parameters())
    assert all_finite(balancer, model)


@pytest.mark.parametrize(("name", "level"), CONFIGS, ids=CONFIG_IDS)
def test_nonfinite_loss_is_skipped_on_request(name, level):
    model, balancer = warmed_up(name, level, on_nonfinite="skip")
    z, losses = forward(model, 99)
    losses["a"] = losses["a"] * float("inf")
    record = backward(balancer, model, losses, z)
    assert record.skipped == {"a": "non-finite"} and record.weight("a") == 0
    assert all_finite(balancer, model)


@pytest.mark.parametrize(("name", "level"), CONFIGS, ids=CONFIG_IDS)
def test_propagate_lets_a_nonfinite_gradient_through_unchecked(name, level):
    model, balancer = warmed_up(name, level, on_nonfinite="propagate")
    z, losses = forward(model, 99)
    poison_gradient(losses, z)
    record = backward(balancer, model, losses, z)  # no check, no host read: NaN flows as in plain PyTorch
    assert record.skipped == {}
    assert not all_finite(balancer, model)


def test_every_task_nonfinite_raises_even_under_skip():
    model, balancer = warmed_up("upgrad", "parameters", on_nonfinite="skip")
    z, losses = forward(model, 99)
    for task in TASKS:
        poison_gradient(losses, z, task)
    with pytest.raises(NonFiniteGradientError):
        backward(balancer, model, losses, z)


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize(("name", "level"), CONFIGS, ids=CONFIG_IDS)
def test_one_bad_gradient_step_in_25_never_poisons_grad_or_state(name, level, policy):
    model, optimizer, balancer = fresh(name, level, on_nonfinite=policy)
    for step in range(25):
        optimizer.zero_grad(set_to_none=True)
        z, losses = forward(model, step)
        if step == 12:
            poison_gradient(losses, z)
            if policy == "raise":
                with pytest.raises(NonFiniteGradientError, match="'b'"):
                    backward(balancer, model, losses, z)
                continue
        backward(balancer, model, losses, z)
        assert all_finite(balancer, model), f"NaN/inf in .grad or state after step {step}"
        optimizer.step()
        if step % STEPS_PER_EPOCH == 1:
            balancer.end_epoch()


# ---------------------------------------------------------------- bad inputs
# A bad-input kind is generated only for the gradient levels it exists at (e.g. a `features=` tensor outside
# the graph means nothing under gradients="parameters"): not applicable, so not generated (no skip).
BAD_CASES = [(name, level, bad) for name, level in CONFIGS for bad in BAD_INPUTS if level in bad.levels]
BAD_CASE_IDS = [f"{cid}-{bid}" for cid, (_, level) in zip(CONFIG_IDS, CONFIGS, strict=True)
                for bid, bad in zip(BAD_IDS, BAD_INPUTS, strict=True) if level in bad.levels]


@pytest.mark.parametrize(("name", "level", "bad"), BAD_CASES, ids=BAD_CASE_IDS)
def test_bad_input_raises_clearly_and_changes_nothing(name, level, bad):
    model, balancer = warmed_up(name, level)
    z, losses = forward(model, 99)
    overrides = bad.corrupt(model, losses, z)
    before = snapshot(balancer, model)
    with pytest.raises(bad.error, match=bad.match):
        backward(balancer, model, losses, z, **overrides)
    assert_same(snapshot(balancer, model), before)
    assert balancer.step_count == before[0]["_extra_state"]["step_count"]


def test_attempt_helper_reports_accepted_inputs():
    """The table script's helper tells a raise from an accepted input (it could fail)."""
    good = BAD_INPUTS[0].__class__("none", lambda m, ls, z: {}, ValueError, "")
    assert attempt(good, "upgrad", "parameters") == ("accepted", False)


# ---------------------------------------------------------------- load_state_dict
@pytest.mark.parametrize(("name", "level"), CONFIGS, ids=CONFIG_IDS)
def test_load_state_dict_refuses_other_tasks_order_and_nonfinite_state(name, level):
    model, balancer = warmed_up(name, level)
    state = balancer.state_dict()

    permuted = taskbalance_make(name, level, ["b", "a", "c"])
    before = snapshot(permuted, model)[0]
    with pytest.raises(TaskError, match="another order"):
        permuted.load_state_dict(state)
    assert_same(permuted.state_dict(), before)

    with pytest.raises(TaskError, match="saved only: \\['c'\\]"):
        taskbalance_make(name, level, ["a", "b", "d"]).load_state_dict(state)

    floats = [k for k, v in state.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    if floats:
        poisoned = dict(state)
        poisoned[floats[0]] = state[floats[0]].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan"))
        poisoned[floats[0]] = poisoned[floats[0]].view_as(state[floats[0]])
        target = make(name, level)
        before = snapshot(target, model)[0]
        with pytest.raises(TaskError, match=f"NaN or inf in '{floats[0]}'"):
            target.load_state_dict(poisoned)
        assert_same(target.state_dict(), before)


def taskbalance_make(name, level, tasks):
    import taskbalance

    return taskbalance.make(name, tasks, gradients=level)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_load_state_dict_into_another_method_says_what_differs(name):
    import taskbalance

    other = "pcgrad" if name != "pcgrad" else "upgrad"
    level = "features" if taskbalance.method_info(name).feature_level == "only" else "parameters"
    state = taskbalance.make(name, TASKS, gradients=level).state_dict()
    target = taskbalance.make(other, TASKS)
    with pytest.raises(TaskError, match=f"saved by a '{name}' balancer.*make\\('{name}'"):
        target.load_state_dict(state)


def test_nonfinite_loss_raises_before_gradient_check():
    model, balancer = warmed_up("pcgrad", "parameters")
    z, losses = forward(model, 99)
    poison_gradient(losses, z, "a")
    losses["c"] = losses["c"] * float("nan")
    with pytest.raises(NonFiniteLossError) as caught:
        backward(balancer, model, losses, z)
    assert caught.value.tasks == ["c"]


def test_partially_unreached_shared_parameters_are_accepted():
    """Only a shared set that *no* loss reaches is refused: an unused layer inside the trunk is legitimate."""
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, width=8)
    extra = torch.nn.Linear(2, 2)
    balancer = make("upgrad", "parameters")
    z, losses = forward(model, 0)
    balancer.backward(losses, shared=[*model.trunk.parameters(), *extra.parameters()])
    assert all(p.grad is not None for p in model.trunk.parameters())
