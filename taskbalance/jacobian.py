"""The one place that computes per-task gradients.

Two entry points, both batched over tasks in a single autograd call (:func:`batched_vjp`: the vmapped
vector-Jacobian product of ``torch.autograd.grad(..., is_grads_batched=True)``, without its Python layers;
the Gramian engine uses it too):

* :func:`parameter_jacobian` — the ``K × P`` matrix of per-task gradients w.r.t. shared parameters;
* :func:`feature_jacobian` — the ``K × N`` matrix of per-task gradients w.r.t. a shared feature tensor
  (MGDA-UB style); the combined feature gradient then needs only one ordinary trunk backward
  (:func:`backward_through`).

The balancers' Jacobian path keeps the matrix as its column blocks (:func:`jacobian_blocks`,
:class:`JacobianBlocks`: one ``(K, n_i)`` view per input, as autograd returns them): its float64 Gramian
(:func:`exact_gramian`) and the update ``wᵀJ`` are formed block by block, so neither the concatenated
``K × P`` matrix nor a float64 copy of it is ever made unless a method asks for the matrix itself.

Where an operation has no batching rule and the batched call fails, both fall back to a loop of
``autograd.grad`` calls and warn once. :func:`batched_jacobian` takes a
:class:`taskbalance.batching.BatchingChoice` to use a loop over the tasks instead where that is faster
(convolutions on CPU), decided once per shape and remembered. Nothing here leaves the
tensors' device.
"""

from __future__ import annotations

import contextvars
import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .batching import Batching, BatchingChoice, preferred_mode

__all__ = [
    "JacobianBlocks",
    "jacobian_blocks",
    "exact_gramian",
    "batched_jacobian",
    "parameter_jacobian",
    "feature_jacobian",
    "reachable_leaves",
    "accumulate_grad",
    "add_to_grad",
    "backward_through",
    "batched_vjp",
]

_warned_fallback = False
_F64 = torch.float64
_GRAM_CHUNK = 1 << 18  # most entries of the float64 buffer exact_gramian streams the columns through (2 MiB)
_GRAM_FLOOR = 1 << 13  # least entries of that buffer (unless J is smaller)
_FULL_PRODUCT_ROWS = 8  # exact_gramian: the whole k × k product up to this many rows, else the lower half
_eye_cache: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _eye(k: int, like: Tensor) -> Tensor:
    key = (k, like.dtype, like.device)
    eye = _eye_cache.get(key)
    if eye is None:
        eye = torch.eye(k, dtype=like.dtype, device=like.device)
        _eye_cache[key] = eye
    return eye


def _lean_batched_available() -> bool:
    return all(
        callable(getattr(owner, name, None))
        for owner, name in (
            (torch, "_add_batch_dim"),
            (torch, "_remove_batch_dim"),
            (torch._C, "_vmapmode_increment_nesting"),
            (torch._C, "_vmapmode_decrement_nesting"),
            (torch._C, "_stash_obj_in_tls"),
            (torch._C, "_remove_obj_from_tls"),
        )
    ) and hasattr(torch.autograd.Variable, "_execution_engine")


_LEAN = _lean_batched_available()


def batched_vjp(
    roots: Tensor,
    inputs: Sequence[Tensor | GradientEdge],
    retain_graph: bool,
    *,
    materialize: bool = True,
    lean: bool = True,
) -> list[Tensor | None]:
    """``∂ roots[k] / ∂ input`` for every ``k``: one ``(k, *input shape)`` tensor per input (a tensor or a
    :class:`~torch.autograd.graph.GradientEdge`); for an input no root reaches, zeros (``materialize``) or
    ``None``.

    The vmapped vector-Jacobian product of ``torch.autograd.grad(roots, inputs, grad_outputs=I,
    is_grads_batched=True, allow_unused=True)``, called without that function's Python layers (argument
    checks, pytree flattening and ``in_dims`` validation of the cotangents: about 0.1 ms a call, a fifth of a
    whole step on a small model): the identity cotangent gets its batch dimension and the autograd engine
    runs once, as inside ``torch.autograd.grad``. ``lean=False``, a torch without these internals, or
    tensors that override torch functions take the public call; both give bit-identical results (tested).
    """
    k = roots.shape[0]
    eye = _eye(k, roots)
    targets: Any = tuple(inputs)
    if lean and _LEAN and not torch.overrides.has_torch_function((roots, *targets)):  # edges have none
        grads = _lean_vjp(roots, eye, targets, retain_graph)
    else:
        grads = torch.autograd.grad(
            roots, targets, grad_outputs=eye, retain_graph=retain_graph, is_grads_batched=True,
            allow_unused=True,
        )
    if not materialize:
        return list(grads)
    return [g if g is not None else _zeros_rows(k, x) for g, x in zip(grads, targets, strict=True)]


