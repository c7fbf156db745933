"""The Gramian engine equals the Jacobian path: the Gramian ``J Jᵀ``, the update ``wᵀ J``, and whole
balancer steps (weights and every ``.grad``) for every Gramian-sufficient method, on an MLP, a CNN, an
embedding + LayerNorm model and a BatchNorm model in train mode."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import taskbalance
from taskbalance.gramian import GramianEngine
from taskbalance.jacobian import parameter_jacobian

TASKS = ["a", "b", "c"]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


class MLP(nn.Module):
    """Linear layers (one without bias, one called twice), an in-place ReLU after a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 24)
        self.l2 = nn.Linear(24, 24, bias=False)
        self.l3 = nn.Linear(24, 24)
        self.heads = nn.ModuleList([nn.Linear(24, 1) for _ in TASKS])

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu_(self.l1(x))
        h = self.l3(torch.tanh(self.l3(torch.tanh(self.l2(h)))))  # l3 twice: cross terms
        return torch.tanh(h)


class CNN(nn.Module):
    """Conv2d and Conv1d (with and without bias), BatchNorm2d in train mode, a linear layer on top."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, bias=False)
        self.c3 = nn.Conv1d(4, 4, 2)
        self.fc = nn.Linear(4 * 2, 12)
        self.heads = nn.ModuleList([nn.Linear(12, 1) for _ in TASKS])

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))  # (N, 4, 3, 3)
        h = torch.relu(self.c3(h.flatten(2)))  # (N, 4, 8)
        h = h.mean(-1, keepdim=True).expand(-1, -1, 2).flatten(1)
        return torch.tanh(self.fc(h))


class Tokens(nn.Module):
    """Embedding (with a padding index) + LayerNorm + a linear layer on 3-d input, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 10)
        self.heads = nn.ModuleList([nn.Linear(10, 1) for _ in TASKS])

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(self.norm(self.embed(x)))).mean(1)


class Normed(nn.Module):
    """BatchNorm1d in train mode between linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.l2 = nn.Linear(16, 16)
        self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in TASKS])

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.l2(torch.tanh(self.bn(self.l1(x)))))


MODELS = {"mlp": MLP, "cnn": CNN, "tokens": Tokens, "batchnorm": Normed}


def make_model(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(dtype).train()


def make_batch(name: str, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "tokens":
        x = torch.randint(0, 11, (6, 5), generator=g)
    elif name == "cnn":
        x = torch.randn(5, 2, 8, 8, generator=g, dtype=dtype)
    else:
        x = torch.randn(12, 6, generator=g, dtype=dtype)
    return x, torch.randn(x.shape[0], len(TASKS), generator=g, dtype=dtype)


def losses_of(model: nn.Module, x: Tensor, y: Tensor, scales: tuple[float, ...] = (1.0, 3.0, 0.2)
              ) -> dict[str, Tensor]:
    z = model(x)
    return {t: ((head(z).squeeze(-1) - y[:, i]) ** 2).mean() * scales[i]
            for i, (t, head) in enumerate(zip(TASKS, model.heads, strict=True))}


def shared_of(model: nn.Module) -> list[Tensor]:
    return [p for n, p in model.named_parameters() if not n.startswith("heads")]


def relative(got: Tensor, expected: Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------------------------- the engine alone
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("form", ["b_side", "direct"])
@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_gramian_and_update_equal_the_jacobian(model_name, dtype, form, batching):
    model = make_model(model_name, dtype)
    x, y = make_batch(model_name, dtype, seed=1)
    shared = shared_of(model)
    roots = torch.stack(list(losses_of(model, x, y).values()))
    jacobian = parameter_jacobian(roots, shared).to(torch.float64)
    expected_gramian = jacobian @ jacobian.T
    weights = torch.tensor([0.7, -0.2, 1.3], dtype=dtype)
    expected_update = weights.to(torch.float64) @ jacobian

    engine = GramianEngine(form=form, batching=batching)
    roots = torch.stack(list(losses_of(model, x, y).values()))
    step = engine.gramian(roots, shared)
    assert step.gramian.dtype == torch.float64
    assert relative(step.gramian, expected_gramian) < TOLERANCE[dtype]
    model.zero_grad(set_to_none=True)
    engine.apply(step, weights, weights, shared)
    update = torch.cat([p.grad.reshape(-1) for p in shared]).to(torch.float64)
    assert relative(update, expected_update) < TOLERANCE[dtype]


def test_recognised_layers_and_fallback():
    """Linear, conv and embedding weights are read from their nodes; norms' affine parameters fall back."""
    for name, recognised, fallback in [("mlp", 3, 0), ("cnn", 4, 2), ("tokens", 2, 2), ("batchnorm", 2, 2)]:
        model = make_model(name, torch.float64)
        x, y = make_batch(name, torch.float64, seed=0)
        roots = torch.stack(list(losses_of(model, x, y).values()))
        step = GramianEngine().gramian(roots, shared_of(model))
        assert len(step.layers) == recognised, name
        assert len(step.fallback) == fallback, name
        assert len(step.heads) == 2 * len(TASKS)


