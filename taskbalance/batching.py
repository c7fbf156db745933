"""Loop or vmap: how the ``k`` per-task backward passes of a step are batched, measured per graph shape.

A vmapped vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``) runs the ``k``
backward passes as one; a loop runs them one after the other. Which is faster depends on the operations
(vmapped convolution input-gradients are several times slower than a loop on CPU; on MLPs vmap wins).

:class:`BatchingChoice` with ``mode="auto"`` (the default) follows a fixed rule: a loop over the tasks where
the graph holds a convolution on CPU, vmap otherwise (our choice, from the measurements of
``benchmarks/step_overhead.py``). The rule is deterministic, so two runs of the same seed, and a run resumed
from a checkpoint, take bit-identical steps. ``mode="timed"`` (opt-in) alternates the two over the first steps
of a given shape key, times each (the best of :data:`TRIALS` each counts; the clock is read, never the
tensors) and keeps the faster: faster where the rule is wrong, but the last bits of a step then depend on the
machine's load. Either way a vmap that raises (an operation without a batching rule) is remembered as loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Literal, TypeVar

import torch
from torch import Tensor

__all__ = ["Batching", "BatchingChoice", "TRIALS", "preferred_mode"]

Batching = Literal["vmap", "loop"]
TRIALS = 2  # steps timed per mode before the faster is kept
_MAX_KEYS = 256  # shapes remembered (a model whose shapes change every step does not grow this without bound)
Result = TypeVar("Result")


class BatchingChoice:
    """Chooses and remembers ``"vmap"`` or ``"loop"`` per shape key.

    Args:
        mode: ``"auto"`` (the rule: the caller's ``preferred`` mode), ``"timed"`` (time both over the first
            steps of each key, keep the faster), ``"vmap"`` or ``"loop"`` (always that one; vmap still falls
            back to the loop where it raises).
    """

    def __init__(self, mode: Literal["auto", "timed", "vmap", "loop"] = "auto") -> None:
        if mode not in ("auto", "timed", "vmap", "loop"):
            raise ValueError(f"batching must be 'auto', 'timed', 'vmap' or 'loop', got {mode!r}")
        self.mode = mode
        self.chosen: dict[Hashable, Batching] = {}
        self.timings: dict[Hashable, dict[Batching, list[float]]] = {}
        self.proven: set[Hashable] = set()  # keys where vmap has run without raising
        self.vmap_failed = False  # a vmap raised (no batching rule, out of memory): new keys start looped

    def run(
        self,
        key: Hashable,
        call: Callable[[Batching, bool], Result],
        like: Tensor,
        reraise: Callable[[RuntimeError], bool] = lambda error: False,
        preferred: Callable[[], Batching] = lambda: "vmap",
    ) -> Result:
        """``call(mode, retain)`` in the chosen mode. ``retain=True`` while timing and on the first vmap of a
        key (a vmap that raises must leave the graph for the loop: it may fail deep in the backward, after the
        upper layers' buffers were freed, e.g. out of memory on a large graph); otherwise ``retain=False`` and
        the caller decides. After a vmap raised, new keys of this choice start with the loop. ``reraise``
        says which errors of the vmap mode are the caller's (not a missing batching rule). ``preferred``
        gives the rule's mode for a new key (``mode="auto"``; asked once per key)."""
        mode = self.mode
        if mode == "auto" or mode == "timed":
            fixed = self.chosen.get(key)  # the key is hashed twice per step at most (here and in proven)
            if fixed is None and mode == "auto":
                fixed = "loop" if self.vmap_failed else preferred()
                self._remember(key, fixed)
        else:
            fixed = mode
        if fixed is not None:
            if fixed == "loop":
                return call("loop", False)
            proven = key in self.proven
            try:  # until vmap has once worked for this key, keep the graph: a failure deep in the backward
                result = call("vmap", not proven)  # has freed the upper layers' buffers the loop still needs
            except RuntimeError as error:
                if reraise(error):
                    raise
                self._remember(key, "loop")
                self.vmap_failed = True  # new keys of this model start with the loop too
                return call("loop", False)
            if not proven:
                if len(self.proven) >= _MAX_KEYS:
                    self.proven.clear()
                self.proven.add(key)
            return result
        timings = self.timings.setdefault(key, {"loop": [], "vmap": []})
        candidate: Batching = "vmap" if len(timings["vmap"]) < len(timings["loop"]) else "loop"
        _sync(like)
        start = time.perf_counter()
        try:
            result = call(candidate, True)
        except RuntimeError as error:
            if candidate == "loop" or reraise(error):
                raise
            self._remember(key, "loop")
            return call("loop", False)
        _sync(like)
        timings[candidate].append(time.perf_counter() - start)
        if len(timings["vmap"]) >= TRIALS:
            self._remember(key, min(timings, key=lambda m: min(timings[m])))  # type: ignore[arg-type]
        return result

    def _remember(self, key: Hashable, mode: Batching) -> None:
        if len(self.chosen) >= _MAX_KEYS:
            self.chosen.clear()
        self.chosen[key] = mode
        self.timings.pop(key, None)


def preferred_mode(roots: Tensor) -> Batching:
    """The rule of ``mode="auto"``: ``"loop"`` when the graph of ``roots`` holds a convolution and lives on
    the CPU, ``"vmap"`` otherwise (a walk over the graph's nodes, once per shape key)."""
    if roots.device.type != "cpu" or roots.grad_fn is None:
        return "vmap"
    seen: set[object] = set()
    stack = [roots.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("Convolution"):
            return "loop"
        stack.extend(child for child, _ in node.next_functions if child is not None and child not in seen)
    return "vmap"


def _sync(like: Tensor) -> None:
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
