"""The published QM9 protocol's training options: ReduceLROnPlateau on the selection score, and selection
on validation Δm against fixed single-task references."""

from __future__ import annotations

from pathlib import Path

import pytest

import taskbalance as tb
from taskbalance.bench.tiny import TinyModel, tiny_data
from taskbalance.train import TrainConfig, fit, seed_everything
from taskbalance.train.loop import selection_score


def _fit(data, config, **kwargs):  # type: ignore[no-untyped-def]
    seed_everything(0)
    model = TinyModel(data)
    return fit(model, data, tb.make("ew", data.task_names), config, seed=0, **kwargs)


def test_plateau_cuts_the_learning_rate_when_the_score_stops_improving_down_to_min_lr() -> None:
    data = tiny_data(binary=())
    # a learning rate so small that the score (Δm against a fixed reference) cannot improve by
    # ReduceLROnPlateau's relative threshold (and large enough for its eps of 1e-8 on a cut)
    config = TrainConfig(epochs=7, batch_size=16, lr=1e-6, scheduler="plateau", plateau_factor=0.5,
                         plateau_patience=0, min_lr=2e-7, eval_batch_size=64,
                         selection_reference={n: 0.01 for n in data.task_names})
    lrs = [h["lr"] for h in _fit(data, config).history]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[-1] < lrs[0]  # cut at least once
    assert min(lrs) == pytest.approx(2e-7)  # cut down to min_lr, never below
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))


def test_plateau_keeps_the_learning_rate_while_the_score_improves() -> None:
    data = tiny_data(binary=())
    config = TrainConfig(epochs=3, batch_size=16, lr=1e-2, scheduler="plateau", plateau_patience=5,
                         eval_batch_size=64)
    assert [h["lr"] for h in _fit(data, config).history] == [1e-2] * 3


def test_selection_reference_makes_the_score_validation_delta_m() -> None:
    data = tiny_data(binary=())
    names = data.task_names
    reference = {n: 0.5 for n in names}
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, scheduler="none", selection_reference=reference,
                         eval_batch_size=64)
    result = _fit(data, config)
    for entry in result.history:
        delta_m = sum((entry["val"][n] - 0.5) / 0.5 for n in names) / len(names)  # lower is better
        assert entry["score"] == pytest.approx(delta_m)
    doubled = {n: 1.0 for n in names}
    assert selection_score(data.tasks, doubled, {}, reference, "relative") == pytest.approx(1.0)


def test_plateau_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    data = tiny_data(binary=())
    config = TrainConfig(epochs=4, batch_size=16, lr=1e-6, scheduler="plateau", plateau_patience=0,
                         eval_batch_size=64, min_lr=0.0,
                         selection_reference={n: 0.01 for n in data.task_names})
    whole = _fit(data, config)
    assert whole.history[-1]["lr"] < whole.history[0]["lr"]
    path = tmp_path / "run.pt"
    first = TrainConfig.from_dict({**config.to_dict(), "checkpoint_every": 1})
    import taskbalance.train.loop as loop

    calls = {"n": 0}

    def stop_after_two(epoch, entry, model):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(data, first, checkpoint=path, on_epoch_end=stop_after_two)
    resumed = _fit(data, first, checkpoint=path, resume=True)
    assert loop is not None and calls["n"] == 2
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in whole.history]
    assert resumed.test == whole.test


def test_new_options_leave_existing_protocol_hashes_alone_and_are_validated() -> None:
    assert "plateau_factor" not in TrainConfig().to_dict()
    assert "selection_reference" not in TrainConfig().to_dict()
    config = TrainConfig(scheduler="plateau", selection_reference={"a": 2.0})
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="plateau_factor"):
        TrainConfig(plateau_factor=1.5)
    with pytest.raises(ValueError, match="non-zero"):
        TrainConfig(selection_reference={"a": 0.0})


def test_balancer_parameters_train_at_their_own_learning_rate() -> None:
    import torch

    data = tiny_data(binary=())
    seen: dict[str, list[float]] = {}
    original = torch.optim.Adam.__init__

    def spy(self, params, *args, **kwargs):  # type: ignore[no-untyped-def]
        groups = list(params)
        seen["lrs"] = [g.get("lr", kwargs.get("lr")) if isinstance(g, dict) else kwargs.get("lr")
                       for g in groups]
        original(self, groups, *args, **kwargs)

    torch.optim.Adam.__init__ = spy  # type: ignore[method-assign]
    try:
        config = TrainConfig(epochs=1, batch_size=16, lr=1e-3, balancer_lr=0.025, eval_batch_size=64)
        seed_everything(0)
        uw = tb.make("uw", data.task_names)
        before = [p.detach().clone() for p in uw.parameters()]
        fit(TinyModel(data), data, uw, config, seed=0)
    finally:
        torch.optim.Adam.__init__ = original  # type: ignore[method-assign]
    assert seen["lrs"] == [1e-3, 0.025]  # the model group at lr, the balancer group at its own
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(uw.parameters(), before, strict=True))
    assert moved > 1e-3 * 3  # Adam moves ~lr per step: faster than the model's 1e-3 could
    assert "balancer_lr" not in TrainConfig().to_dict()
    with pytest.raises(ValueError, match="balancer_lr"):
        TrainConfig(balancer_lr=0.0)
