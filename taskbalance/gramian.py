"""The Gramian engine: the ``k × k`` Gramian ``G = J Jᵀ`` of the per-task gradients and the update ``wᵀ J``,
layer by layer, without ever forming the ``k × P`` Jacobian ``J``.

Most gradient methods (MGDA, UPGrad, DualProj, IMTL, Nash-MTL, CAGrad, Aligned-MTL, PCGrad, GradVac, …) read
only ``G`` and return weights ``w``; the shared update is ``Σₖ wₖ ∇θ Lₖ``. For a layer ``Y = X Wᵀ + b`` with
per-task output gradients ``Δₖ = ∂Lₖ/∂Y`` (``R × O``) and input ``X`` (``R × I``, ``R`` the rows: batch, or
batch × positions):

* ``∇W Lₖ = Δₖᵀ X`` and ``∇b Lₖ = Δₖᵀ 1``, so ``⟨∇Lᵢ, ∇Lⱼ⟩ = ⟨Δᵢ, (X Xᵀ + 1 1ᵀ) Δⱼ⟩`` — the *B-side* form
  (``R² I + k R² O`` flops, no ``O × I`` matrix at all), or, when that is dearer, the *direct* form from the
  per-task weight gradients (``k R I O + k² I O``). A cost model picks per layer (:func:`linear_costs`);
* the update is ``(Σₖ wₖ Δₖ)ᵀ X`` — one ordinary weight-gradient product per layer and no second backward.

The per-task output gradients of every shared layer come from **one** batched backward (a vmapped
vector-Jacobian product through :class:`torch.autograd.graph.GradientEdge` inputs, so autograd computes no
weight gradient at all), or from a loop over the ``k`` tasks where that is faster: by default a loop when a
shared convolution runs on CPU (a deterministic rule, so resumed and repeated runs are bit-identical), or,
opt-in (``batching="timed"``), whichever measured faster over the first steps of a graph shape
(:mod:`taskbalance.batching`).

The layers are read from the autograd graph of the losses, not from module hooks, so nothing needs to be
registered before the forward pass, in-place operations after a layer are safe (the gradient taken is the
one flowing into the layer's own node), and a layer called several times in one forward is exact: its
uses are stacked as extra rows (B-side) or their per-task gradients summed (direct), which carries every
cross term. Recognised nodes:

* ``addmm`` / ``mm`` with the weight as second operand (``nn.Linear``, any input rank) — B-side or direct;
* ``convolution`` (``nn.Conv1d/2d/3d``, not transposed) — direct, per-task weight gradients by
  ``convolution_backward`` (our choice: the B-side form for a convolution has ``R = N·H'·W'`` rows and needs
  the unfolded input, and loses to the direct form on every convolution we measured);
* ``embedding`` (not ``scale_grad_by_freq``, not sparse) — B-side with the token-equality matrix in place of
  ``X Xᵀ``, or direct into a ``k × V × D`` buffer, by cost;
* every other shared parameter (LayerNorm/BatchNorm affine parameters, GRU weights, a bare
  ``nn.Parameter``, …) falls back to its own per-task gradient, computed in the same batched call (direct
  Gram). This is exact for any module.

Task-specific parameters (the heads) are inputs of the same batched call: their per-task gradients come out
as rows, so the heads are never back-propagated a second time.

The Gramian is accumulated in float64. The products are formed in the layer's dtype (float32 for a float32
model, float64 for a float64 one) over chunks of at most 1024 terms, and the chunks summed in float64 (our
choice: casting a whole ``k × P`` block to float64 costs more than the products on narrow layers). The
B-side form sums ``Δᵢ[r, s] (X Xᵀ)[r, s] Δⱼ`` over sample pairs, so in float32 its rounding error scales with
the per-sample gradients rather than their mean; on the equality tests it stays within 1e-5 of ``J Jᵀ``.
Nothing is copied to the host (the timing of the first steps reads the clock, not the tensors).

**Partial Gramian (opt-in approximation).** ``GramianEngine(last_layers=N)`` forms the Gramian from the last
``N`` shared layers only (those nearest the losses); the batched backward stops there, and the update is
then one ordinary backward of ``Σₖ wₖ Lₖ``. The weights are those of the partial Gramian, so this is an
approximation (our extension, in the spirit of the "shared-representation" approximations of MGDA-UB);
``docs/gramian.md`` lists its measured error on the benchmark models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from .batching import Batching, BatchingChoice
from .jacobian import batched_vjp

__all__ = ["GramianEngine", "GramianStep", "linear_costs", "embedding_costs"]

_F64 = torch.float64


_CHUNK = 1024  # float32 products are summed in float64 over chunks of this many terms (see _gram64)


def linear_costs(rows: int, in_features: int, out_features: int, k: int) -> tuple[int, int]:
    """Flop estimates ``(b_side, direct)`` of a linear layer's Gramian contribution *and* its update (see
    module docstring): the B-side form pays ``R I O`` for the update ``(Σₖ wₖ Δₖ)ᵀ X``, the direct form
    gets it from the per-task gradients for ``k I O``."""
    b_side = rows * rows * in_features + k * rows * rows * out_features + k * k * rows * out_features
    b_side += rows * in_features * out_features
    direct = k * rows * in_features * out_features + k * k * in_features * out_features
    return b_side, direct


def embedding_costs(rows: int, vocabulary: int, dim: int, k: int) -> tuple[int, int]:
    """Flop estimates ``(b_side, direct)`` of an embedding's Gramian contribution."""
    b_side = rows * rows + k * rows * rows * dim + k * k * rows * dim + rows * dim
    direct = k * vocabulary * dim + k * rows * dim + k * k * vocabulary * dim
    return b_side, direct


