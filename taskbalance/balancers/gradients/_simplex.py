"""Euclidean projection onto the probability simplex, batched, on device (Duchi et al., ICML 2008, Fig. 1)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_onto_simplex"]


def project_onto_simplex(v: Tensor, total: Tensor | float = 1.0) -> Tensor:
    """``argmin_{w ≥ 0, Σ w = total} ‖w − v‖`` along the last dimension (sort-based; no host read).

    ``total`` (default 1) is a number or a tensor broadcastable to ``v.shape[:-1] + (1,)``, ``>= 0``.
    """
    k = v.shape[-1]
    sorted_desc, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = sorted_desc.cumsum(-1) - total
    ranks = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    support = sorted_desc - cumulative / ranks > 0
    count = support.sum(-1, keepdim=True).clamp_min(1)
    threshold = cumulative.gather(-1, count - 1) / count.to(v.dtype)
    return (v - threshold).clamp_min(0.0)