def test_cost_model_picks_b_side_for_a_wide_layer_and_small_batch():
    torch.manual_seed(0)
    layer = nn.Linear(256, 256)
    heads = [nn.Linear(256, 1) for _ in TASKS]
    z = layer(torch.randn(8, 256))
    roots = torch.stack([h(z).pow(2).mean() for h in heads])
    step = GramianEngine().gramian(roots, list(layer.parameters()))
    assert [layer.form for layer in step.layers] == ["b_side"]
    torch.manual_seed(0)
    narrow = nn.Linear(4, 4)
    z = narrow(torch.randn(512, 4))
    roots = torch.stack([z[:, i].pow(2).mean() for i in range(3)])
    step = GramianEngine().gramian(roots, list(narrow.parameters()))
    assert [layer.form for layer in step.layers] == ["direct"]


def test_the_gramian_of_a_float32_model_is_accumulated_in_float64():
    """4M-entry per-task gradients of one parameter, all positive (no cancellation to hide rounding): a
    float32 product ``J Jᵀ`` is off by about 2e-5 (the control), the engine's float64 accumulation by 1e-9."""
    g = torch.Generator().manual_seed(0)
    n = 4_000_000
    coefficients = torch.rand(len(TASKS), n, generator=g) + 1.0  # ∇ L_k = coefficients[k]
    parameter = nn.Parameter(torch.ones(n))
    roots = (coefficients * parameter).sum(1)
    step = GramianEngine().gramian(roots, [parameter])
    exact = coefficients.double() @ coefficients.double().T
    assert step.gramian.dtype == torch.float64
    assert relative(step.gramian, exact) < 1e-7
    assert relative((coefficients @ coefficients.T).double(), exact) > 1e-7  # float32 accumulation fails it


@pytest.mark.parametrize("form", ["b_side", "direct"])
def test_float32_products_summed_in_float64_on_a_wide_layer(form):
    """Layers wider than one float32 chunk (1024 terms, with a remainder) and a long batch: the float32
    products summed in float64 still equal the float64 Gramian of the float32 Jacobian."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(40, 70), nn.Tanh(), nn.Linear(70, 45), nn.Tanh())
    heads = [nn.Linear(45, 1) for _ in TASKS]
    x = torch.randn(300, 40) + 0.5  # an offset: per-sample gradients larger than their mean
    shared = list(trunk.parameters())

    def roots() -> Tensor:
        z = trunk(x)
        return torch.stack([(h(z).squeeze(-1) - i).pow(2).mean() for i, h in enumerate(heads)])

    jacobian = parameter_jacobian(roots(), shared).to(torch.float64)
    step = GramianEngine(form=form).gramian(roots(), shared)
    assert [layer.form for layer in step.layers] == [form, form]
    assert relative(step.gramian, jacobian @ jacobian.T) < TOLERANCE[torch.float32]
    assert torch.equal(step.gramian, step.gramian.T)


def test_direct_form_layers_drop_their_output_gradients_once_their_gram_block_is_formed():
    """Their per-task gradients live only in the step's packs (or large pieces), which the update reads;
    ``rows_of`` shows them, equal to the Jacobian's rows."""
    model = make_model("cnn", torch.float64)
    x, y = make_batch("cnn", torch.float64, seed=0)
    shared = shared_of(model)
    jacobian = parameter_jacobian(torch.stack(list(losses_of(model, x, y).values())), shared)
    step = GramianEngine().gramian(torch.stack(list(losses_of(model, x, y).values())), shared)
    direct = [layer for layer in step.layers if layer.form == "direct"]
    assert direct
    assert all(layer.deltas == [] and layer.inputs == [] and layer.packed for layer in direct)
    columns = dict(zip(map(id, shared), jacobian.split([p.numel() for p in shared], dim=1), strict=True))
    for p in [p for layer in direct for p in (layer.group.weight, layer.group.bias) if p is not None]:
        rows = step.rows_of(p)
        assert rows.shape == (len(TASKS), *p.shape)
        assert relative(rows.reshape(len(TASKS), -1), columns[id(p)]) < TOLERANCE[torch.float64]
    with pytest.raises(KeyError):
        step.rows_of(torch.zeros(1))


