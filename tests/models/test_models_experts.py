"""Cross-stitch, CGC, PLE and DSelect-k: each architecture's defining structure, by gradients and gates."""

from __future__ import annotations

import pytest
import torch

import taskbalance as tb
from taskbalance.data import MultiTaskData, Split, Task, load, present_losses
from taskbalance.models import build_model
from taskbalance.models.dselect_k import DSelectKGate, smooth_step
from taskbalance.models.ple import PLE

TASKS = (Task("price", "regression"), Task("cut", "multiclass", num_classes=4), Task("sold", "binary"))
NEW = ["cross-stitch", "cgc", "ple", "dselect-k"]


def _data(n: int = 16) -> MultiTaskData:
    g = torch.Generator().manual_seed(0)

    def split() -> Split:
        return Split(
            x=torch.randn(n, 7, generator=g),
            y={
                "price": torch.randn(n, generator=g),
                "cut": torch.randint(0, 4, (n,), generator=g),
                "sold": torch.randint(0, 2, (n,), generator=g),
            },
        )

    return MultiTaskData(name="toy", tasks=TASKS, train=split(), val=split(), test=split())


def _grads_of_one_task(model, data, task: str) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    _, predictions = model(data.train.x)
    present_losses(data.tasks, predictions, data.train.y, data.train.mask)[task].backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _reached(grads, prefix: str) -> bool:
    return any(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if n.startswith(prefix))


@pytest.mark.parametrize("arch", NEW)
def test_builds_by_name_with_heads_for_every_task_kind_and_features_every_task_reads(arch):
    torch.manual_seed(0)
    data = _data()
    model = build_model(data, arch)
    features, predictions = model(data.train.x)
    assert predictions["price"].shape == (16,) and predictions["cut"].shape == (16, 4)
    for task in ("price", "cut", "sold"):  # the features= representation is read by every task
        model.zero_grad(set_to_none=True)
        features, predictions = model(data.train.x)
        loss = present_losses(data.tasks, predictions, data.train.y, data.train.mask)[task]
        (gradient,) = torch.autograd.grad(loss, features)
        assert float(gradient.abs().sum()) > 0, f"{arch}: {task} does not read the features"
    shared = {id(p) for p in model.shared_parameters()}
    specific = {id(p) for p in model.task_parameters()}
    assert shared and not shared & specific
    assert shared | specific == {id(p) for p in model.parameters()}


def test_ple_has_task_and_shared_experts_per_level_and_a_shared_gate_below_the_last():
    data = _data()
    model = build_model(data, "ple", levels=3, task_experts=2, shared_experts=3)
    assert isinstance(model, PLE)
    levels = list(model.trunk)
    assert len(levels) == 3
    for index, level in enumerate(levels):
        assert set(level.task_experts) == {"price", "cut", "sold"}
        assert all(len(experts) == 2 for experts in level.task_experts.values())
        assert len(level.shared_experts) == 3
        assert (
            level.task_gates["cut"].out_features == 2 + 3
        )  # own experts + shared ones, never another task's
        assert (level.shared_gate is None) == (index == 2)
        if level.shared_gate is not None:
            assert level.shared_gate.out_features == 3 * 2 + 3  # every expert of the level


def test_ple_last_level_task_experts_serve_one_task_and_shared_experts_serve_all():
    torch.manual_seed(0)
    data = _data()
    model = build_model(data, "ple")
    grads = _grads_of_one_task(model, data, "cut")
    assert _reached(grads, "trunk.1.task_experts.cut.")
    assert not _reached(grads, "trunk.1.task_experts.price.") and not _reached(
        grads, "trunk.1.task_gates.price"
    )
    assert _reached(grads, "trunk.1.shared_experts.") and _reached(grads, "trunk.0.shared_experts.")
    assert _reached(grads, "trunk.0.task_experts.price.")  # lower levels feed the shared gate: shared
    assert _reached(grads, "trunk.0.shared_gate.")


def test_cgc_is_one_level_and_a_task_never_reads_another_tasks_experts():
    torch.manual_seed(0)
    data = _data()
    model = build_model(data, "cgc")
    assert len(list(model.trunk)) == 1 and model.trunk[0].shared_gate is None
    grads = _grads_of_one_task(model, data, "sold")
    assert _reached(grads, "trunk.0.task_experts.sold.") and _reached(grads, "trunk.0.shared_experts.")
    assert not _reached(grads, "trunk.0.task_experts.price.") and not _reached(
        grads, "trunk.0.task_experts.cut."
    )


