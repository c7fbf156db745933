"""The Jacobian path keeps the K × P Jacobian as its per-input blocks: the float64 Gramian and the update are
formed block by block, equal to the joined matrix's, and the matrix is never joined for a method that needs
only the Gramian."""

import pytest
import torch
from toy import ToyMultiTask, toy_batch, toy_losses

import taskbalance
from taskbalance import jacobian as jacobian_module
from taskbalance.balancers.base import GradientStep
from taskbalance.jacobian import (
    JacobianBlocks,
    batched_jacobian,
    exact_gramian,
    jacobian_blocks,
    parameter_jacobian,
)

TASKS = ["a", "b", "c"]


def random_blocks(k, widths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype) * 10 ** (i % 3) for i, n in
            enumerate(widths)]


@pytest.mark.parametrize("chunk", [5, 64, 1 << 18])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 7, 9, 11])  # above 8 rows: the lower triangle, mirrored
def test_exact_gramian_is_the_float64_product_of_the_joined_matrix(monkeypatch, chunk, dtype, k):
    monkeypatch.setattr(jacobian_module, "_GRAM_CHUNK", chunk)  # small: many chunks, blocks cut and joined
    blocks = random_blocks(k, [1, 3, 50, 2, 200, 7], dtype)
    wide = torch.cat(blocks, dim=1).to(torch.float64)
    expected = wide @ wide.T
    got = exact_gramian(blocks)
    assert got.dtype == torch.float64 and got.shape == (k, k)
    assert torch.equal(got, got.T) or k <= 8
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)


def test_exact_gramian_of_mixed_dtypes_and_empty_blocks():
    blocks = [torch.randn(3, 5).half(), torch.randn(3, 0), torch.randn(3, 7)]
    wide = torch.cat([b.double() for b in blocks], dim=1)
    torch.testing.assert_close(exact_gramian(blocks), wide @ wide.T, rtol=1e-13, atol=0)
    assert torch.equal(exact_gramian([torch.randn(2, 0)]), torch.zeros(2, 2, dtype=torch.float64))
    assert exact_gramian([torch.randn(0, 4)]).shape == (0, 0)


def test_exact_gramian_widens_before_multiplying():
    # (1 + 2⁻¹²)² = 1 + 2⁻¹¹ + 2⁻²⁴: the last term is lost by a float32 product, kept exactly in float64
    entry = 1 + 2.0**-12
    row = torch.full((1, 4096), entry, dtype=torch.float32)
    exact = 4096 * entry**2  # exact in float64: the sum of 4096 equal exact terms
    assert float(exact_gramian([row[:, :1000], row[:, 1000:]])[0, 0]) == exact
    assert float((row @ row.T)[0, 0]) != exact  # what a float32 Gramian would give


def test_blocks_combine_select_and_checks_match_the_joined_matrix():
    shapes = [torch.Size([2, 3]), torch.Size([4]), torch.Size([1, 1, 5])]
    blocks = JacobianBlocks(random_blocks(3, [6, 4, 5], torch.float32), shapes)
    matrix = blocks.matrix()
    assert matrix.shape == (3, 15) and matrix.data_ptr() != blocks.blocks[0].data_ptr()
    weights = torch.tensor([0.5, -2.0, 1.5])
    updates = blocks.combine(weights)
    assert [u.shape for u in updates] == shapes
    torch.testing.assert_close(torch.cat([u.reshape(-1) for u in updates]), weights @ matrix)
    keep = torch.tensor([2, 0])
    torch.testing.assert_close(blocks.select(keep).matrix(), matrix[keep])
    views = JacobianBlocks.of_matrix(matrix, shapes)
    starts = [0, 6, 10]  # the blocks are views into the matrix
    assert all(v.data_ptr() == matrix[:, s:].data_ptr() for v, s in zip(views.blocks, starts, strict=True))
    assert torch.equal(views.matrix(), matrix)
    torch.testing.assert_close(blocks.sum64(), matrix.sum(dtype=torch.float64))
    assert blocks.finite_rows().all()
    blocks.blocks[2][1, 3] = float("nan")
    assert blocks.finite_rows().tolist() == [True, False, True]
    assert torch.isnan(blocks.sum64())
    assert blocks.divided(torch.tensor(4.0)).blocks[0].equal(blocks.blocks[0] / 4)


def test_jacobian_blocks_are_the_batched_jacobian_uncut():
    torch.manual_seed(0)
    model = ToyMultiTask(TASKS, norm=True)
    x, y = toy_batch(TASKS)
    _, losses = toy_losses(model, x, y)
    stacked = torch.stack([losses[t] for t in TASKS])
    stray = torch.zeros(4, requires_grad=True)
    inputs = [*model.trunk.parameters(), stray]
    blocks, unreached = jacobian_blocks(stacked, inputs)
    matrix, unreached_joined = batched_jacobian(stacked, inputs)
    assert unreached == unreached_joined == [len(inputs) - 1]
    assert [b.shape for b in blocks.blocks] == [(3, x.numel()) for x in inputs]
    assert blocks.shapes == tuple(x.shape for x in inputs)
    assert torch.equal(blocks.matrix(), matrix)
    assert torch.equal(blocks.blocks[-1], torch.zeros(3, 4))