def test_in_place_change_of_a_saved_input_is_refused_by_autograd():
    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    h = torch.tanh(x)
    z = layer(h)
    h.mul_(2)  # modifies the layer's saved input after the layer ran
    roots = torch.stack([z[:, i].sum() for i in range(3)])
    with pytest.raises(RuntimeError, match="inplace"):
        GramianEngine().gramian(roots, list(layer.parameters()))


def test_batching_is_chosen_once_per_graph_shape():
    model = make_model("cnn", torch.float32)
    engine = GramianEngine()
    for seed in range(6):
        x, y = make_batch("cnn", torch.float32, seed)
        engine.gramian(torch.stack(list(losses_of(model, x, y).values())), shared_of(model))
    assert len(engine._batching.chosen) == 1
    assert next(iter(engine._batching.chosen.values())) in ("vmap", "loop")


# ---------------------------------------------------------------------------------- whole balancer steps
def gramian_methods() -> list[str]:
    """Every gradient method of the registry that needs only the Gramian with its default hyper-parameters."""
    return [
        m.name for m in taskbalance.available()
        if m.family == "gradient" and m.feature_level != "only"
        and taskbalance.make(m.name, TASKS, gradients="parameters").needs == "gramian"
    ]


def test_the_methods_compared_are_every_gramian_sufficient_one():
    assert {"mgda", "upgrad", "dualproj", "imtl-g", "imtl", "nash-mtl", "cagrad", "aligned-mtl", "pcgrad",
            "gradvac", "tensioners", "gcs", "ol-aux", "gradnorm", "hydalearn"} <= set(gramian_methods())


@dataclass
class Run:
    weights: list[Tensor]  # per step
    grads: list[dict[str, Tensor]]  # per step: every parameter's .grad
    state: dict[str, Tensor]  # the balancer's tensor state after the last step
    gramian_runs: int  # calls of the Gramian engine


def run_steps(method: str, engine: str, model: nn.Module, model_name: str, dtype: torch.dtype,
              monkeypatch: pytest.MonkeyPatch) -> Run:
    torch.manual_seed(123)  # randomised methods (PCGrad, GradVac) draw the same numbers on both paths
    balancer = taskbalance.make(method, TASKS, gradients="parameters", engine=engine)
    assert balancer.needs == "gramian"
    calls = [0]
    gramian = GramianEngine.gramian

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return gramian(self, *args, **kwargs)

    monkeypatch.setattr(GramianEngine, "gramian", counting)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    run = Run([], [], {}, 0)
    for seed in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        x, y = make_batch(model_name, dtype, seed)
        record = balancer.backward(losses_of(model, x, y), shared=shared_of(model))
        run.weights.append(record.weights)
        run.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        balancer.end_epoch()
    monkeypatch.undo()
    state = balancer.state_dict().items()
    run.state = {k: v for k, v in state if isinstance(v, Tensor) and v.is_floating_point()}
    run.gramian_runs = calls[0]
    return run