def _lean_vjp(roots: Tensor, eye: Tensor, targets: tuple, retain_graph: bool) -> tuple[Tensor | None, ...]:
    k = roots.shape[0]
    level = torch._C._vmapmode_increment_nesting()
    try:
        # as torch.autograd.graph._engine_run_backward: the context, for compiled autograd's config
        torch._C._stash_obj_in_tls("context", contextvars.copy_context())
        try:
            batched = torch.autograd.Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
                (roots,), (torch._add_batch_dim(eye, 0, level),), retain_graph, False, targets, True,
                accumulate_grad=False,
            )
        finally:
            torch._C._remove_obj_from_tls("context")
        return tuple(
            None if g is None else torch._remove_batch_dim(g, level, k, 0)  # type: ignore[attr-defined]
            for g in batched
        )
    finally:
        torch._C._vmapmode_decrement_nesting()


def _zeros_rows(k: int, target: Tensor | GradientEdge) -> Tensor:
    if isinstance(target, GradientEdge):
        meta = target.node._input_metadata[target.output_nr]  # type: ignore[attr-defined]
        return torch.zeros((k, *meta.shape), dtype=meta.dtype, device=meta.device)
    return target.new_zeros((k, *target.shape))


def _warn_fallback(error: Exception) -> None:
    global _warned_fallback
    if not _warned_fallback:
        warnings.warn(
            "taskbalance: the batched per-task backward failed "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "falling back to one backward per task, which is slower. This warning is shown once.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned_fallback = True


def _batched_grads(
    losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool, batching: BatchingChoice | None = None
) -> list[Tensor | None]:
    """Rows ``∂ losses[k] / ∂ inputs`` for every k, one tensor ``(K, *input.shape)`` per input, or ``None``
    for an input that no loss reaches. With ``batching``, vmap or a loop over the tasks as it decides for
    these shapes (once, remembered); without, vmap (a loop only where vmap raises, with a
    warning)."""
    if losses.dim() != 1:
        raise ValueError(f"expected a 1-d vector of task losses, got shape {tuple(losses.shape)}")
    if batching is not None:
        key = (tuple(tuple(x.shape) for x in inputs), losses.shape[0], losses.device.type)

        def call(mode: Batching, trial: bool) -> list[Tensor | None]:
            if mode == "vmap":
                return _vmapped(losses, inputs, retain_graph or trial)
            return _looped(losses, inputs, retain_graph or trial)

        return batching.run(key, call, losses, _callers_error, lambda: preferred_mode(losses))
    try:
        return _vmapped(losses, inputs, retain_graph)
    except RuntimeError as error:
        if _callers_error(error):
            raise
        _warn_fallback(error)
        return _looped(losses, inputs, True)


def _callers_error(error: RuntimeError) -> bool:
    return "does not require grad" in str(error) or "backward through the graph a second time" in str(error)


def _vmapped(losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool) -> list[Tensor | None]:
    return batched_vjp(losses, inputs, retain_graph, materialize=False)


def _looped(losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool) -> list[Tensor | None]:
    k = losses.shape[0]
    rows = [
        torch.autograd.grad(
            losses[i], list(inputs), retain_graph=retain_graph or i < k - 1, allow_unused=True
        )
        for i in range(k)  # a loop over tasks: where it measured faster than vmap, or vmap was impossible
    ]
    return [
        None
        if all(row[j] is None for row in rows)
        else torch.stack([row[j] if row[j] is not None else torch.zeros_like(x) for row in rows])
        for j, x in enumerate(inputs)
    ]


def batched_jacobian(
    losses: Tensor,
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    batching: BatchingChoice | None = None,
) -> tuple[Tensor, list[int]]:
    """Per-task gradients of ``losses`` (shape ``(K,)``) w.r.t. ``inputs`` as a ``K × N`` matrix, and the
    positions of the inputs that no loss reaches (their entries are zeros).

    The unreached positions come from autograd's ``allow_unused`` answer: knowing them costs nothing extra.
    ``batching`` (a :class:`taskbalance.batching.BatchingChoice`): vmap or a loop over the tasks, as it
    decides for these shapes (by default a loop for convolutions on CPU); ``None``: vmap.
    """
    blocks, unreached = jacobian_blocks(losses, inputs, retain_graph=retain_graph, batching=batching)
    return blocks.matrix(), unreached


def jacobian_blocks(
    losses: Tensor,
    inputs: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    batching: BatchingChoice | None = None,
) -> tuple[JacobianBlocks, list[int]]:
    """:func:`batched_jacobian` without joining the blocks: the ``K × N`` matrix as one ``(K, n_i)`` block per
    input (views of autograd's answers, no copy; zeros for an unreached input), and the unreached
    positions."""
    grads = _batched_grads(losses, inputs, retain_graph, batching)
    k = losses.shape[0]
    unreached = [j for j, g in enumerate(grads) if g is None]
    blocks = [
        (g if g is not None else torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device)).reshape(k, -1)
        for g, x in zip(grads, inputs, strict=True)
    ]
    return JacobianBlocks(blocks, [x.shape for x in inputs]), unreached


