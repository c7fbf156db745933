"""The extra-batch protocol: one closure, drawn only by the methods that declare it, checked like the step."""

from __future__ import annotations

import copy

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import NonFiniteGradientError, NonFiniteLossError
from taskbalance.balancers import ExtraBatches, ReplayedExtraBatches
from taskbalance.balancers.registry import MethodInfo

TASKS = ["a", "b", "c"]
F64 = torch.float64


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = ToyMultiTask(TASKS).to(F64)
    x, y = toy_batch(TASKS, seed=seed)
    x_val, y_val = toy_batch(TASKS, seed=seed + 100)
    return model, (x.to(F64), {t: v.to(F64) for t, v in y.items()}), (
        x_val.to(F64), {t: v.to(F64) for t, v in y_val.items()})


def flat_grad(loss, parameters):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parameters)])


@pytest.mark.parametrize("method", ["ew", "uw", "mgda", "upgrad", "hydalearn"])
def test_methods_that_draw_no_extra_batch_never_call_the_closure(method):
    model, (x, y), _ = setup()

    def closure():
        raise AssertionError("called")

    balancer = taskbalance.make(method, TASKS)
    assert balancer.extra_batches == 0
    _, losses = toy_losses(model, x, y)
    balancer.backward(losses, shared=model.trunk.parameters(), extra_losses=closure)
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_a_method_that_needs_extra_batches_names_the_fix_when_none_is_given():
    model, (x, y), _ = setup()
    balancer = taskbalance.make("hydalearn", TASKS, main="a", main_gradient="held_out")
    _, losses = toy_losses(model, x, y)
    with pytest.raises(ValueError, match=r"1 extra validation batch per step.*extra_losses=fn"):
        balancer.backward(losses, shared=model.trunk.parameters())
    with pytest.raises(TypeError, match="callable"):
        balancer.backward(losses, shared=model.trunk.parameters(), extra_losses={"a": losses["a"]})
    assert all(p.grad is None for p in model.parameters())
    assert balancer.step_count == 0


def test_the_closure_is_drawn_once_per_declared_batch_and_a_further_draw_is_refused():
    model, _, (x_val, y_val) = setup()
    calls = []

    def closure():
        calls.append(1)
        return toy_losses(model, x_val, y_val)[1]

    extra = ExtraBatches(closure, source="training", limit=2, parameters=list(model.trunk.parameters()),
                         method="m")
    first = extra.jacobian(["a", "b"])
    second = extra.gradient(["c"])
    assert len(calls) == 2 and first.shape == (2, second.shape[0])
    with pytest.raises(RuntimeError, match="more than the 2 extra batch"):
        extra.losses(["a"])
    assert len(calls) == 2


def test_jacobian_rows_are_each_tasks_gradient_on_the_drawn_batch():
    model, _, (x_val, y_val) = setup()
    trunk = list(model.trunk.parameters())
    extra = ExtraBatches(lambda: toy_losses(model, x_val, y_val)[1], source="validation", limit=1,
                         parameters=trunk, method="m")
    jacobian = extra.jacobian(["c", "a"])
    _, losses = toy_losses(model, x_val, y_val)
    torch.testing.assert_close(jacobian[0], flat_grad(losses["c"], trunk))
    _, losses = toy_losses(model, x_val, y_val)
    torch.testing.assert_close(jacobian[1], flat_grad(losses["a"], trunk))