def _gram64(blocks: Tensor) -> Tensor:
    """``Σ_c A_c A_cᵀ`` in float64 for ``blocks`` of shape ``(C, k, n)`` (or ``(k, n)``: one block).

    float64 tensors are multiplied in float64. Narrower ones are multiplied in float32 one chunk of at most
    ``_CHUNK`` terms at a time and the chunks summed in float64 (our choice: a float32 dot product of a few
    hundred terms carries about 1e-8 relative error, the float64 cast of a whole ``k × P`` block costs more
    than the products on narrow layers)."""
    if blocks.dim() == 2:
        if blocks.dtype == _F64:
            return blocks @ blocks.T
        if blocks.dtype == torch.float32 and blocks.shape[1] <= _CHUNK:  # one chunk: no batch dimension
            return (blocks @ blocks.T).to(_F64)
        blocks = blocks.unsqueeze(0)
    if blocks.dtype == _F64:
        return torch.bmm(blocks, blocks.transpose(1, 2)).sum(0)
    if blocks.dtype != torch.float32:
        blocks = blocks.float()
    count, k, n = blocks.shape
    if n > _CHUNK:
        whole = n // _CHUNK * _CHUNK
        head = blocks[:, :, :whole].reshape(count, k, whole // _CHUNK, _CHUNK)
        head = head.permute(0, 2, 1, 3).reshape(-1, k, _CHUNK)
        total = _gram64(head)
        if whole < n:
            total = total + _gram64(blocks[:, :, whole:])
        return total
    return torch.bmm(blocks, blocks.transpose(1, 2)).to(_F64).sum(0)


# --------------------------------------------------------------------------------------------- graph reading
@dataclass
class _Use:
    """One use of shared parameters by one recognised autograd node."""

    kind: str  # "linear" | "conv" | "embedding"
    node: Node
    weight: Tensor | None = None
    bias: Tensor | None = None
    transposed: bool = False  # linear: the weight enters as W (x @ W) rather than Wᵀ (nn.Linear)
    saved: tuple = ()  # conv: (saved weight, stride, padding, dilation, transposed, output padding, groups)


@dataclass
class _Group:
    """Uses of the same shared parameters (one layer, or one layer called several times)."""

    kind: str
    uses: list[_Use]
    weight: Tensor | None
    bias: Tensor | None
    order: int  # largest autograd sequence number: higher is nearer the losses


@dataclass
class _Plan:
    groups: list[_Group]
    fallback: list[Tensor]  # shared parameters whose per-task gradients are taken directly
    unreached: list[Tensor]  # shared parameters no loss reaches
    heads: list[Tensor]  # task-specific leaves the losses reach
    signature: tuple = ()


_OTHER, _LEAF, _TRANSPOSE = 0, 1, 2
_NODE_KINDS: dict[type, int] = {}  # autograd node type -> _LEAF (AccumulateGrad), _TRANSPOSE or _OTHER


def _node_kind(node_type: type) -> int:
    name = node_type.__name__
    kind = _LEAF if name == "AccumulateGrad" else _TRANSPOSE if name == "TBackward0" else _OTHER
    _NODE_KINDS[node_type] = kind
    return kind


def _read_graph(roots: Tensor, shared: Sequence[Tensor]) -> _Plan:
    """Walk the graph of ``roots`` once: recognised layer nodes, fallback parameters and head leaves.

    The walk tells node kinds apart by their type (a leaf is an ``AccumulateGrad`` node), looked up once per
    type: no attribute look-up that fails on every other node (an exception each: a third of the walk on a
    small model)."""
    shared_ids = {id(p): p for p in shared}
    consumers: dict[int, list[tuple[Node, int, bool]]] = {id(p): [] for p in shared}
    heads: list[Tensor] = []
    head_ids: set[int] = set()
    seen: set[Node] = set()
    stack: list[Node] = [roots.grad_fn] if roots.grad_fn is not None else []
    kinds = _NODE_KINDS
    pop, push, mark = stack.pop, stack.append, seen.add
    while stack:
        node = pop()
        if node in seen:
            continue
        mark(node)
        slot = -1
        for child, _ in node.next_functions:  # type: ignore[attr-defined]
            slot += 1
            if child is None:
                continue
            child_kind = kinds.get(type(child))
            if child_kind is None:
                child_kind = _node_kind(type(child))
            if child_kind == _LEAF:
                leaf = child.variable  # type: ignore[attr-defined]
                if id(leaf) in shared_ids:
                    consumers[id(leaf)].append((node, slot, False))
                elif id(leaf) not in head_ids:
                    head_ids.add(id(leaf))
                    heads.append(leaf)
                continue
            if child_kind == _TRANSPOSE:
                grand = child.next_functions[0][0]
                if grand is not None and kinds.get(type(grand)) == _LEAF:
                    inner = grand.variable  # type: ignore[attr-defined]
                    if id(inner) in shared_ids:
                        consumers[id(inner)].append((node, slot, True))
                        continue
            if child not in seen:
                push(child)
    fallback_ids: set[int] = set()
    unreached: list[Tensor] = []
    node_uses: dict[Node, _Use] = {}
    for pid, found in consumers.items():
        if not found:
            unreached.append(shared_ids[pid])
            continue
        parameter = shared_ids[pid]
        roles = []
        for node, slot, via_t in found:
            role = _role(node, slot, via_t, parameter)
            if role is None:
                fallback_ids.add(pid)
                break
            roles.append((node, role))
        else:
            for node, (kind, part, transposed) in roles:
                use = node_uses.get(node)
                if use is None:
                    use = node_uses[node] = _Use(kind, node)
                setattr(use, part, parameter)
                use.transposed = use.transposed or transposed
    # group the uses by the parameters they carry; parameters split over differing groups fall back
    groups: dict[tuple, _Group] = {}
    for use in node_uses.values():
        weight_id = id(use.weight) if use.weight is not None and id(use.weight) not in fallback_ids else 0
        bias_id = id(use.bias) if use.bias is not None and id(use.bias) not in fallback_ids else 0
        key = (use.kind, weight_id, bias_id, use.transposed)
        if key[1] == 0:
            use.weight = None
        if key[2] == 0:
            use.bias = None
        if use.weight is None and use.bias is None:
            continue
        if use.kind == "embedding" and use.weight is None:
            continue
        group = groups.get(key)
        if group is None:
            groups[key] = _Group(use.kind, [use], use.weight, use.bias, _seq(use.node))
        else:
            group.uses.append(use)
            group.order = max(group.order, _seq(use.node))
    covered: dict[int, int] = {}
    for group in groups.values():
        for p in (group.weight, group.bias):
            if p is not None:
                covered[id(p)] = covered.get(id(p), 0) + 1
    split = {pid for pid, n in covered.items() if n > 1}
    if split:  # e.g. a weight used with a bias in one call and without in another
        fallback_ids |= split
        kept: dict[tuple, _Group] = {}
        for key, group in groups.items():
            weight = None if group.weight is not None and id(group.weight) in split else group.weight
            bias = None if group.bias is not None and id(group.bias) in split else group.bias
            if weight is None and (bias is None or group.kind == "embedding"):
                continue
            for use in group.uses:
                use.weight, use.bias = weight, bias
            kept[key] = _Group(group.kind, group.uses, weight, bias, group.order)
        groups = kept
    in_groups = {id(p) for g in groups.values() for p in (g.weight, g.bias) if p is not None}
    fallback = [p for p in shared if consumers[id(p)] and id(p) not in in_groups]
    ordered = sorted(groups.values(), key=lambda g: -g.order)
    signature = (
        tuple((g.kind, len(g.uses), tuple(g.weight.shape) if g.weight is not None else ()) for g in ordered),
        tuple(tuple(p.shape) for p in fallback),
        len(heads),
    )
    return _Plan(ordered, fallback, unreached, heads, signature)


def _seq(node: Node) -> int:
    return int(node._sequence_nr())  # type: ignore[attr-defined]


def _role(node: Node, slot: int, via_t: bool, parameter: Tensor) -> tuple[str, str, bool] | None:
    """``(kind, "weight" | "bias", transposed)`` of a parameter's use by ``node``, or ``None`` (fallback)."""
    name = type(node).__name__
    if name == "AddmmBackward0":
        if getattr(node, "_saved_alpha", 1) != 1 or getattr(node, "_saved_beta", 1) != 1:
            return None
        if slot == 2 and parameter.dim() == 2:
            return ("linear", "weight", not via_t)
        if slot == 0 and parameter.dim() == 1 and not via_t:
            return ("linear", "bias", False)
        return None
    if name == "MmBackward0":
        if slot == 1 and parameter.dim() == 2:
            return ("linear", "weight", not via_t)
        return None
    if via_t:
        return None
    if name == "ConvolutionBackward0":
        if node._saved_transposed:  # type: ignore[attr-defined]
            return None
        if slot == 1:
            return ("conv", "weight", False)
        if slot == 2:
            return ("conv", "bias", False)
        return None
    if name == "EmbeddingBackward0" and slot == 0:
        if node._saved_scale_grad_by_freq or node._saved_sparse:  # type: ignore[attr-defined]
            return None
        return ("embedding", "weight", False)
    return None


# --------------------------------------------------------------------------------------------- the step
@dataclass
class _Layer:
    """What the engine keeps of one group between the Gramian and the update."""

    group: _Group
    inputs: list[Tensor]  # per use: X (linear), input (conv), indices (embedding)
    deltas: list[Tensor] = field(default_factory=list)  # per use: (k, *output shape)
    form: str = "b_side"
    per_task: list[Tensor] | None = None  # direct form, until packed: per-task gradients of (weight, bias)
    packed: bool = False  # direct form: the update comes from the step's packs and large pieces


_PACK_LIMIT = 1 << 16  # per-task gradients up to this many entries are packed into one (k, n) matrix


@dataclass
class _Pack:
    """Small per-task gradients of several parameters side by side in one ``(k, n)`` matrix, the shared
    parameters' first and the heads' after them, so that their Gram block (of the shared columns) and their
    update are one product each instead of several small ones per parameter."""

    rows: Tensor  # (k, n)
    parameters: list[Tensor]
    shared: int  # the first `shared` parameters are shared ones (in the Gramian), the others heads
    width: int  # the shared parameters' columns: rows[:, :width]

    def shared_rows(self) -> Tensor:
        return self.rows if self.width == self.rows.shape[1] else self.rows[:, : self.width]

    def views(self) -> list[Tensor]:
        """Each parameter's ``(k, *shape)`` rows, as views of :attr:`rows` (for inspection: the step itself
        reads only :attr:`rows`)."""
        out: list[Tensor] = []
        at = 0
        for p in self.parameters:
            n = p.numel()
            out.append(self.rows[:, at: at + n].unflatten(1, p.shape) if p.dim() else self.rows[:, at])
            at += n
        return out

    def apply(self, shared_weights: Tensor, head_weights: Tensor | None) -> None:
        """Add ``Σₖ w[k] rows[k]`` to each parameter's ``.grad`` (``w``: ``shared_weights`` for the shared
        parameters, ``head_weights`` for the heads, ``None``: ones): one product where one set of weights
        applies to every column, then views of its result cut in one call (a fresh tensor, so a parameter may
        keep its view as ``.grad``)."""
        rows, dtype = self.rows, self.rows.dtype
        if self.shared == len(self.parameters) or shared_weights is head_weights:
            flat = _cast(shared_weights, dtype) @ rows
        elif self.shared == 0:
            flat = _combine_heads(head_weights, rows)
        else:
            width = self.width
            own, head = rows[:, :width], rows[:, width:]
            flat = torch.cat([_cast(shared_weights, dtype) @ own, _combine_heads(head_weights, head)])
        for p, piece in zip(self.parameters, _unflatten(flat, self.parameters), strict=True):
            if p.grad is None and piece.dtype == p.dtype:
                p.grad = piece
            else:
                _add_grad(p, piece, fresh=True)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _combine_heads(head_weights: Tensor | None, rows: Tensor) -> Tensor:
    """``Σₖ head_weights[k] rows[k]`` of ``(k, n)`` rows; ``None``: every head its own gradient, the rows'
    sum (one reduction instead of a product with a tensor of ones)."""
    return rows.sum(0) if head_weights is None else _cast(head_weights, rows.dtype) @ rows


def _unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``flat`` cut into views shaped like ``like`` (one C++ call, as DDP's bucket views)."""
    return list(torch._C._nn.unflatten_dense_tensors(flat, like))


Pieces = list[tuple[Tensor, Tensor]]  # (parameter, its (k, *shape) per-task gradients)


def _packed(shared: Pieces, heads: Pieces, k: int) -> tuple[list[_Pack], Pieces, Pieces]:
    """Split the shared parameters' and the heads' pieces into packs of the small ones (one per dtype and
    device, shared parameters first) and the large ones of each, left as they are (packing copies: not worth
    it for large rows)."""
    # per (dtype, device): parameters, rows, [shared count, shared columns, every row at least 2-d]
    small: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], list[Tensor], list[int]]] = {}
    large: tuple[Pieces, Pieces] = ([], [])
    for side, pieces in enumerate((shared, heads)):
        for parameter, rows in pieces:
            n = parameter.numel()  # the numel of one task's row
            if n > _PACK_LIMIT:
                large[side].append((parameter, rows))
                continue
            key = (rows.dtype, rows.device)
            entry = small.get(key)
            if entry is None:
                entry = small[key] = ([], [], [0, 0, 1])
            entry[0].append(parameter)
            entry[1].append(rows)
            counts = entry[2]
            if not side:
                counts[0] += 1
                counts[1] += n
            if rows.dim() < 2:  # the (k,) rows of a 0-d parameter
                counts[2] = 0
    packs = [
        _Pack(_side_by_side(rows, k, bool(counts[2])), parameters, counts[0], counts[1])
        for parameters, rows, counts in small.values()
    ]
    return packs, large[0], large[1]