def exact_gramian(blocks: Sequence[Tensor]) -> Tensor:
    """``J Jᵀ`` in float64 for the matrix ``J = [B_1 … B_n]`` whose column blocks are ``blocks`` (each
    ``(k, n_i)``; one block: the matrix itself).

    Exact to float64 rounding whatever the blocks' dtype: every entry is widened to float64 before it is
    multiplied. The columns are streamed through one float64 buffer of at most ``2¹⁸`` entries and an eighth
    of the columns (small blocks joined into it, large ones cut to it) and the chunks' products summed, so no
    float64 copy of the whole ``J`` (twice its float32 size) and no concatenation are made; it is also faster
    than one product over a very wide matrix (measured: 5 ms instead of 33 ms for ``3 × 2.2M`` on one CPU
    core).
    """
    first = blocks[0]
    k = first.shape[0]
    gram = torch.zeros((k, k), dtype=_F64, device=first.device)
    total = sum(b.shape[1] for b in blocks)
    if k == 0 or total == 0:
        return gram
    # chunks of at most _GRAM_CHUNK entries and an eighth of the columns (so the float64 buffer is at most a
    # quarter of a float32 J's size), but not below 2¹³ entries (fewer products on a small J)
    width = max(1, min(total, _GRAM_CHUNK // k, max(_GRAM_FLOOR // k, -(-total // 8))))
    buffer = torch.empty(k * width, dtype=_F64, device=first.device)
    pending: list[Tensor] = []
    filled = 0

    def flush() -> None:
        nonlocal filled
        if filled:
            chunk = buffer[: k * filled].view(k, filled)
            if len(pending) == 1:
                chunk.copy_(pending[0])
            else:
                torch.cat(pending, dim=1, out=chunk)
            _add_products(gram, chunk)
            pending.clear()
            filled = 0

    for block in blocks:
        n = block.shape[1]
        if n >= width:  # a wide block: its own chunks
            flush()
            for start in range(0, n, width):
                piece = block[:, start:start + width]
                chunk = buffer[: k * piece.shape[1]].view(k, piece.shape[1])
                chunk.copy_(piece)
                _add_products(gram, chunk)
            continue
        if filled + n > width:
            flush()
        pending.append(block)
        filled += n
    flush()
    if k > _FULL_PRODUCT_ROWS:  # only the lower triangle was formed: mirror it
        lower = gram.tril()
        gram = lower + lower.tril(-1).T
    return gram


def _add_products(gram: Tensor, chunk: Tensor) -> None:
    """``gram += chunk chunkᵀ`` (float64). Above :data:`_FULL_PRODUCT_ROWS` rows only the lower triangle,
    four rows at a time (about half the products, by symmetry; 30 % faster for ``k = 11`` on one CPU core)."""
    k = chunk.shape[0]
    if k <= _FULL_PRODUCT_ROWS:
        gram.addmm_(chunk, chunk.T)
        return
    for start in range(0, k, 4):
        stop = min(start + 4, k)
        gram[start:stop, :stop].addmm_(chunk[start:stop], chunk[:stop].T)


class JacobianBlocks:
    """A ``K × N`` Jacobian kept as its column blocks: ``blocks[i]`` is the ``(K, n_i)`` matrix of the
    per-task gradients of input ``i`` (shape ``shapes[i]``), in the inputs' order.

    Everything a balancer does with the Jacobian is done block by block, so the ``K × N`` matrix is joined
    only when :meth:`matrix` is called (a method that edits the gradients element-wise).
    """

    __slots__ = ("blocks", "shapes")

    def __init__(self, blocks: Sequence[Tensor], shapes: Sequence[torch.Size]) -> None:
        if not blocks or len(blocks) != len(shapes):
            raise ValueError("JacobianBlocks needs one (K, n) block per input shape, and at least one")
        self.blocks: tuple[Tensor, ...] = tuple(blocks)
        self.shapes: tuple[torch.Size, ...] = tuple(torch.Size(s) for s in shapes)

    @classmethod
    def of_matrix(cls, matrix: Tensor, shapes: Sequence[torch.Size]) -> JacobianBlocks:
        """The blocks of a ``K × N`` matrix laid out as :func:`parameter_jacobian` for inputs of ``shapes``
        (column views, no copy)."""
        sizes = [math.prod(shape) for shape in shapes]
        return cls(torch.split(matrix, sizes, dim=1), shapes)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the joined matrix (the blocks' promoted dtype)."""
        return functools.reduce(torch.promote_types, (block.dtype for block in self.blocks))

    def matrix(self) -> Tensor:
        """The ``K × N`` matrix: a new tensor (the blocks concatenated)."""
        return torch.cat(self.blocks, dim=1)

    def gramian(self) -> Tensor:
        """``J Jᵀ`` in float64 (:func:`exact_gramian`)."""
        return exact_gramian(self.blocks)

    def combine(self, weights: Tensor) -> list[Tensor]:
        """``wᵀJ`` cut per input: one tensor of each input's shape (fresh, nothing else holds it)."""
        return [
            (weights.to(block.dtype) @ block).view(shape)
            for block, shape in zip(self.blocks, self.shapes, strict=True)
        ]

    def select(self, rows: Tensor) -> JacobianBlocks:
        """The rows at positions ``rows`` (a copy of those rows)."""
        return JacobianBlocks([block[rows] for block in self.blocks], self.shapes)

    def divided(self, divisor: Tensor) -> JacobianBlocks:
        """Every entry divided by the 0-d ``divisor`` (e.g. a GradScaler's scale)."""
        return JacobianBlocks([block / divisor.to(block.dtype) for block in self.blocks], self.shapes)

    def finite_rows(self) -> Tensor:
        """``(K,)`` bool on the device: which rows are entirely finite."""
        finite = torch.isfinite(self.blocks[0]).all(dim=1)
        for block in self.blocks[1:]:
            finite = finite & torch.isfinite(block).all(dim=1)
        return finite

    def sum64(self) -> Tensor:
        """The sum of every entry in float64 (NaN or inf exactly when an entry is, unless it overflows)."""
        total = self.blocks[0].sum(dtype=_F64)
        for block in self.blocks[1:]:
            total = total + block.sum(dtype=_F64)
        return total


def parameter_jacobian(
    losses: Tensor, parameters: Sequence[Tensor], *, retain_graph: bool = True
) -> Tensor:
    """Per-task gradients of ``losses`` (shape ``(K,)``) w.r.t. ``parameters``, as a ``K × P`` matrix.

    Row ``k`` is ``∇_θ losses[k]`` flattened and concatenated over ``parameters`` in order (the layout
    :func:`accumulate_grad` expects). Parameters a task does not reach get zero entries.
    """
    return batched_jacobian(losses, parameters, retain_graph=retain_graph)[0]


def feature_jacobian(
    losses: Tensor, features: Sequence[Tensor], *, retain_graph: bool = True
) -> Tensor:
    """Per-task gradients of ``losses`` w.r.t. shared feature tensors, as a ``K × N`` matrix.

    ``N`` is the total number of feature entries (batch included), so this is the representation-level
    Jacobian of MGDA-UB (Sener & Koltun, 2018, §3.3). Only the task heads are back-propagated through.
    """
    return batched_jacobian(losses, features, retain_graph=retain_graph)[0]


def _split_like(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    sizes = [t.numel() for t in like]
    return [piece.view_as(t) for piece, t in zip(torch.split(flat, sizes), like, strict=True)]


def accumulate_grad(parameters: Sequence[Tensor], flat_grad: Tensor, *, owned: bool = False) -> None:
    """Add a flat gradient (layout of :func:`parameter_jacobian`) into ``.grad`` of ``parameters``.

    With ``owned=True`` the caller hands ``flat_grad`` over (nothing else holds it), so parameters without a
    gradient get views of it instead of copies.
    """
    add_to_grad(parameters, _split_like(flat_grad, parameters), owned=owned)


def add_to_grad(parameters: Sequence[Tensor], grads: Sequence[Tensor], *, owned: bool = False) -> None:
    """Add ``grads[i]`` (the shape of ``parameters[i]``) into ``.grad`` of ``parameters[i]``.

    With ``owned=True`` the caller hands the tensors over (nothing else holds them), so a parameter without a
    gradient takes its tensor as ``.grad`` instead of a copy.
    """
    for parameter, grad in zip(parameters, grads, strict=True):
        piece = grad.to(parameter.dtype)
        if parameter.grad is None:
            parameter.grad = piece if owned or piece is not grad else piece.clone()
        else:
            parameter.grad.add_(piece)


def backward_through(
    features: Sequence[Tensor], flat_grad: Tensor | Sequence[Tensor], inputs: Sequence[Tensor] | None = None
) -> None:
    """One ordinary backward from the shared features with the combined feature gradient ``flat_grad`` (flat,
    or already cut: one tensor of each feature's shape).

    Accumulates into ``.grad`` of ``inputs`` (all leaves behind the features if ``None``).
    """
    pieces = _split_like(flat_grad, features) if isinstance(flat_grad, Tensor) else list(flat_grad)
    torch.autograd.backward(
        list(features), grad_tensors=pieces, inputs=list(inputs) if inputs is not None else None
    )


def reachable_leaves(
    roots: Iterable[Tensor],
    *,
    stop_at: Iterable[Tensor] = (),
    exclude: Iterable[Tensor] = (),
) -> list[Tensor]:
    """Leaf tensors requiring grad that the autograd graph of ``roots`` reaches.

    The walk does not go past the tensors in ``stop_at`` (e.g. the shared features, so only the task heads
    are visited) and leaves out the tensors in ``exclude`` (e.g. the shared parameters). This is how a
    balancer finds the task-specific parameters without the user listing them.
    """
    stop_nodes = set()
    stop_ids = set()
    for tensor in stop_at:
        stop_ids.add(id(tensor))
        if tensor.grad_fn is not None:
            stop_nodes.add(tensor.grad_fn)
    excluded = {id(t) for t in exclude} | stop_ids
    seen: set[object] = set()
    leaves: list[Tensor] = []
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen or node in stop_nodes:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in excluded:
                leaves.append(variable)
            continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                stack.append(child)
    return leaves