STEPS = 3
# Each parameter's .grad is compared relative to its own largest entry, or to FLOOR × the model's largest
# entry where that is larger. float64: no floor. float32: a gradient 1e-4 of the largest is a sum of
# cancelling terms (a head's bias once the head fits) whose float32 rounding depends on the summation order
# (we measured up to 1.6e-4 of itself), so below 1 % of the largest it is compared to 1 % of the largest.
FLOOR = {torch.float64: 0.0, torch.float32: 1e-2}
# The biases right before BatchNorm (cnn, batchnorm): their gradient is 0 in exact arithmetic and rounding
# otherwise, so they are compared to the model's largest entry.
ZERO_IN_EXACT_ARITHMETIC = {"c1.bias", "l1.bias"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", gramian_methods())
def test_gramian_engine_step_equals_jacobian_step(method, model_name, dtype, monkeypatch):
    """Three SGD steps on each path from the same model: the weights, every parameter's ``.grad`` at every
    step, and the balancer's state, equal to 1e-10 (float64) or 1e-5 (float32) relative."""
    model = make_model(model_name, dtype)
    twin = copy.deepcopy(model)
    jacobian = run_steps(method, "jacobian", model, model_name, dtype, monkeypatch)
    gramian = run_steps(method, "gramian", twin, model_name, dtype, monkeypatch)
    assert (jacobian.gramian_runs, gramian.gramian_runs) == (0, STEPS)
    tolerance = TOLERANCE[dtype]
    for got, expected in zip(gramian.weights, jacobian.weights, strict=True):
        assert relative(got, expected) < tolerance, (got, expected)
    for grads_g, grads_j in zip(gramian.grads, jacobian.grads, strict=True):
        assert grads_g.keys() == grads_j.keys() == {n for n, _ in model.named_parameters()}
        scale = max(float(g.abs().max()) for g in grads_j.values())
        for name, expected in grads_j.items():
            own = float(expected.abs().max())
            error = float((grads_g[name] - expected).abs().max())
            floor = 1.0 if name in ZERO_IN_EXACT_ARITHMETIC else FLOOR[dtype]
            assert error <= tolerance * max(own, floor * scale), (name, own / scale, error / scale)
    assert gramian.state.keys() == jacobian.state.keys()
    for name, expected in jacobian.state.items():
        assert relative(gramian.state[name], expected) < tolerance, name


def test_engine_override_is_checked():
    with pytest.raises(ValueError, match="needs the Jacobian"):
        taskbalance.make("db-mtl", TASKS, engine="gramian")
    with pytest.raises(ValueError, match="engine must be"):
        taskbalance.make("mgda", TASKS, engine="fast")
    assert taskbalance.make("mgda", TASKS, engine="jacobian").engine == "jacobian"


# ------------------------------------------------------------------------- partial Gramian (approximation)
def test_partial_gramian_weights_come_from_the_last_layers_and_update_every_layer():
    model = make_model("mlp", torch.float64)
    x, y = make_batch("mlp", torch.float64, seed=2)
    shared = shared_of(model)
    last = [model.l3.weight, model.l3.bias]  # l3 is the last shared layer (called twice)
    roots = torch.stack(list(losses_of(model, x, y).values()))
    jacobian = parameter_jacobian(roots, shared)
    last_jacobian = parameter_jacobian(roots, last)
    reference = taskbalance.make("mgda", TASKS)
    from taskbalance.balancers.base import GradientStep

    weights = reference.aggregate(GradientStep.of(last_jacobian)).weights
    expected = weights @ jacobian

    balancer = taskbalance.make("mgda", TASKS).set_engine("gramian", last_layers=1)
    model.zero_grad(set_to_none=True)
    record = balancer.backward(losses_of(model, x, y), shared=shared)
    torch.testing.assert_close(record.weights, weights, rtol=1e-10, atol=1e-12)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for head, w in zip(model.heads, weights, strict=True):  # heads: their own task's gradient, weighted
        assert head.weight.grad is not None and float(w) > 0


def test_partial_gramian_walks_the_graph_once_per_step(monkeypatch):
    """The heads its update's backward reaches come from the Gramian's own walk, not a second one."""
    import taskbalance.gramian as gramian_module

    walks = []
    real = gramian_module._read_graph
    monkeypatch.setattr(gramian_module, "_read_graph", lambda *a, **k: walks.append(1) or real(*a, **k))
    model = make_model("mlp", torch.float64)
    x, y = make_batch("mlp", torch.float64, seed=4)
    balancer = taskbalance.make("upgrad", TASKS).set_engine("gramian", last_layers=1)
    balancer.backward(losses_of(model, x, y), shared=shared_of(model))
    assert len(walks) == 1
    assert all(head.weight.grad is not None for head in model.heads)


def test_partial_gramian_over_every_layer_is_the_exact_step():
    model = make_model("mlp", torch.float64)
    twin = copy.deepcopy(model)
    x, y = make_batch("mlp", torch.float64, seed=3)
    exact = taskbalance.make("upgrad", TASKS, engine="jacobian")
    partial = taskbalance.make("upgrad", TASKS).set_engine("gramian", last_layers=10)
    record_exact = exact.backward(losses_of(model, x, y), shared=shared_of(model))
    record_partial = partial.backward(losses_of(twin, x, y), shared=shared_of(twin))
    torch.testing.assert_close(record_partial.weights, record_exact.weights, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_partial_gramian_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="positive"):
        GramianEngine(last_layers=0)
    with pytest.raises(ValueError, match="Gramian engine"):
        taskbalance.make("mgda", TASKS).set_engine("jacobian", last_layers=2)
    model = make_model("mlp", torch.float64)
    x, y = make_batch("mlp", torch.float64, seed=0)
    roots = torch.stack(list(losses_of(model, x, y).values()))
    with pytest.raises(ValueError, match="data parallelism"):
        GramianEngine(last_layers=1).gramian(roots, shared_of(model), lambda rows: rows)