_CHUNK_CAT = callable(getattr(torch, "_chunk_cat", None))
_CHUNK_CAT_DEVICES = ("cpu", "cuda")  # where torch implements it (FSDP uses it on CUDA)


def _side_by_side(rows: list[Tensor], k: int, at_least_2d: bool | None = None) -> Tensor:
    """``(k, n)``: the ``(k, *shape)`` rows (same dtype and device) flattened and concatenated along dim 1, in
    one op where torch has it (``_chunk_cat`` with one chunk: FSDP's flatten-and-concatenate) instead of a
    reshape per piece and a concatenation. ``at_least_2d``: whether every row is (``None``: look)."""
    if len(rows) == 1:
        return rows[0].reshape(k, -1)
    if at_least_2d is None:
        at_least_2d = all(r.dim() > 1 for r in rows)
    if _CHUNK_CAT and at_least_2d and rows[0].device.type in _CHUNK_CAT_DEVICES:
        return torch._chunk_cat(rows, dim=1, num_chunks=1).view(k, -1)
    return torch.cat([r.reshape(k, -1) for r in rows], dim=1)  # (k,) rows of 0-d parameters among them


@dataclass
class GramianStep:
    """Result of :meth:`GramianEngine.gramian`: the float64 Gramian and what :meth:`GramianEngine.apply`
    needs to assemble the update."""

    gramian: Tensor
    layers: list[_Layer]
    fallback: list[Tensor]
    unreached: list[Tensor]
    heads: list[Tensor]
    roots: Tensor | None = None  # kept only by the partial Gramian (its update is one ordinary backward)
    backward_heads: list[Tensor] = field(default_factory=list)  # partial Gramian: heads its backward reaches
    packs: list[_Pack] = field(default_factory=list)  # small per-task gradients, side by side
    large: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (shared parameter, its rows), unpacked
    head_large: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def rows_of(self, parameter: Tensor) -> Tensor:
        """The ``(k, *shape)`` per-task gradients of a parameter in the direct form, a fallback parameter or a
        head (for inspection; views of the packs, formed on demand: the step reads only the packs)."""
        for pack in self.packs:
            for p, view in zip(pack.parameters, pack.views(), strict=True):
                if p is parameter:
                    return view
        for p, rows in (*self.large, *self.head_large):
            if p is parameter:
                return rows
        raise KeyError("no per-task rows of this parameter in the step (a B-side layer, or not in the step)")


