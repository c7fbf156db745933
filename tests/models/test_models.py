"""build_model: trunks and heads fit the tasks; MMoE's gates and shared parts behave as documented."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.data import MultiTaskData, Split, Task, load, present_losses
from taskbalance.jacobian import feature_jacobian
from taskbalance.models import MMoE, MultiTaskModel, build_model

MIXED = (Task("price", "regression"), Task("cut", "multiclass", num_classes=4), Task("sold", "binary"))


def _data(input_shape: tuple[int, ...] = (7,), name: str = "toy", n: int = 12) -> MultiTaskData:
    g = torch.Generator().manual_seed(0)

    def split() -> Split:
        return Split(
            x=torch.randn(n, *input_shape, generator=g),
            y={
                "price": torch.randn(n, generator=g),
                "cut": torch.randint(0, 4, (n,), generator=g),
                "sold": torch.randint(0, 2, (n,), generator=g),
            },
        )

    return MultiTaskData(name=name, tasks=MIXED, train=split(), val=split(), test=split())


@pytest.mark.parametrize(
    ("arch", "shape"),
    [("mlp", (7,)), ("qm9", (7,)), ("mmoe", (7,)), ("cnn", (1, 28, 28)), ("mlp", (1, 28, 28))],
)
def test_heads_follow_the_task_kinds(arch: str, shape: tuple[int, ...]) -> None:
    data = _data(shape)
    model = build_model(data, arch)
    assert isinstance(model, MultiTaskModel) and isinstance(model.heads, nn.ModuleDict)
    assert list(model.heads) == ["price", "cut", "sold"]
    features, predictions = model(data.train.x)
    assert features.shape[0] == 12
    assert predictions["price"].shape == (12,) and predictions["sold"].shape == (12,)
    assert predictions["cut"].shape == (12, 4)
    losses = present_losses(data.tasks, predictions, data.train.y, data.train.mask)
    assert set(losses) == {"price", "cut", "sold"} and all(torch.isfinite(v) for v in losses.values())


def test_auto_picks_the_architecture_from_the_data() -> None:
    assert isinstance(build_model(_data((1, 28, 28))).trunk.conv, nn.Sequential)  # type: ignore[union-attr]
    qm9_like = build_model(_data((34,), name="qm9"))
    assert [m.out_features for m in qm9_like.trunk if isinstance(m, nn.Linear)] == [256, 256, 256]
    assert any(isinstance(m, nn.SiLU) for m in qm9_like.trunk.modules())
    plain = build_model(_data((7,)))
    assert [m.out_features for m in plain.trunk if isinstance(m, nn.Linear)] == [256, 256]


def test_options_reach_the_architecture_and_unknown_ones_are_errors() -> None:
    model = build_model(_data(), "mlp", hidden=(16, 8), head_hidden=(5,))
    features, _ = model(torch.randn(3, 7))
    assert features.shape == (3, 8)
    assert [m.out_features for m in model.heads["cut"] if isinstance(m, nn.Linear)] == [5, 4]
    with pytest.raises(TypeError, match="unknown option.*num_experts"):
        build_model(_data(), "mlp", num_experts=3)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model(_data(), "transformer")
    with pytest.raises(ValueError, match="image inputs"):
        build_model(_data((7,)), "cnn")
    with pytest.raises(ValueError, match="too small"):
        build_model(_data((1, 8, 8)), "cnn")
    with pytest.raises(ValueError, match="activation"):
        build_model(_data(), "mlp", act="swishy")


def test_mmoe_gates_are_softmax_mixtures_and_features_are_per_task() -> None:
    data = _data()
    model = build_model(data, "mmoe", num_experts=3, expert_size=6)
    assert isinstance(model, MMoE)
    assert set(model.trunk.keys()) == {"experts", "gates"}  # type: ignore[operator]
    mixtures, experts, predictions = model.forward_with_experts(data.train.x)
    assert mixtures.shape == (12, 3, 6) and experts.shape == (12, 3, 6)
    gates = model.trunk["gates"](data.train.x)  # type: ignore[index]
    assert torch.allclose(gates.sum(-1), torch.ones(12, 3)) and bool((gates > 0).all())
    assert torch.allclose(mixtures, torch.einsum("bke,bed->bkd", gates, experts))
    features, again = model(data.train.x)
    assert torch.equal(features, mixtures) and torch.equal(again["cut"], predictions["cut"])


def test_mmoe_shared_parameters_are_the_experts_and_each_gate_serves_one_task() -> None:
    data = _data()
    model = build_model(data, "mmoe", num_experts=3)
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.trunk["experts"].parameters()}  # type: ignore[index]
    task_specific = {id(p) for p in model.task_parameters()}
    assert shared.isdisjoint(task_specific)
    assert shared | task_specific == {id(p) for p in model.parameters()}
    _, predictions = model(data.train.x)
    loss = Task("price", "regression").loss(predictions["price"], data.train.y["price"])
    loss.backward()
    gates = model.trunk["gates"].gates  # type: ignore[index]
    assert gates["price"].weight.grad is not None and float(gates["price"].weight.grad.abs().sum()) > 0
    assert gates["cut"].weight.grad is None and gates["sold"].weight.grad is None


def test_mmoe_expert_outputs_are_the_feature_level_representation() -> None:
    data = _data()
    model = build_model(data, "mmoe", num_experts=3)
    _, experts, predictions = model.forward_with_experts(data.train.x)
    losses = torch.stack([t.loss(predictions[t.name], data.train.y[t.name]) for t in data.tasks])
    on_experts = feature_jacobian(losses, [experts], retain_graph=True)
    off_diagonal = (on_experts @ on_experts.T)[~torch.eye(3, dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) > 0  # tasks interact through the shared experts
    balancer = tb.make("mgda-ub", tasks=data.task_names)
    balancer.backward(
        dict(zip(data.task_names, losses, strict=True)), shared=model.shared_parameters(), features=experts
    )
    for parameter in model.parameters():
        assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all())
    assert float(model.trunk["gates"].gates["cut"].weight.grad.abs().sum()) > 0  # type: ignore[index]


@pytest.mark.parametrize("arch", ["mlp", "mmoe"])
def test_a_balancer_trains_the_model(arch: str) -> None:
    torch.manual_seed(0)
    data = load("synthetic_mmoe", n=300, correlation=0.8, input_dim=20)
    options = (
        {"hidden": (16,)} if arch == "mlp" else {"num_experts": 2, "expert_hidden": (16,), "expert_size": 8}
    )
    model = build_model(data, arch, **options)
    balancer = tb.make("pcgrad", tasks=data.task_names)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)

    def total() -> float:
        with torch.no_grad():
            _, out = model(data.val.x)
            return float(sum(t.loss(out[t.name], data.val.y[t.name]) for t in data.tasks))

    before = total()
    for _ in range(15):
        optimiser.zero_grad()
        _, predictions = model(data.train.x)
        losses = present_losses(data.tasks, predictions, data.train.y, data.train.mask)
        balancer.backward(losses, shared=model.shared_parameters())
        optimiser.step()
    assert total() < 0.7 * before
    assert all(p.grad is not None for p in model.parameters())


def test_models_deep_copy_and_round_trip_state_dict() -> None:
    torch.manual_seed(0)
    data = _data((1, 28, 28))
    model = build_model(data)
    model(data.train.x)
    snapshot = copy.deepcopy(model)
    torch.manual_seed(1)
    fresh = build_model(data)
    fresh.load_state_dict(snapshot.state_dict())
    assert torch.equal(fresh(data.val.x)[1]["cut"], model(data.val.x)[1]["cut"])