def test_cross_stitch_mixes_columns_with_identity_leaning_units_that_every_task_trains():
    torch.manual_seed(0)
    data = _data()
    model = build_model(data, "cross-stitch", hidden=(8, 8))
    alpha = model.trunk.stitches[0].alpha.detach()
    torch.testing.assert_close(alpha.diagonal(), torch.full((3,), 0.9))
    torch.testing.assert_close(alpha.sum(1), torch.ones(3))
    grads = _grads_of_one_task(model, data, "price")
    assert _reached(grads, "trunk.layers.0.1.") and _reached(grads, "trunk.layers.0.2.")  # other columns too
    assert _reached(grads, "trunk.stitches.1.alpha")
    with torch.no_grad():  # with α = I the columns are independent networks
        for stitch in model.trunk.stitches:
            stitch.alpha.copy_(torch.eye(3))
    grads = _grads_of_one_task(model, data, "price")
    assert not _reached(grads, "trunk.layers.0.1.") and _reached(grads, "trunk.layers.0.0.")


def test_smooth_step_reaches_zero_and_one_exactly_and_is_continuous():
    t = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)
    s = smooth_step(t, 1.0)
    assert bool((s[t <= -0.5] == 0).all()) and bool((s[t >= 0.5] == 1).all())
    assert float((s[1:] - s[:-1]).abs().max()) < 0.02 and bool((s[1:] >= s[:-1]).all())
    torch.testing.assert_close(smooth_step(torch.tensor(0.0), 1.0), torch.tensor(0.5))


@pytest.mark.parametrize(("experts", "k"), [(8, 2), (5, 3), (4, 1)])
def test_dselect_k_gate_is_a_distribution_and_k_sparse_once_saturated(experts, k):
    torch.manual_seed(0)
    gate = DSelectKGate(6, experts, k)
    x = torch.randn(32, 6)
    weights = gate(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))
    assert bool((weights >= 0).all())
    with torch.no_grad():  # saturated logits: every smooth-step at exactly 0 or 1
        gate.selector_logits.weight.zero_()
        gate.selector_logits.bias.copy_(torch.where(torch.rand(k * gate.bits) > 0.5, 3.0, -3.0))
    weights = gate(x)
    torch.testing.assert_close(weights.sum(-1), torch.ones(32))
    assert int((weights > 0).sum(-1).max()) <= k


def test_dselect_k_shares_the_experts_and_keeps_gates_per_task():
    torch.manual_seed(0)
    data = _data()
    model = build_model(data, "dselect-k", num_experts=4, k=2)
    grads = _grads_of_one_task(model, data, "cut")
    assert _reached(grads, "trunk.experts.") and _reached(grads, "trunk.gates.cut.")
    assert not _reached(grads, "trunk.gates.price.")
    assert float(model.gate_entropy(data.train.x).detach()) > 0


@pytest.mark.parametrize("arch", NEW)
def test_a_gradient_balancer_trains_each_architecture(arch):
    torch.manual_seed(0)
    data = load("synthetic_mmoe", n=300, correlation=0.8, input_dim=20)
    model = build_model(data, arch)
    balancer = tb.make("upgrad", tasks=data.task_names)
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
    assert total() < 0.8 * before


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ple", "dselect-k"])
def test_bench_on_a_csv_runs_with_the_architecture_chosen_by_name(arch, tmp_path):
    from typer.testing import CliRunner

    from taskbalance.cli import app

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    lines = ["a,b,c,d,price,sold"] + [
        ",".join(f"{v:.4f}" for v in row.tolist()) + f",{float(2 * row[0] + row[1]):.4f},{int(row[2] > 0)}"
        for row in x
    ]
    table = tmp_path / "data.csv"
    table.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--csv",
            str(table),
            "--target",
            "price:regression",
            "--target",
            "sold:binary",
            "--methods",
            "ew",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--arch",
            arch,
            "--no-baselines",
            "--no-report",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 run(s) executed" in result.output