class GramianEngine:
    """Computes the Gramian of per-task gradients of shared parameters layer by layer (see module docstring).

    Args:
        last_layers: ``None`` (default): the exact Gramian over every shared parameter. An integer ``N``:
            the **approximate** Gramian over the last ``N`` recognised shared layers only (opt-in).
        batching: ``"auto"`` (default: a loop over the tasks for convolutions on CPU, vmap otherwise),
            ``"timed"`` (time both over the first steps of each graph shape, keep the faster), ``"vmap"`` or
            ``"loop"``.
        form: ``"auto"`` (default: the cost model picks per layer), or force ``"b_side"`` / ``"direct"`` on
            every linear and embedding layer (for tests and measurements).
    """

    def __init__(
        self,
        *,
        last_layers: int | None = None,
        batching: Literal["auto", "timed", "vmap", "loop"] = "auto",
        form: Literal["auto", "b_side", "direct"] = "auto",
    ) -> None:
        if last_layers is not None and last_layers < 1:
            raise ValueError(f"last_layers must be a positive number of layers or None, got {last_layers}")
        if form not in ("auto", "b_side", "direct"):
            raise ValueError(f"form must be 'auto', 'b_side' or 'direct', got {form!r}")
        self.last_layers = last_layers
        self.batching = batching
        self.form = form
        self._batching = BatchingChoice(batching)

    # ------------------------------------------------------------------ public
    def gramian(
        self,
        roots: Tensor,
        shared: Sequence[Tensor],
        reduce_rows: Callable[[Tensor], Tensor] | None = None,
    ) -> GramianStep:
        """The float64 Gramian of ``∇θ roots[k]`` over ``shared`` (plus the per-task head gradients).

        ``roots`` is the ``(k,)`` vector of (possibly scaled) losses. The autograd graph is released unless
        the partial Gramian needs it for its update.

        ``reduce_rows`` (data parallelism): a function returning the rank mean of a ``(k, n)`` matrix. Every
        layer then takes the direct form and its per-task gradients, with the fallback and head rows, are
        averaged over ranks in one call before the Gramian is formed, so the Gramian is the global batch's,
        cross-rank terms included (our choice: the B-side form would need every rank's layer inputs).
        """
        if roots.dim() != 1:
            raise ValueError(f"expected a 1-d vector of task losses, got shape {tuple(roots.shape)}")
        shared = list(dict.fromkeys(shared))  # a tied weight listed twice counts once (tensors hash by id)
        partial = self.last_layers is not None
        if partial and reduce_rows is not None:
            raise ValueError(
                "the partial Gramian (last_layers=) is not available under data parallelism; "
                "use the exact Gramian engine (last_layers=None)"
            )
        plan = _read_graph(roots, shared)
        groups = plan.groups
        if partial:
            groups = groups[: self.last_layers]
        k = roots.shape[0]
        layers = [_Layer(g, [_saved_input(u) for u in g.uses]) for g in groups]
        for layer in layers:
            if layer.group.kind == "linear":
                layer.form = _linear_form(layer, k, self.form)
        fallback = [] if partial else plan.fallback
        heads = [] if partial else plan.heads
        loop, grads = self._batched(roots, layers, [*fallback, *heads], plan.signature, partial, plan.groups)
        at = 0
        for layer in layers:
            if _by_parameter(layer, loop):  # per-task gradients straight from autograd
                n = len(_parameters(layer.group))
                layer.per_task, layer.form, layer.inputs = grads[at: at + n], "direct", []
            else:
                n = len(layer.group.uses)
                layer.deltas = grads[at: at + n]
            at += n
        fallback_rows = grads[at: at + len(fallback)]
        at += len(fallback)
        head_rows = grads[at:]
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # as torch.no_grad(), at a fraction of its cost
        try:  # the saved layer inputs carry autograd history: record nothing
            if reduce_rows is not None:
                fallback_rows, head_rows = _reduce(layers, fallback_rows, head_rows, k, reduce_rows)
            blocks: list[Tensor] = []
            pieces: list[tuple[Tensor, Tensor]] = []  # (shared parameter, its per-task gradients)
            for layer in layers:
                if layer.per_task is None:
                    block = _layer_gramian(layer, k, self.form)
                    if block is not None:
                        blocks.append(block)
                        continue
                pieces += zip(_parameters(layer.group), layer.per_task or [], strict=True)
                # the update reads the step's packs and large pieces (GramianStep.rows_of: the rows)
                layer.per_task, layer.packed = None, True
            pieces += zip(fallback, fallback_rows, strict=True)
            packs, shared_large, head_large = _packed(pieces, list(zip(heads, head_rows, strict=True)), k)
            blocks += [_gram64(pack.shared_rows()) for pack in packs if pack.shared]
            blocks += [_gram64(rows.reshape(k, -1)) for _, rows in shared_large]
            gramian = _symmetric_sum(blocks, roots, k)
        finally:
            torch._C._set_grad_enabled(grad_mode)
        return GramianStep(
            gramian=gramian,
            layers=layers,
            fallback=fallback,
            unreached=[] if partial else plan.unreached,
            heads=heads,
            roots=roots if partial else None,
            backward_heads=plan.heads if partial else [],
            packs=packs,
            large=shared_large,
            head_large=head_large,
        )

    def apply(
        self,
        step: GramianStep,
        shared_weights: Tensor,
        head_weights: Tensor | None,
        shared: Sequence[Tensor],
    ) -> None:
        """Accumulate ``Σₖ shared_weights[k] ∇θ Lₖ`` into the shared ``.grad`` and
        ``Σₖ head_weights[k] ∇ Lₖ`` into the heads' ``.grad`` (weights in the roots' scale; ``head_weights``
        ``None``: every head takes its own task's gradient, weight 1)."""
        if step.roots is not None:  # partial Gramian: one ordinary backward of the weighted losses
            if head_weights is None:
                head_weights = torch.ones_like(shared_weights)
            self._apply_partial(step, shared_weights, head_weights, shared)
            return
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # as torch.no_grad(), at a fraction of its cost
        try:
            self._apply_rows(step, shared_weights, head_weights)
        finally:
            torch._C._set_grad_enabled(grad_mode)

    def _apply_rows(self, step: GramianStep, shared_weights: Tensor, head_weights: Tensor | None) -> None:
        for layer in step.layers:
            if layer.packed:
                continue
            for parameter, update in _layer_update(layer, shared_weights):
                _add_grad(parameter, update)
        for pack in step.packs:
            pack.apply(shared_weights, head_weights)
        for parameter, rows in step.large:
            _add_grad(parameter, _combine(shared_weights, rows))
        for parameter, rows in step.head_large:
            k = rows.shape[0]
            _add_grad(parameter, _combine_heads(head_weights, rows.reshape(k, -1)).view(rows.shape[1:]))
        for parameter in step.unreached:
            _add_grad(parameter, torch.zeros_like(parameter))

    # ------------------------------------------------------------------ internals
    def _apply_partial(
        self, step: GramianStep, shared_weights: Tensor, head_weights: Tensor, shared: Sequence[Tensor]
    ) -> None:
        roots = step.roots
        assert roots is not None
        shared_list = list(shared)
        plan_heads = step.backward_heads  # found by the Gramian's own walk: no second walk of the graph
        same = shared_weights is head_weights or bool(torch.equal(shared_weights, head_weights))
        if same:
            torch.autograd.backward(roots, grad_tensors=shared_weights.to(roots.dtype).detach(),
                                    inputs=[*shared_list, *plan_heads])
            return
        torch.autograd.backward(roots, grad_tensors=shared_weights.to(roots.dtype).detach(),
                                inputs=shared_list, retain_graph=bool(plan_heads))
        if plan_heads:
            torch.autograd.backward(
                roots, grad_tensors=head_weights.to(roots.dtype).detach(), inputs=plan_heads
            )

    def _batched(
        self, roots: Tensor, layers: Sequence[_Layer], leaves: Sequence[Tensor], signature: tuple,
        retain: bool, plan_groups: Sequence[_Group] = (),
    ) -> tuple[bool, list[Tensor]]:
        """``(loop, grads)``: whether the loop mode ran, and the per-task gradients of each layer, then of the
        ``leaves``. A layer whose per-task parameter gradients the engine needs (:func:`_by_parameter`: a
        linear layer in the direct form; a convolution in the loop mode) gets them straight from this
        backward, one tensor per parameter; any other layer gets the per-task gradients of its outputs, one
        tensor per use (our choice: autograd forms the weight gradient in the same node call as the input
        gradient, and frees each task's output gradients as soon as it has used them, instead of their being
        held for every layer and task at once; the same work at a fraction of the memory)."""
        key = (signature, roots.shape[0], roots.device.type)

        def inputs(mode: Batching) -> list[GradientEdge | Tensor]:
            edges: list[GradientEdge | Tensor] = []
            for layer in layers:
                if _by_parameter(layer, mode == "loop"):
                    edges += _parameters(layer.group)
                else:
                    edges += [GradientEdge(u.node, 0) for u in layer.group.uses]
            return [*edges, *leaves]

        def call(mode: Batching, trial: bool) -> tuple[bool, list[Tensor]]:
            targets = inputs(mode)
            if not targets:
                return mode == "loop", []
            return mode == "loop", self._run(roots, targets, mode, retain=retain or trial)

        def preferred() -> Batching:  # the rule of BatchingChoice("auto"): loop for convolutions on CPU
            has_conv = any(g.kind == "conv" for g in plan_groups)
            return "loop" if has_conv and roots.device.type == "cpu" else "vmap"

        return self._batching.run(key, call, roots, _second_backward, preferred)

    def _run(self, roots: Tensor, inputs: Sequence[GradientEdge | Tensor], mode: Batching, retain: bool
             ) -> list[Tensor]:
        k = roots.shape[0]
        targets = cast(Any, list(inputs))  # tensors and gradient edges mixed: both accepted by autograd
        if mode == "vmap":
            return cast(list[Tensor], batched_vjp(roots, targets, retain))
        out: list[Tensor] = []
        for i in range(k):  # loop over tasks: chosen where it is faster than vmap (convolutions on CPU)
            row = torch.autograd.grad(roots[i], targets, retain_graph=retain or i < k - 1, allow_unused=True,
                                      materialize_grads=True)
            if not out:  # each task's gradients go straight into place: no second copy of all k at once
                out = [g.new_empty((k, *g.shape)) for g in row]
            for buffer, g in zip(out, row, strict=True):
                buffer[i] = g
        return out