def test_a_virtual_step_evaluates_at_the_displaced_parameters_and_restores_them_bit_for_bit():
    model, (x, y), (x_val, y_val) = setup()
    trunk = list(model.trunk.parameters())
    before = [p.detach().clone() for p in trunk]
    size = sum(p.numel() for p in trunk)
    shift = 0.1 * torch.randn(size, dtype=F64, generator=torch.Generator().manual_seed(3))
    # the step's own graph is built before the virtual step and back-propagated after it
    _, own = toy_losses(model, x, y)
    extra = ExtraBatches(lambda: toy_losses(model, x_val, y_val)[1], source="validation", limit=1,
                         parameters=trunk, method="m")
    displaced = extra.gradient(["a"], at=shift)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        offset = 0
        for p in reference.trunk.parameters():
            p.add_(shift[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()
    torch.testing.assert_close(displaced, flat_grad(toy_losses(reference, x_val, y_val)[1]["a"],
                                                    list(reference.trunk.parameters())))
    assert all(torch.equal(p, b) for p, b in zip(trunk, before, strict=True))
    fresh = copy.deepcopy(model)
    expected = flat_grad(toy_losses(fresh, x, y)[1]["b"], list(fresh.trunk.parameters()))
    torch.testing.assert_close(flat_grad(own["b"], trunk), expected, rtol=0, atol=0)


def test_a_closure_missing_a_task_or_without_graph_is_refused_with_the_task_named():
    model, _, (x_val, y_val) = setup()
    trunk = list(model.trunk.parameters())
    extra = ExtraBatches(lambda: {"a": toy_losses(model, x_val, y_val)[1]["a"]}, source="validation",
                         limit=3, parameters=trunk, method="m")
    with pytest.raises(ValueError, match="no loss for task 'b'"):
        extra.losses(["a", "b"])
    with torch.no_grad():
        detached = toy_losses(model, x_val, y_val)[1]
    extra = ExtraBatches(lambda: detached, source="validation", limit=1, parameters=trunk, method="m")
    with pytest.raises(ValueError, match="does not require grad"):
        extra.losses(["a"])


def test_nonfinite_extra_losses_and_gradients_raise_before_anything_is_written():
    model, (x, y), (x_val, y_val) = setup()

    def nan_loss():
        losses = toy_losses(model, x_val, y_val)[1]
        return {**losses, "a": losses["a"] * float("nan")}

    def nan_gradient():
        losses = toy_losses(model, x_val, y_val)[1]
        return {**losses, "a": losses["a"] + 0.0 * torch.sqrt(model.trunk[0].weight[0, 0] * 0)}

    for closure, error in ((nan_loss, NonFiniteLossError), (nan_gradient, NonFiniteGradientError)):
        model.zero_grad(set_to_none=True)
        balancer = taskbalance.make("hydalearn", TASKS, main="a", main_gradient="held_out")
        _, losses = toy_losses(model, x, y)
        with pytest.raises(error) as raised:
            balancer.backward(losses, shared=model.trunk.parameters(), extra_losses=closure)
        assert raised.value.tasks == ["a"]
        assert all(p.grad is None for p in model.parameters())
        assert balancer.step_count == 0


def test_under_propagate_a_nonfinite_extra_batch_is_not_checked_and_flows_on():
    model, (x, y), (x_val, y_val) = setup()

    def nan_loss():
        losses = toy_losses(model, x_val, y_val)[1]
        return {**losses, "a": losses["a"] * float("nan")}

    balancer = taskbalance.make("auto-lambda", TASKS, on_nonfinite="propagate")
    _, losses = toy_losses(model, x, y)
    record = balancer.backward(losses, shared=model.trunk.parameters(), extra_losses=nan_loss)
    assert record.weights.isnan().all() and balancer.weights.isnan().all()  # as plain PyTorch would


def test_extra_batch_methods_are_refused_under_data_parallelism():
    model, (x, y), (x_val, y_val) = setup()

    class Reducer:
        def globalize_losses(self, losses, tasks):
            return losses

    balancer = taskbalance.make("hydalearn", TASKS, main="a", main_gradient="held_out")
    balancer.set_reducer(Reducer())  # type: ignore[arg-type]
    _, losses = toy_losses(model, x, y)
    with pytest.raises(NotImplementedError, match="data parallelism"):
        balancer.backward(losses, shared=model.trunk.parameters(),
                          extra_losses=lambda: toy_losses(model, x_val, y_val)[1])


def test_the_cost_class_counts_extra_batches():
    class TwoTrainingBatches:
        extra_batches = 2
        extra_batch_source = "training"

    class OneValidationBatch:
        extra_batches = 1
        extra_batch_source = "validation"

    def info(cls):
        return MethodInfo("x", "gradient", frozenset(), "no", "", "", cls)

    assert info(TwoTrainingBatches).cost == "K batched VJPs + 2 extra training batches"
    assert info(OneValidationBatch).cost == "K batched VJPs + 1 extra validation batch"
    assert info(object).cost == "K batched VJPs"


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_skipping_a_nonfinite_task_keeps_the_extra_batches_for_the_rest(poison):
    model, (x, y), (x_val, y_val) = setup()
    z, losses = toy_losses(model, x, y)
    if poison == "loss":
        losses["b"] = losses["b"] * float("nan")
    else:  # the slow path that recomputes the flagged rows one task at a time
        losses["b"] = losses["b"] + torch.sqrt((z * 0).sum())
    balancer = taskbalance.make("hydalearn", TASKS, main="a", main_gradient="held_out", on_nonfinite="skip")
    record = balancer.backward(losses, shared=model.trunk.parameters(),
                               extra_losses=lambda: toy_losses(model, x_val, y_val)[1])
    assert "b" in record.skipped and float(record.weights[1]) == 0.0
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.trunk.parameters())


def test_a_replay_hands_out_its_fixed_jacobians_by_task_name_once_each():
    first, second = torch.arange(6.0).reshape(3, 2), -torch.arange(6.0).reshape(3, 2)
    replay = ReplayedExtraBatches([first, second], ["a", "b", "c"])
    torch.testing.assert_close(replay.jacobian(["c", "a"]), first[[2, 0]])
    torch.testing.assert_close(replay.gradient(["b"], at=torch.ones(2)), second[1])
    with pytest.raises(RuntimeError, match="holds 2 batch"):
        replay.jacobian(["a"])
