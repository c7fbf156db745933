"""Task tensioners (docs/method-notes.md §6.4): central direction, tension bounds, weight form, repair
(faithful, official 2-task code); our K >= 3 extension (centred tension, tension scaled to the central
direction); history memory."""

import math

import torch

import taskbalance as tb
from taskbalance import GradientStep
from taskbalance.balancers.gradients._solvers import gramian
from taskbalance.balancers.gradients.tensioners import central_direction_weights


def sample(k, seed, p=30):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    return torch.randn(k, p, generator=g, dtype=torch.float64) * scales


def test_central_direction_has_equal_cosines_and_weights_sum_to_one():
    for seed in range(20):
        j = sample(2 + seed % 6, seed)
        a, _ = central_direction_weights(gramian(j))
        d = a @ j
        cosines = (j @ d) / (j.norm(dim=1) * d.norm())
        support = a > 1e-9
        assert torch.isclose(a.sum(), torch.tensor(1.0, dtype=a.dtype))
        torch.testing.assert_close(cosines[support], cosines[support].mean().expand(int(support.sum())))


def test_tensions_lie_between_one_minus_alpha_and_one():
    balancer = tb.make("tensioners", ["a", "b"], alpha=0.6)
    ratio = torch.linspace(0.2, 3.0, 50, dtype=torch.float64)
    losses = torch.logspace(-6, 3, 50, dtype=torch.float64)
    tau = balancer.tensions(ratio, losses)
    assert (tau >= 0.4 - 1e-12).all() and (tau <= 1.0).all()
    steady = balancer.tensions(torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert math.isclose(float(steady), 1 - 0.6 / 2)


def warmed(balancer, j, steps):
    for _ in range(steps):
        losses = torch.full((j.shape[0],), 2.0, dtype=j.dtype)
        result = balancer.aggregate(GradientStep.of(j, losses, torch.arange(j.shape[0])))
    return result


def test_weight_form_equals_vector_form_and_repair_removes_conflicts():
    for seed in range(10):
        j = sample(3, seed)
        balancer = tb.make(
            "tensioners", ["a", "b", "c"], alpha=0.5, window=2, center=False, tension_scale="unit"
        )
        assert balancer.is_faithful
        result = warmed(balancer, j, 4)
        assert bool(result.extras["tension_active"])
        a = result.extras["central_weights"]
        d = a @ j
        tau = result.extras["tensions"]
        v = d + (tau[:, None] * (j - d) / (j - d).norm(dim=1, keepdim=True)).sum(0)
        for i in range(3):  # official repair, vector form
            g = j[i]
            if v @ g < 0:
                w = v - (v @ g) / (g @ g) * g
                cos = (g @ (v - g)) / (g.norm() * (v - g).norm())
                phi = math.pi - torch.arccos(cos)
                v = torch.tan(phi) * g.norm() * w / w.norm()
        torch.testing.assert_close(result.weights @ j, v, rtol=1e-6, atol=1e-9)


def test_alpha_zero_orthogonal_equal_norms_is_symmetric():
    j = torch.eye(2, 5, dtype=torch.float64) * 3.0
    balancer = tb.make("tensioners", ["a", "b"], alpha=0.0, window=1)
    result = warmed(balancer, j, 3)
    update = result.weights @ j
    d = result.extras["central_weights"] @ j
    torch.testing.assert_close(update / update.norm(), d / d.norm())
    u = (j - d) / (j - d).norm(dim=1, keepdim=True)
    torch.testing.assert_close(update, d + u.sum(0))


def test_zero_gradient_skips_the_shared_update():
    j = sample(3, 0)
    j[1] = 0
    balancer = tb.make("tensioners", ["a", "b", "c"])
    result = balancer.aggregate(GradientStep.of(j))
    assert (result.weights == 0).all()


def test_mean_grad_norm_scale_multiplies_tensions():
    j = sample(3, 1)
    faithful = {"window": 1, "center": False}
    unit = warmed(tb.make("tensioners", ["a", "b", "c"], tension_scale="unit", **faithful), j, 3)
    unit = unit.extras["tensions"]
    scaled = warmed(tb.make("tensioners", ["a", "b", "c"], tension_scale="mean_grad_norm", **faithful), j, 3)
    torch.testing.assert_close(scaled.extras["tensions"], unit * j.norm(dim=1).mean())


def repaired(v, j):
    """The official repair in vector form (as in the faithful test above)."""
    for i in range(j.shape[0]):
        g = j[i]
        if v @ g < 0:
            w = v - (v @ g) / (g @ g) * g
            cos = (g @ (v - g)) / (g.norm() * (v - g).norm())
            phi = math.pi - torch.arccos(cos)
            v = torch.tan(phi) * g.norm() * w / w.norm()
    return v


def test_two_tasks_default_is_the_official_method_and_centring_changes_nothing_there():
    balancer = tb.make("tensioners", ["a", "b"])
    assert balancer.is_faithful and not balancer.center and balancer.tension_scale == "unit"
    for seed in range(5):
        j = sample(2, seed)
        official = warmed(tb.make("tensioners", ["a", "b"], window=2), j, 4)
        centred = warmed(tb.make("tensioners", ["a", "b"], window=2, center=True), j, 4)
        assert bool(official.extras["tension_active"])
        torch.testing.assert_close(centred.weights @ j, official.weights @ j, rtol=1e-9, atol=1e-12)


def test_three_or_more_tasks_default_is_our_extension_centred_and_scaled_to_the_central_direction():
    balancer = tb.make("tensioners", list("abcde"))
    assert not balancer.is_faithful and balancer.center and balancer.tension_scale == "central"
    for seed in range(5):
        j = sample(5, seed)
        result = warmed(tb.make("tensioners", list("abcde"), window=2, alpha=0.5), j, 4)
        a = result.extras["central_weights"]
        d = a @ j
        faithful = warmed(tb.make("tensioners", list("abcde"), window=2, alpha=0.5, center=False,
                                  tension_scale="unit"), j, 4).extras["tensions"]
        tau = (faithful - faithful.mean()) * d.norm()
        torch.testing.assert_close(result.extras["tensions"], tau)
        v = d + (tau[:, None] * (j - d) / (j - d).norm(dim=1, keepdim=True)).sum(0)
        torch.testing.assert_close(result.weights @ j, repaired(v, j), rtol=1e-6, atol=1e-9)


def test_extension_is_invariant_to_rescaling_all_gradients_where_the_official_method_is_not():
    j = sample(4, 3)
    for options, invariant in (({}, True), ({"center": False, "tension_scale": "unit"}, False)):
        small = warmed(tb.make("tensioners", list("abcd"), window=1, **options), j, 3).weights @ j
        large = warmed(tb.make("tensioners", list("abcd"), window=1, **options), 100 * j, 3).weights @ j
        cosine = float(small @ large / (small.norm() * large.norm()))
        assert (abs(cosine - 1) < 1e-9) is invariant


def test_use_tension_false_is_the_central_direction():
    j = sample(4, 2)
    result = warmed(tb.make("tensioners", list("abcd"), window=1, use_tension=False), j, 5)
    assert not bool(result.extras["tension_active"])
    torch.testing.assert_close(result.weights, result.extras["central_weights"])


def test_huge_window_does_not_allocate_the_window_up_front_and_history_grows_only_as_needed():
    balancer = tb.make("tensioners", [f"t{i}" for i in range(11)], window=10**9)
    assert balancer.norm_window.numel() <= 16 * 11
    j = sample(11, 0)
    warmed(balancer, j, 40)
    assert 40 <= balancer.norm_window.shape[0] <= 80
    capped = tb.make("tensioners", ["a", "b", "c"], window=5)
    warmed(capped, sample(3, 0), 40)
    assert capped.norm_window.shape[0] == 5


def test_sliding_window_ratio_is_exact_across_history_growth_and_survives_a_state_round_trip():
    window, steps = 20, 50
    j0 = sample(3, 4)
    factors = [1.0 + 0.5 * math.sin(0.7 * t) for t in range(steps)]
    options = {"window": window, "alpha": 0.8, "center": False, "tension_scale": "unit"}
    balancer = tb.make("tensioners", ["a", "b", "c"], **options)
    history = []
    for t, f in enumerate(factors):
        if t == 30:  # restore into a fresh balancer mid-run
            fresh = tb.make("tensioners", ["a", "b", "c"], **options)
            fresh.load_state_dict(balancer.state_dict())
            balancer = fresh
        j = j0 * f
        result = balancer.aggregate(GradientStep.of(j, torch.ones(3, dtype=j.dtype)))
        history.append(j.norm(dim=1))
        if t >= window:
            ratio = torch.stack(history[t - window + 1:]).sum(0) / torch.stack(history[t - window:t]).sum(0)
            expected = balancer.tensions(ratio, torch.ones(3, dtype=j.dtype))
            torch.testing.assert_close(result.extras["tensions"], expected)
            assert bool(result.extras["tension_active"])


def test_registry_marks_the_extension():
    from taskbalance.balancers.registry import method_info

    assert "our" not in method_info("tensioners").description.lower()
    assert "K >= 3" in method_info("tensioners").extension