def _symmetric_sum(blocks: list[Tensor], like: Tensor, k: int) -> Tensor:
    """``(G + Gᵀ) / 2`` of the blocks' float64 sum ``G``: exactly symmetric (the B-side products are not)."""
    if not blocks:
        return like.new_zeros((k, k), dtype=_F64)
    total = blocks[0]
    for block in blocks[1:]:
        total = total + block
    return (total + total.T) * 0.5  # the same bits as / 2


def _second_backward(error: RuntimeError) -> bool:
    return "backward through the graph a second time" in str(error)


def _reduce(
    layers: list[_Layer],
    fallback_rows: list[Tensor],
    head_rows: list[Tensor],
    k: int,
    reduce_rows: Callable[[Tensor], Tensor],
) -> tuple[list[Tensor], list[Tensor]]:
    """Every layer's per-task gradients (direct form), the fallback and the head rows, averaged over ranks in
    one call of ``reduce_rows`` on a ``(k, n)`` matrix."""
    for layer in layers:
        layer.form = "direct"
        if layer.per_task is None:
            layer.per_task = _direct_rows(layer, k)
        layer.deltas, layer.inputs = [], []
    pieces = [rows for layer in layers for rows in layer.per_task or []] + fallback_rows + head_rows
    if not pieces:
        return fallback_rows, head_rows
    reduced = reduce_rows(torch.cat([p.reshape(k, -1) for p in pieces], dim=1))
    split = [r.view_as(p) for r, p in zip(reduced.split([p[0].numel() for p in pieces], dim=1), pieces,
                                           strict=True)]
    at = 0
    for layer in layers:
        n = len(layer.per_task or [])
        layer.per_task = split[at: at + n]
        at += n
    fallback = split[at: at + len(fallback_rows)]
    at += len(fallback_rows)
    return fallback, split[at:]


