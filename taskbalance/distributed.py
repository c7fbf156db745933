"""Data-parallel balancing: every rank takes the step one process would take on the global batch.

Under data parallelism each of the ``R`` ranks sees its own shard of the batch. A balancer must then
(a) compute its weights and update its state from the *global* losses, so that every rank keeps an identical
state, and (b) for gradient-level methods, read the *global* per-task gradients — PCGrad's projections and
MGDA's min-norm weights are non-linear in the Jacobian, so averaging per-rank updates is **not** the same as
balancing the averaged gradients. :class:`DistributedReducer` does both; attach it with
``balancer.set_reducer(DistributedReducer())`` (or :func:`distribute`). With equal shard sizes and losses that
are per-shard means, the result equals one process on the concatenated batch (up to float rounding; tested in
``tests/integrations/test_ddp.py``).

**What is communicated per step** (``docs/scaling.md`` has figures):

* every method: one all-reduce of ``2K`` floats (the K losses and a K-vector of which tasks are present);
* loss-level methods: nothing else from us — wrap the model in ``DistributedDataParallel`` as usual and its
  ordinary gradient all-reduce (``P_total`` floats) does the rest;
* gradient-level methods, ``gradients="parameters"``: one all-reduce of the ``K × P_shared`` Jacobian, plus
  one all-reduce of the task-specific (head) gradients. The shared update is computed identically on every
  rank from the reduced Jacobian, so it is not communicated again. Through the Gramian engine
  (:mod:`taskbalance.gramian`, the default for methods that need only the Gramian) it is one all-reduce of
  the ``K × (P_shared + P_heads)`` per-task gradients, layer by layer in the direct form; the global Gramian,
  cross-rank terms included, and the update are then formed identically on every rank;
* gradient-level methods, ``gradients="features"``: one all-gather of the ``K × N`` feature Jacobians (every
  rank needs the whole global-batch matrix), then one all-reduce of all parameter gradients.

**DDP and gradient-level methods.** ``torch.autograd.grad`` (how the Jacobian engine gets per-task gradients)
does not fire ``DistributedDataParallel``'s reducer hooks, and a partial backward through a DDP-wrapped model
leaves DDP waiting for gradients that never come. Two supported set-ups, both tested:

1. a *plain* module (no DDP wrapper): call :func:`broadcast_parameters` once so every rank starts from the
   same weights; the reducer does all gradient communication;
2. a DDP-wrapped model used under ``with model.no_sync():`` for the forward pass and ``balancer.backward``:
   DDP's own all-reduce is then off and the reducer replaces it (DDP still broadcasts buffers at forward).

Loss-level methods with a plain module: call :func:`all_reduce_gradients` after ``balancer.backward``.

Requirements: every rank passes the *same set of tasks* at every step (for partially labelled data, pass a
masked loss that is 0 on shards without labels rather than leaving the task out; ``check_tasks=True`` verifies
this, at the cost of one host read per step); feature mode also needs equal per-rank batch sizes. Randomised
methods (PCGrad, RLW) must draw the same numbers on every rank: seed their generator identically.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .balancers.base import Balancer, GradientLevel
from .jacobian import accumulate_grad

__all__ = ["DistributedReducer", "distribute", "all_reduce_gradients", "broadcast_parameters"]


class _ReplaceValue(torch.autograd.Function):
    """Forward: the global value; backward: the gradient flows to the local loss unchanged.

    So ``f(L_global)`` is computed on every rank while ``∂f/∂θ = f'(L_global) ∇L_local``, whose rank mean is
    ``f'(L_global) ∇L_global`` — the chain rule of the global batch, for any objective ``f``. Unlike
    ``L + (g − sg(L))`` the forward value is bit-identical on every rank.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(local: Tensor, value: Tensor) -> Tensor:  # type: ignore[override]
        return value.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class DistributedReducer:
    """Collective operations a balancer needs under data parallelism (see the module docstring).

    Args:
        process_group: the ``torch.distributed`` group of the data-parallel ranks (default: the world).
        check_tasks: verify at every step that all ranks passed the same tasks, raising on every rank at
            once otherwise. Costs one host read per step (our choice: off by default; turn it on to debug).

    Every collective is a mean over ranks; nothing is copied to the host.
    """

    def __init__(self, process_group: Any = None, *, check_tasks: bool = False) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedReducer needs an initialised torch.distributed process group: "
                "call torch.distributed.init_process_group(...) first"
            )
        self.process_group = process_group
        self.check_tasks = check_tasks
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._index_cache: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def __repr__(self) -> str:
        return f"DistributedReducer(rank={self.rank}, world_size={self.world_size})"

    def _mean_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        return tensor.div_(self.world_size)

    def _index(self, index: list[int], device: torch.device) -> Tensor:
        key = (tuple(index), device)
        cached = self._index_cache.get(key)
        if cached is None:
            cached = torch.tensor(index, dtype=torch.long, device=device)
            self._index_cache[key] = cached
        return cached

    # ------------------------------------------------------------------ Reducer protocol
    def globalize_losses(self, losses: Mapping[str, Tensor], tasks: tuple[str, ...]) -> Mapping[str, Tensor]:
        """Replace each loss's value by its mean over ranks; its gradient stays this rank's own.

        One all-reduce of ``2K`` floats (loss sums and presence counts). A task present on only some ranks
        gets the mean over those ranks. Inputs that are not scalar float tensors are passed through untouched
        so that the balancer's own validation reports them.
        """
        if not isinstance(losses, Mapping):
            return losses
        names = [t for t in tasks if t in losses]
        values = [losses[n] for n in names]
        scalar_floats = all(isinstance(v, Tensor) and v.dim() == 0 and v.is_floating_point() for v in values)
        if not names or not scalar_floats:
            return losses
        stacked = torch.stack(values)
        k = len(tasks)
        positions = self._index([tasks.index(n) for n in names], stacked.device)
        dtype = torch.promote_types(stacked.dtype, torch.float32)
        buffer = stacked.new_zeros(2 * k, dtype=dtype)
        buffer[:k].index_copy_(0, positions, stacked.detach().to(dtype))
        buffer[k:].index_fill_(0, positions, 1.0)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.process_group)
        sums, counts = buffer[:k], buffer[k:]
        if self.check_tasks:
            uneven = (counts != 0) & (counts != self.world_size)
            if bool(uneven.any()):  # host read: check_tasks=True only
                bad = [t for t, u in zip(tasks, uneven.tolist(), strict=True) if u]
                raise RuntimeError(
                    f"task(s) {', '.join(repr(b) for b in bad)} were passed on some ranks but not others; "
                    "every rank must pass the same tasks (pass a masked loss, 0 where a shard has no labels)"
                )
        means = (sums / counts.clamp_min(1)).index_select(0, positions).to(stacked.dtype)
        replaced = _ReplaceValue.apply(stacked, means)
        out = dict(losses)
        out.update(zip(names, replaced.unbind(0), strict=True))
        return out

    def reduce_jacobian(self, jacobian: Tensor, level: GradientLevel) -> Tensor:
        """Global-batch Jacobian: the rank mean (parameters) or the rank blocks side by side (features).

        For features the global matrix is ``[J_1, …, J_R] / R`` (``K × R·N``): the global loss is the mean of
        the shard losses, and each shard's features are distinct coordinates.
        """
        if level == "parameters":
            return self._mean_(jacobian.contiguous().clone())
        local = jacobian.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.process_group)
        return torch.cat(parts, dim=1) / self.world_size

    def local_direction(self, direction: Tensor, level: GradientLevel) -> Tensor:
        """This rank's share of the update: all of it (parameters) or ``R ×`` its block (features).

        The factor ``R`` makes the rank mean taken by :meth:`backward_mean` equal the global-batch gradient.
        """
        if level == "parameters":
            return direction
        width = direction.shape[0] // self.world_size
        return direction[self.rank * width:(self.rank + 1) * width] * self.world_size

    def backward_mean(
        self, roots: Sequence[Tensor], grad_tensors: Sequence[Tensor], inputs: Sequence[Tensor]
    ) -> None:
        """Local backward into ``inputs`` (no accumulation), one all-reduce (mean), then add to ``.grad``."""
        inputs = list(inputs)
        if not inputs:
            return
        grads = torch.autograd.grad(list(roots), inputs, grad_outputs=list(grad_tensors), allow_unused=True)
        pieces = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, inputs, strict=True)]
        flat = torch.cat([piece.reshape(-1) for piece in pieces])
        accumulate_grad(inputs, self._mean_(flat))


def distribute(balancer: Balancer, process_group: Any = None, *, check_tasks: bool = False) -> Balancer:
    """Attach a :class:`DistributedReducer` to ``balancer`` and return it."""
    return balancer.set_reducer(DistributedReducer(process_group, check_tasks=check_tasks))


def all_reduce_gradients(parameters: Iterable[Tensor], process_group: Any = None) -> None:
    """Average ``.grad`` over ranks in one coalesced all-reduce (what DDP does; for plain modules).

    Parameters without a gradient on this rank count as zeros, so every rank must list the same parameters.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
    ])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    flat.div_(dist.get_world_size(process_group))
    for p, piece in zip(params, torch.split(flat, [p.numel() for p in params]), strict=True):
        p.grad = piece.view_as(p).clone()


def broadcast_parameters(module: nn.Module, src: int = 0, process_group: Any = None) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to every rank (so all start the same)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=src, group=process_group)
