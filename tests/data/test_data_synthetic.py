"""Synthetic generators: deterministic from a seed, and they produce the structure they promise."""

from __future__ import annotations

import pytest
import torch

from taskbalance.data import load


def _same(a, b) -> bool:  # type: ignore[no-untyped-def]
    return all(
        torch.equal(getattr(a, s).x, getattr(b, s).x)
        and all(torch.equal(getattr(a, s).y[k], getattr(b, s).y[k]) for k in a.task_names)
        for s in ("train", "val", "test")
    )


@pytest.mark.parametrize("name", ["synthetic_scales", "synthetic_mmoe", "synthetic_aux"])
def test_generators_are_deterministic_from_the_seed(name: str) -> None:
    a, b, c = load(name, n=300, seed=1), load(name, n=300, seed=1), load(name, n=300, seed=2)
    assert _same(a, b)
    assert not _same(a, c)


def test_synthetic_scales_targets_carry_the_task_scales() -> None:
    d = load("synthetic_scales", n=2000, scales=(1.0, 10.0, 100.0))
    stds = torch.stack([d.train.y[t].std() for t in d.task_names])
    ratios = stds / stds[0]
    assert torch.allclose(ratios, torch.tensor([1.0, 10.0, 100.0]), rtol=0.25)
    assert [t.scale for t in d.tasks] == [1.0, 1.0, 1.0]  # raw units by default
    assert (len(d.train), len(d.val), len(d.test)) == (1200, 400, 400)


def _correlation(d) -> float:  # type: ignore[no-untyped-def]
    y0, y1 = d.train.y["task_0"], d.train.y["task_1"]
    return float(torch.corrcoef(torch.stack([y0, y1]))[0, 1])


def test_synthetic_mmoe_task_correlation_follows_rho() -> None:
    low, mid, high = (_correlation(load("synthetic_mmoe", n=4000, correlation=r)) for r in (0.0, 0.5, 0.95))
    assert abs(low) < 0.1
    assert low < mid < high
    assert high > 0.85


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_synthetic_mmoe_label_pearson_correlation_tracks_the_cosine(rho: float) -> None:
    """MMoE §3: with c = 1 and α_j, β_j ~ N(0, 0.01) the sines are nearly linear, so the labels' Pearson
    correlation follows the weight vectors' cosine ρ closely."""
    assert abs(_correlation(load("synthetic_mmoe", n=4000, correlation=rho)) - rho) < 0.05


def test_synthetic_mmoe_with_one_seed_only_the_second_task_depends_on_rho() -> None:
    """The sweep is paired: same seed, same inputs and task_0 labels at every ρ (``w_1 = c u_1``), so runs
    at two correlations differ only by the companion task."""
    a, b = (load("synthetic_mmoe", n=400, correlation=r, seed=3) for r in (0.0, 0.9))
    for split in ("train", "val", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y["task_0"], sb.y["task_0"])
        assert not torch.equal(sa.y["task_1"], sb.y["task_1"])


def test_synthetic_mmoe_more_tasks_share_a_pairwise_correlation() -> None:
    d = load("synthetic_mmoe", n=4000, correlation=0.8, num_tasks=4)
    corr = torch.corrcoef(torch.stack([d.train.y[t] for t in d.task_names]))
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.min() > 0.6
    with pytest.raises(ValueError, match="correlation"):
        load("synthetic_mmoe", correlation=-0.5, num_tasks=3)


def test_synthetic_aux_roles_masks_and_noise() -> None:
    d = load("synthetic_aux", n=2000, num_helpful=2, num_harmful=1, target_label_fraction=0.2)
    roles = {t.name: t.role for t in d.tasks}
    assert roles == {
        "target": "target",
        "helpful_0": "auxiliary",
        "helpful_1": "auxiliary",
        "noise_0": "auxiliary",
    }
    assert float(d.train.mask["target"].float().mean()) == pytest.approx(0.2, abs=0.01)
    assert bool(d.val.mask["target"].all()) and bool(d.test.mask["target"].all())
    target = d.train.y["target"][d.train.mask["target"]]
    helpful = d.train.y["helpful_0"][d.train.mask["target"]]
    noise = d.train.y["noise_0"][d.train.mask["target"]]
    assert float(torch.corrcoef(torch.stack([target, helpful]))[0, 1]) > 0.7
    assert abs(float(torch.corrcoef(torch.stack([target, noise]))[0, 1])) < 0.15
    # pure noise cannot be predicted from x: no linear fit explains it
    x = d.train.x
    coef = torch.linalg.lstsq(x, d.train.y["noise_0"][:, None]).solution
    residual = d.train.y["noise_0"][:, None] - x @ coef
    assert float(residual.var() / d.train.y["noise_0"].var()) > 0.9


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("synthetic_scales", {"scales": (1.0, -2.0)}, "scales"),
        ("synthetic_scales", {"scales": ()}, "scales"),
        ("synthetic_mmoe", {"correlation": 1.5}, "correlation"),
        ("synthetic_mmoe", {"num_tasks": 1}, "num_tasks"),
        ("synthetic_mmoe", {"noise": -1.0}, "noise"),
        ("synthetic_aux", {"target_label_fraction": 0.0}, "target_label_fraction"),
        ("synthetic_aux", {"helpful_correlation": 2.0}, "helpful_correlation"),
    ],
)
def test_bad_hyperparameters_are_rejected(name: str, options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load(name, **options)