def _direct_rows(layer: _Layer, k: int) -> list[Tensor]:
    """Per-task gradients of the layer's (weight, bias), uses summed."""
    group = layer.group
    if group.kind == "conv":
        return _conv_per_task(layer, k)
    if group.kind == "linear":
        x, delta = _rows(layer, k)
        out: list[Tensor] = []
        if group.weight is not None:
            w_grads = torch.matmul(delta.transpose(1, 2), x)  # (k, O, I)
            out.append(w_grads.transpose(1, 2) if _transposed(group) else w_grads)
        if group.bias is not None:
            out.append(delta.sum(dim=1))
        return out
    weight = group.weight
    assert weight is not None
    indices, delta = _embedding_rows(layer, k)
    return [delta.new_zeros((k, *weight.shape)).index_add_(1, indices, delta)]


def _saved_input(use: _Use) -> Tensor:
    node = use.node
    if use.kind == "linear":
        if type(node).__name__ == "MmBackward0":
            return node._saved_self  # type: ignore[attr-defined]
        return node._saved_mat1  # type: ignore[attr-defined]
    if use.kind == "conv":
        use.saved = (node._saved_weight, *_conv_args(node))  # type: ignore[attr-defined]
        return node._saved_input  # type: ignore[attr-defined]
    return node._saved_indices  # type: ignore[attr-defined]


