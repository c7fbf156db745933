"""The one place that computes per-task gradients.

Two entry points, both batched over tasks in a single autograd call (:func:`batched_vjp`: the vmapped
vector-Jacobian product of ``torch.autograd.grad(..., is_grads_batched=True)``, without its Python layers;
the Gramian engine uses it too):

* :func:`parameter_jacobian` — the ``K × P`` matrix of per-task gradients w.r.t. shared parameters;
* :func:`feature_jacobian` — the ``K × N`` matrix of per-task gradients w.r.t. a shared feature tensor
  (MGDA-UB style); the combined feature gradient then needs only one ordinary trunk backward
  (:func:`backward_through`).

Where an operation has no batching rule and the batched call fails, both fall back to a loop of
``autograd.grad`` calls and warn once. :func:`batched_jacobian` takes a
:class:`taskbalance.batching.BatchingChoice` to use a loop over the tasks instead where that is faster
(convolutions on CPU), decided once per shape and remembered. Nothing here leaves the
tensors' device.
"""

from __future__ import annotations

import contextvars
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .batching import Batching, BatchingChoice, preferred_mode

__all__ = [
    "batched_jacobian",
    "parameter_jacobian",
    "feature_jacobian",
    "reachable_leaves",
    "accumulate_grad",
    "backward_through",
    "batched_vjp",
]

_warned_fallback = False
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
    grads = _batched_grads(losses, inputs, retain_graph, batching)
    k = losses.shape[0]
    unreached = [j for j, g in enumerate(grads) if g is None]
    rows = [
        (g if g is not None else torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device)).reshape(k, -1)
        for g, x in zip(grads, inputs, strict=True)
    ]
    return torch.cat(rows, dim=1), unreached


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
    for parameter, piece in zip(parameters, _split_like(flat_grad, parameters), strict=True):
        piece = piece.to(parameter.dtype)
        if parameter.grad is None:
            parameter.grad = piece if owned and piece.dtype == flat_grad.dtype else piece.clone()
        else:
            parameter.grad.add_(piece)


def backward_through(
    features: Sequence[Tensor], flat_grad: Tensor, inputs: Sequence[Tensor] | None = None
) -> None:
    """One ordinary backward from the shared features with the combined feature gradient ``flat_grad``.

    Accumulates into ``.grad`` of ``inputs`` (all leaves behind the features if ``None``).
    """
    pieces = _split_like(flat_grad, features)
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