# ------------------------------------------------------------------------------------ whole balancer steps
def one_step(method, model, seed=0, **kwargs):
    balancer = taskbalance.make(method, TASKS, engine="jacobian", **kwargs)
    x, y = toy_batch(TASKS, seed=seed)
    _, losses = toy_losses(model, x, y)
    model.zero_grad(set_to_none=True)
    record = balancer.backward(losses, shared=list(model.trunk.parameters()))
    return record, {n: p.grad for n, p in model.named_parameters()}


def reference_step(method, model, seed=0, **kwargs):
    """The step assembled by hand from the joined Jacobian: ``wᵀJ`` into the trunk, ``wₖ ∇Lₖ`` into head k
    (``∇Lₖ`` for methods that leave the heads unscaled)."""
    balancer = taskbalance.make(method, TASKS, engine="jacobian", **kwargs)
    x, y = toy_batch(TASKS, seed=seed)
    _, losses = toy_losses(model, x, y)
    stacked = torch.stack([losses[t] for t in TASKS])
    shared = list(model.trunk.parameters())
    jac = parameter_jacobian(stacked, shared)
    aggregation = balancer.aggregate(GradientStep.of(jac, stacked.detach()))
    flat = aggregation.shared_update(jac)
    grads, start = {}, 0
    for name, p in model.trunk.named_parameters():
        grads[f"trunk.{name}"] = flat[start:start + p.numel()].view_as(p)
        start += p.numel()
    for i, task in enumerate(TASKS):
        head = list(model.heads[task].parameters())
        for (name, _), g in zip(model.heads[task].named_parameters(),
                                torch.autograd.grad(losses[task], head, retain_graph=True), strict=True):
            grads[f"heads.{task}.{name}"] = aggregation.weights[i] * g if balancer.scale_heads else g
    return aggregation.weights, grads


@pytest.mark.parametrize("method", ["upgrad", "mgda", "imtl-g", "db-mtl"])  # upgrad: heads unscaled
def test_jacobian_path_equals_the_step_assembled_from_the_joined_matrix(monkeypatch, method):
    torch.manual_seed(1)
    model = ToyMultiTask(TASKS, norm=True)
    weights, expected = reference_step(method, model)
    needs_matrix = taskbalance.make(method, TASKS).needs == "jacobian"
    if not needs_matrix:  # a Gramian method: the K × P matrix is never joined on the Jacobian path

        def refuse(self):
            raise AssertionError("the K x P matrix was joined for a method that needs only the Gramian")

        monkeypatch.setattr(JacobianBlocks, "matrix", refuse)
    record, got = one_step(method, model)
    torch.testing.assert_close(record.weights, weights.to(record.weights.dtype), rtol=1e-5, atol=1e-7)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def losses_with_a_nan_gradient(model, x, y):
    """Task b's loss is finite (0 added) but its gradient is NaN everywhere: sqrt' at 0 times 0."""
    _, losses = toy_losses(model, x, y)
    z, out = model(x)
    losses["b"] = losses["b"] + torch.sqrt(((out["b"] - out["b"].detach()) ** 2).mean())
    return losses


def test_a_task_dropped_for_a_nonfinite_gradient_leaves_its_head_untouched():
    torch.manual_seed(3)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    balancer = taskbalance.make("upgrad", TASKS, engine="jacobian", on_nonfinite="skip")
    record = balancer.backward(losses_with_a_nan_gradient(model, x, y), shared=list(model.trunk.parameters()))
    assert record.skipped == {"b": "non-finite gradient"}
    assert all(p.grad is None for p in model.heads["b"].parameters())
    grads = [p.grad for n, p in model.named_parameters() if not n.startswith("heads.b")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the kept tasks' step is the step without task b
    twin = ToyMultiTask(TASKS)
    twin.load_state_dict(model.state_dict())
    _, losses = toy_losses(twin, x, y)
    del losses["b"]
    reference = taskbalance.make("upgrad", TASKS, engine="jacobian")
    reference.backward(losses, shared=list(twin.trunk.parameters()))
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_nonfinite_gradient_raises_and_writes_nothing():
    torch.manual_seed(4)
    model = ToyMultiTask(TASKS)
    x, y = toy_batch(TASKS)
    balancer = taskbalance.make("mgda", TASKS, engine="jacobian")
    with pytest.raises(taskbalance.NonFiniteGradientError, match="b"):
        balancer.backward(losses_with_a_nan_gradient(model, x, y), shared=list(model.trunk.parameters()))
    assert all(p.grad is None for p in model.parameters())