def _combine(weights: Tensor, rows: Tensor) -> Tensor:
    """``Σₖ weights[k] rows[k]`` in the rows' dtype."""
    k = rows.shape[0]
    return (weights.to(rows.dtype) @ rows.reshape(k, -1)).view(rows.shape[1:])


def _linear_form(layer: _Layer, k: int, form: str) -> str:
    """The form of a linear layer, chosen before the backward from the shapes alone (:func:`linear_costs`);
    a bias-only layer takes the direct form (its per-task gradient is the row sum autograd forms anyway)."""
    group = layer.group
    if group.weight is None:
        return "direct"
    if form in ("b_side", "direct"):
        return form
    width_in = layer.inputs[0].shape[-1]
    rows = sum(x.numel() // width_in for x in layer.inputs)
    width_out = group.weight.shape[1] if _transposed(group) else group.weight.shape[0]
    b_side, direct = linear_costs(rows, width_in, width_out, k)
    return "b_side" if b_side <= direct else "direct"


def _by_parameter(layer: _Layer, loop: bool) -> bool:
    """Whether the layer's per-task parameter gradients come straight from the batched backward: a linear
    layer in the direct form, or a convolution in the loop mode (a vmapped convolution weight gradient is
    slow on CPU, so in the vmap mode the engine forms them itself from the output gradients)."""
    kind = layer.group.kind
    return (kind == "linear" and layer.form == "direct") or (kind == "conv" and loop)


def _parameters(group: _Group) -> list[Tensor]:
    return [p for p in (group.weight, group.bias) if p is not None]


def _add_grad(parameter: Tensor, update: Tensor, fresh: bool = False) -> None:
    """Accumulate ``update`` into ``parameter.grad``. ``fresh``: ``update`` is a contiguous view of a tensor
    made for this update alone, which the parameter may keep as its ``.grad`` without a copy."""
    update = update.to(parameter.dtype)
    if parameter.grad is None:
        keep = update.is_contiguous() and (fresh or update._base is None)
        parameter.grad = update if keep else update.clone()
    else:
        parameter.grad.add_(update)


# --------------------------------------------------------------------------------------------- per-layer math
def _rows(layer: _Layer, k: int) -> tuple[Tensor, Tensor]:
    """Linear layer: ``X`` (R × I) and ``Δ`` (k × R × O), the uses stacked as rows."""
    xs = [x.reshape(-1, x.shape[-1]) for x in layer.inputs]
    ds = [d.reshape(k, -1, d.shape[-1]) for d in layer.deltas]
    if len(xs) == 1:
        return xs[0], ds[0]
    return torch.cat(xs), torch.cat(ds, dim=1)


def _layer_gramian(layer: _Layer, k: int, form: str = "auto") -> Tensor | None:
    """The layer's Gram block in the B-side form, or ``None`` when the direct form is cheaper: then the
    layer's per-task gradients are in ``layer.per_task`` and the caller forms their Gram block."""
    group = layer.group
    if group.kind == "linear":
        if layer.form != "b_side":  # decided before the backward (_linear_form)
            _direct_form(layer, k)
            return None
        x, delta = _rows(layer, k)
        if delta.dtype not in (torch.float32, _F64):  # half precision: products in float32
            x, delta = x.float(), delta.float()
        assert group.weight is not None  # a bias-only layer takes the direct form
        kernel = x @ x.T
        if group.bias is not None:
            kernel = kernel + 1.0
        return _b_side_gramian(kernel, delta)
    if group.kind == "conv":
        layer.form = "direct"
        _direct_form(layer, k)
        return None
    # embedding
    indices, delta = _embedding_rows(layer, k)
    weight = group.weight
    assert weight is not None
    b_side, direct = embedding_costs(indices.shape[0], weight.shape[0], weight.shape[1], k)
    if form == "b_side" or (form == "auto" and b_side <= direct):
        layer.form = "b_side"
        if delta.dtype not in (torch.float32, _F64):
            delta = delta.float()
        return _b_side_gramian((indices[:, None] == indices[None, :]).to(delta.dtype), delta)
    layer.form = "direct"
    _direct_form(layer, k)
    return None


def _direct_form(layer: _Layer, k: int) -> None:
    """The layer's per-task gradients (kept for the Gramian and the update); the per-task output gradients
    and saved inputs are dropped at once (the update reads only the per-task gradients)."""
    layer.per_task = _direct_rows(layer, k)
    layer.deltas, layer.inputs = [], []


def _b_side_gramian(kernel: Tensor, delta: Tensor) -> Tensor:
    """``G_ij = ⟨Δᵢ, kernel Δⱼ⟩`` for ``delta`` of shape ``(k, R, O)`` and a symmetric ``(R, R)`` kernel: the
    products in the layer's dtype, summed per row ``r`` in float64 (:func:`_gram64` pairs ``Δ[:, r]`` with
    ``(kernel Δ)[:, r]``)."""
    k, rows, width = delta.shape
    stacked = delta.transpose(0, 1).reshape(rows, k * width)  # (R, k·O)
    mixed = (kernel @ stacked).view(rows, k, width)
    left = stacked.view(rows, k, width)
    if delta.dtype == _F64:
        return torch.bmm(left, mixed.transpose(1, 2)).sum(0)
    return torch.bmm(left.float(), mixed.float().transpose(1, 2)).to(_F64).sum(0)


def _transposed(group: _Group) -> bool:
    return group.uses[0].transposed


def _embedding_rows(layer: _Layer, k: int) -> tuple[Tensor, Tensor]:
    """Embedding: the indices ``(R,)`` and per-task output gradients ``(k, R, D)`` of every use, stacked as
    rows, each use's rows at its own padding index zeroed (a weight looked up once with a padding index and
    once without keeps the other use's gradient at that index)."""
    indices, deltas = [], []
    for use, index, delta in zip(layer.group.uses, layer.inputs, layer.deltas, strict=True):
        index = index.reshape(-1)
        delta = delta.reshape(k, -1, delta.shape[-1])
        padding = getattr(use.node, "_saved_padding_idx", -1)
        if padding is not None and padding >= 0:
            delta = delta * (index != padding).to(delta.dtype)[None, :, None]
        indices.append(index)
        deltas.append(delta)
    if len(indices) == 1:
        return indices[0], deltas[0]
    return torch.cat(indices), torch.cat(deltas, dim=1)


def _conv_args(node: Node) -> tuple:
    return (
        list(node._saved_stride),  # type: ignore[attr-defined]
        list(node._saved_padding),  # type: ignore[attr-defined]
        list(node._saved_dilation),  # type: ignore[attr-defined]
        bool(node._saved_transposed),  # type: ignore[attr-defined]
        list(node._saved_output_padding),  # type: ignore[attr-defined]
        int(node._saved_groups),  # type: ignore[attr-defined]
    )


def _conv_grads(use: _Use, x: Tensor, delta: Tensor, want_weight: bool, want_bias: bool
                ) -> tuple[Tensor | None, Tensor | None]:
    weight, stride, padding, dilation, transposed, output_padding, groups = use.saved
    bias_sizes = [weight.shape[0]] if want_bias else None
    _, grad_w, grad_b = torch.ops.aten.convolution_backward(
        delta, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
        [False, want_weight, want_bias],
    )
    return grad_w, grad_b


def _conv_per_task(layer: _Layer, k: int) -> list[Tensor]:
    group = layer.group
    want_w, want_b = group.weight is not None, group.bias is not None
    w_rows: list[Tensor] = []
    b_rows: list[Tensor] = []
    for use, x, delta in zip(group.uses, layer.inputs, layer.deltas, strict=True):
        per_w, per_b = [], []
        for i in range(k):  # k weight-gradient convolutions; vmap of convolution_backward is slower on CPU
            gw, gb = _conv_grads(use, x, delta[i], want_w, want_b)
            per_w.append(gw)
            per_b.append(gb)
        if want_w:
            w_rows.append(torch.stack(per_w))  # type: ignore[arg-type]
        if want_b:
            b_rows.append(torch.stack(per_b))  # type: ignore[arg-type]
    out: list[Tensor] = []
    if want_w:
        out.append(w_rows[0] if len(w_rows) == 1 else torch.stack(w_rows).sum(0))
    if want_b:
        out.append(b_rows[0] if len(b_rows) == 1 else torch.stack(b_rows).sum(0))
    return out


def _layer_update(layer: _Layer, weights: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, Σₖ wₖ ∇parameter Lₖ)`` for the layer's shared parameters."""
    group = layer.group
    params = [p for p in (group.weight, group.bias) if p is not None]
    if layer.per_task is not None:
        return [(p, _combine(weights, rows)) for p, rows in zip(params, layer.per_task, strict=True)]
    k = weights.shape[0]
    if group.kind == "linear":
        x, delta = _rows(layer, k)
        combined = _combine(weights, delta)  # (R, O)
        out: list[tuple[Tensor, Tensor]] = []
        if group.weight is not None:
            update = x.T @ combined if _transposed(group) else combined.T @ x
            out.append((group.weight, update))
        if group.bias is not None:
            out.append((group.bias, combined.sum(dim=0)))
        return out
    # embedding, B-side
    weight = group.weight
    assert weight is not None
    indices, delta = _embedding_rows(layer, k)
    combined = _combine(weights, delta)
    return [(weight, combined.new_zeros(weight.shape).index_add_(0, indices, combined))]
