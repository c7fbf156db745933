"""Euclidean projection onto the probability simplex, batched, on device (Duchi et al., ICML 2008, Fig. 1)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_onto_simplex"]


def project_onto_simplex(v: Tensor) -> Tensor:
    """``argmin_{w ≥ 0, Σ w = 1} ‖w − v‖`` along the last dimension (sort-based; no host read)."""
    k = v.shape[-1]
    sorted_desc, _ = torch.sort(v, dim=-1, descending=True)
    cumulative = sorted_desc.cumsum(-1) - 1.0
    ranks = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    support = sorted_desc - cumulative / ranks > 0
    count = support.sum(-1, keepdim=True).clamp_min(1)
    threshold = cumulative.gather(-1, count - 1) / count.to(v.dtype)
    return (v - threshold).clamp_min(0.0)
