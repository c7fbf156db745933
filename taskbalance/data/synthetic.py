"""Synthetic multi-task problems, deterministic from a seed (CPU generator, float64 draws).

* :func:`synthetic_scales` — GradNorm-style regression whose tasks differ in scale σ_k.
* :func:`synthetic_mmoe` — the MMoE generator with a controllable task correlation ρ.
* :func:`synthetic_aux` — a scarce-label target task plus helpful and harmful (pure-noise) auxiliary tasks.

These are **substitutions** for data the seed papers used but did not publish (docs/method-notes.md §5.3);
label results on them as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .base import MultiTaskData
from .prepare import assemble, split_indices, split_sizes
from .tasks import Task

__all__ = ["synthetic_scales", "synthetic_mmoe", "synthetic_aux"]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _orthonormal(d: int, k: int, g: torch.Generator) -> Tensor:
    """``k`` orthonormal columns in ``R^d`` (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # unique up to the draw


def synthetic_scales(
    n: int = 1000,
    scales: Sequence[float] = (1.0, 10.0, 100.0),
    input_dim: int = 250,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    standardise_targets: bool = False,
) -> MultiTaskData:
    """GradNorm-style regression with per-task scales (Chen et al., ICML 2018, §4; method notes §5.3 A).

    ``x ~ N(0, I_F)``, shared direction ``B ~ N(0, 1)^F``, per-task ``ε_k ~ N(0, 3.5)^F`` and
    ``y_k = σ_k · tanh((B + ε_k) x / sqrt(F))``. Dividing by ``sqrt(F)`` is **our choice**: without it the
    argument has a std of about ``sqrt(4.5 F)`` ≈ 34 at F = 250 and tanh is a sign function. No absolute
    value (GradNorm's equation; SLGrad's code adds one). Defaults N = 1000, F = 250, 60/20/20 split (SLGrad's
    toy settings); σ = (1, 10, 100) is our choice. Targets stay in raw units by default
    (``standardise_targets=False``): the scale imbalance is the point of this dataset.
    """
    if n < 3:
        raise ValueError(f"n must be >= 3, got {n}")
    if input_dim < 1:
        raise ValueError(f"input_dim must be >= 1, got {input_dim}")
    if len(scales) < 1:
        raise ValueError("scales needs at least one σ_k")
    _check_positive(**{f"scales[{i}]": s for i, s in enumerate(scales)})
    g = _generator(seed)
    x = torch.randn(n, input_dim, generator=g, dtype=torch.float64)
    base = torch.randn(input_dim, generator=g, dtype=torch.float64)
    eps = torch.randn(len(scales), input_dim, generator=g, dtype=torch.float64) * math.sqrt(3.5)
    sigma = torch.tensor([float(s) for s in scales], dtype=torch.float64)
    y_all = sigma * torch.tanh(x @ (base + eps).T / math.sqrt(input_dim))  # (n, K)
    tasks = [Task(f"task_{k}", "regression") for k in range(len(scales))]
    y = {t.name: y_all[:, k] for k, t in enumerate(tasks)}
    splits = split_indices(n, split_sizes(n, fractions), seed)
    return assemble(
        "synthetic_scales",
        tasks,
        x,
        y,
        None,
        splits,
        standardise_inputs=False,
        standardise_targets=standardise_targets,
        protocol={
            "n": n,
            "scales": list(map(float, scales)),
            "input_dim": input_dim,
            "seed": seed,
            "fractions": list(fractions),
        },
    )


def _mmoe_weights(num_tasks: int, correlation: float, dim: int, c: float, g: torch.Generator) -> Tensor:
    """Task weight vectors ``(K, d)`` of norm ``c`` with pairwise cosine ``correlation``."""
    if num_tasks == 2:
        u = _orthonormal(dim, 2, g)
        w1 = u[:, 0]
        w2 = correlation * u[:, 0] + math.sqrt(1.0 - correlation**2) * u[:, 1]
        return c * torch.stack([w1, w2])
    u = _orthonormal(dim, num_tasks + 1, g)
    return c * (math.sqrt(correlation) * u[:, :1] + math.sqrt(1.0 - correlation) * u[:, 1:]).T


def synthetic_mmoe(
    n: int = 10000,
    correlation: float = 0.5,
    num_tasks: int = 2,
    input_dim: int = 100,
    *,
    num_sines: int = 10,
    scale: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> MultiTaskData:
    """MMoE's synthetic regression with task correlation ρ (Ma et al., KDD 2018, §3.2; method notes §5.3 B).

    Orthonormal ``u_1, u_2``; ``w_1 = c u_1``, ``w_2 = c (ρ u_1 + sqrt(1 − ρ²) u_2)``; ``x ~ N(0, I_d)``;
    ``α_j, β_j ~ N(0, 0.01)``; ``y_k = w_kᵀx + Σ_{j=1..m} sin(α_j w_kᵀx + β_j) + ε``, ``ε ~ N(0, noise²)``
    (``noise = 0.1``: variance 0.01 as in the paper). Defaults d = 100, c = 1, m = 10. For more than two
    tasks (**our extension**) ``w_k = c (sqrt(ρ) u_0 + sqrt(1 − ρ) u_k)``, which gives every pair cosine ρ
    (needs ρ ≥ 0). N = 10,000 and the 80/10/10 split are our choice. Targets are standardised with
    training statistics (``Task.scale`` restores original units).
    """
    if num_tasks < 2:
        raise ValueError(f"num_tasks must be >= 2, got {num_tasks}")
    low = -1.0 if num_tasks == 2 else 0.0
    if not low <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [{low}, 1] for {num_tasks} tasks, got {correlation}")
    if n < 3 or input_dim < num_tasks + 1 or num_sines < 0:
        raise ValueError(
            f"need n >= 3, input_dim > num_tasks and num_sines >= 0; got {n}, {input_dim}, {num_sines}"
        )
    _check_positive(scale=scale)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    g = _generator(seed)
    weights = _mmoe_weights(num_tasks, correlation, input_dim, scale, g)  # (K, d)
    alpha = torch.randn(num_sines, generator=g, dtype=torch.float64) * 0.1
    beta = torch.randn(num_sines, generator=g, dtype=torch.float64) * 0.1
    x = torch.randn(n, input_dim, generator=g, dtype=torch.float64)
    linear = x @ weights.T  # (n, K)
    y_all = linear + torch.sin(linear[..., None] * alpha + beta).sum(-1)
    y_all = y_all + noise * torch.randn(n, num_tasks, generator=g, dtype=torch.float64)
    tasks = [Task(f"task_{k}", "regression") for k in range(num_tasks)]
    y = {t.name: y_all[:, k] for k, t in enumerate(tasks)}
    splits = split_indices(n, split_sizes(n, fractions), seed)
    return assemble(
        "synthetic_mmoe",
        tasks,
        x,
        y,
        None,
        splits,
        standardise_inputs=False,
        protocol={
            "n": n,
            "correlation": correlation,
            "num_tasks": num_tasks,
            "input_dim": input_dim,
            "num_sines": num_sines,
            "scale": scale,
            "noise": noise,
            "seed": seed,
            "fractions": list(fractions),
        },
    )


def synthetic_aux(
    n: int = 5000,
    *,
    num_helpful: int = 1,
    num_harmful: int = 1,
    helpful_correlation: float = 0.9,
    target_label_fraction: float = 0.1,
    noise_scale: float = 1.0,
    input_dim: int = 50,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> MultiTaskData:
    """A target task with few labels, helpful and harmful (pure-noise) auxiliary tasks (our design).

    All tasks are regression with standardised targets. With ``x ~ N(0, I_d)`` and unit vectors ``w``:

    * ``target``: ``y = sin(w_0ᵀx) + w_0ᵀx + 0.1 ε``, labelled on a ``target_label_fraction`` of the
      *training* rows only (mask false elsewhere), and on every validation and test row;
    * ``helpful_i`` (role ``"auxiliary"``): the same function of ``w_i`` with cosine ``helpful_correlation``
      to ``w_0``, labelled everywhere — sharing the trunk with them helps the scarce target;
    * ``noise_i`` (role ``"auxiliary"``): ``noise_scale · ε``, independent of ``x`` — pure noise that can only
      pull the shared representation away from the target.
    """
    if not 0.0 < target_label_fraction <= 1.0:
        raise ValueError(f"target_label_fraction must be in (0, 1], got {target_label_fraction}")
    if not -1.0 <= helpful_correlation <= 1.0:
        raise ValueError(f"helpful_correlation must be in [-1, 1], got {helpful_correlation}")
    if num_helpful < 0 or num_harmful < 0:
        raise ValueError(f"num_helpful and num_harmful must be >= 0, got {num_helpful}, {num_harmful}")
    if input_dim < num_helpful + 1 or n < 3:
        raise ValueError(f"need input_dim > num_helpful and n >= 3, got {input_dim}, {n}")
    _check_positive(noise_scale=noise_scale)
    g = _generator(seed)
    u = _orthonormal(input_dim, num_helpful + 1, g)
    w0 = u[:, 0]
    w_help = helpful_correlation * w0[:, None] + math.sqrt(1 - helpful_correlation**2) * u[:, 1:]  # (d, H)
    x = torch.randn(n, input_dim, generator=g, dtype=torch.float64)
    proj = torch.cat([x @ w0[:, None], x @ w_help], dim=1)  # (n, 1 + H)
    signal = torch.sin(proj) + proj + 0.1 * torch.randn(proj.shape, generator=g, dtype=torch.float64)
    noise = noise_scale * torch.randn(n, num_harmful, generator=g, dtype=torch.float64)
    splits = split_indices(n, split_sizes(n, fractions), seed)
    train_idx = splits[0]
    n_labelled = max(1, round(target_label_fraction * len(train_idx)))
    target_mask = torch.ones(n, dtype=torch.bool)
    target_mask[train_idx[n_labelled:]] = False  # train_idx is already a random order
    tasks = [Task("target", "regression")]
    tasks += [Task(f"helpful_{i}", "regression", role="auxiliary") for i in range(num_helpful)]
    tasks += [Task(f"noise_{i}", "regression", role="auxiliary") for i in range(num_harmful)]
    columns = torch.cat([signal, noise], dim=1)
    y = {t.name: columns[:, k] for k, t in enumerate(tasks)}
    return assemble(
        "synthetic_aux",
        tasks,
        x,
        y,
        {"target": target_mask},
        splits,
        standardise_inputs=False,
        protocol={
            "n": n,
            "num_helpful": num_helpful,
            "num_harmful": num_harmful,
            "helpful_correlation": helpful_correlation,
            "target_label_fraction": target_label_fraction,
            "noise_scale": noise_scale,
            "input_dim": input_dim,
            "seed": seed,
            "fractions": list(fractions),
        },
    )
