"""RLW — random loss weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022; arXiv:2111.10603)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..base import LossBalancer
from ..inputs import NonFinitePolicy
from ..registry import register

__all__ = ["RandomLossWeighting"]


@register(
    "rlw",
    family="loss",
    paper="Lin, Ye, Xu, Shi & Zhang, 'Reasonable Effectiveness of Random Weighting: A Litmus Test for "
    "Multi-Task Learning', TMLR 2022 (arXiv:2111.10603)",
    description="Fresh random weights every step: w = softmax(z), z ~ N(0, I).",
)
class RandomLossWeighting(LossBalancer):
    """Random loss weighting (paper Algorithm 2, normal distribution; LibMTL ``RLW``).

    Every step draws ``z ~ N(0, I_K)`` and uses ``w = softmax(z)`` (weights on the simplex, sum 1), with
    ``L_tot = Σ_k w_k L_k`` and constant weights.

    Our choices: the balancer owns its ``torch.Generator``, seeded with ``seed`` and created lazily on the
    losses' device (so no host round trip per step); its state is part of ``state_dict()`` so a resumed
    run draws exactly the weights the uninterrupted run would have drawn. A generator state saved on one
    device type cannot be loaded on another (CPU and CUDA generators differ); that raises a clear error.
    ``z`` is drawn for all ``K`` tasks every step, so the random stream does not depend on which tasks are
    present; absent tasks are masked out of the softmax (the present weights still sum to 1).

    With ``seed=0`` and all tasks present, the draws equal ``torch.manual_seed(0); torch.randn(K)``, …

    Args:
        tasks: task names.
        seed: seed of the balancer's own generator.
        on_nonfinite: see :class:`~taskbalance.Balancer`.
    """

    extra_state_fields = ("rng_state",)

    def __init__(
        self, tasks: Sequence[str], *, seed: int = 0, on_nonfinite: NonFinitePolicy = "raise"
    ) -> None:
        super().__init__(tasks, on_nonfinite=on_nonfinite)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def rng_state(self) -> dict[str, Any] | None:
        """``{"device": type, "state": uint8 tensor}`` of the generator, or ``None`` before its first use."""
        if self._generator is None:
            return self._pending_state
        return {"device": self._generator.device.type, "state": self._generator.get_state()}

    @rng_state.setter
    def rng_state(self, state: dict[str, Any] | None) -> None:
        self._generator = None
        if state is not None:
            state = {"device": str(state["device"]), "state": state["state"]}
        self._pending_state = state

    def _generator_on(self, device: torch.device) -> torch.Generator:
        generator = self._generator
        if generator is not None and generator.device.type == device.type:
            return generator
        if generator is not None:
            raise RuntimeError(
                f"rlw's generator lives on {generator.device.type} but the losses are on {device.type}; "
                "keep the losses on one device type for the whole run"
            )
        generator = torch.Generator(device=device)
        pending = self._pending_state
        if pending is None:
            generator.manual_seed(self.seed)
        elif pending["device"] != device.type:
            raise RuntimeError(
                f"the saved rlw generator state is for {pending['device']}, the losses are on {device.type}: "
                f"a {pending['device']} random stream cannot continue on {device.type}"
            )
        else:
            generator.set_state(pending["state"])
        self._generator, self._pending_state = generator, None
        return generator

    def objective(self, losses: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        generator = self._generator_on(losses.device)
        z = torch.randn(self.num_tasks, generator=generator, device=losses.device, dtype=losses.dtype)
        weights = torch.softmax(torch.where(present, z, -math.inf), dim=0)
        return (weights * losses).sum(), weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
