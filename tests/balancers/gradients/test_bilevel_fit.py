"""Auto-λ and ARML end to end through ``taskbalance.train.fit``: the trainer supplies the validation batches,
and on ``synthetic_aux`` both move weight from the pure-noise auxiliary to the helpful one."""

from __future__ import annotations

import pytest

import taskbalance as tb
from taskbalance.data import load
from taskbalance.data.tiny import tiny_data
from taskbalance.models import build_model
from taskbalance.models.tiny import TinyModel
from taskbalance.train import TrainConfig, fit, seed_everything


@pytest.mark.parametrize(("method", "options"), [("auto-lambda", {"meta_lr": 1e-2}),
                                                 ("arml", {"update_every": 2})])
def test_fit_trains_with_validation_batches_on_tiny_data(method, options):
    data = tiny_data(binary=(), auxiliary=("x",))
    seed_everything(0)
    balancer = tb.make(method, data.task_names, **options)
    result = fit(TinyModel(data), data, balancer, TrainConfig(epochs=2, batch_size=16, lr=1e-2), seed=0,
                 progress=False)
    weights = [step for epoch in result.weights for step in epoch]
    assert len({tuple(w) for w in weights}) > 1  # the weights moved with the validation batches
    assert all(v == v for v in result.test.values())  # finite test metrics


@pytest.mark.slow
@pytest.mark.parametrize(("method", "options"), [("auto-lambda", {"meta_lr": 1e-2}),
                                                 ("arml", {"update_every": 1})])
def test_on_synthetic_aux_the_noise_auxiliary_ends_below_the_helpful_one(method, options):
    data = load("synthetic_aux", n=2000)
    assert data.task_names == ["target", "helpful_0", "noise_0"]
    seed_everything(0)
    model = build_model(data, "mlp", hidden=[32, 32], act="tanh")
    balancer = tb.make(method, data.task_names, **options)
    result = fit(model, data, balancer, TrainConfig(epochs=8, batch_size=64, lr=3e-3), seed=0, progress=False)
    _, helpful, noise = result.weights[-1][-1]
    assert noise < 0.5 * helpful
