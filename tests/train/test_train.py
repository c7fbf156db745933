"""The training loop: selection on validation only, bit-for-bit resume, missing labels, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import taskbalance as tb
from taskbalance.balancers.losses.equal import EqualWeighting
from taskbalance.data.tiny import tiny_data
from taskbalance.models.tiny import TinyModel
from taskbalance.train import TrainConfig, evaluate, fit, load_checkpoint, save_checkpoint, seed_everything

CONFIG = TrainConfig(epochs=4, batch_size=16, lr=1e-2, eval_batch_size=64)


def build(data, seed=0, dropout=0.0):
    seed_everything(seed)
    return TinyModel(data, dropout=dropout)


def run(data, method="ema", config=CONFIG, seed=0, **kwargs):
    model = build(data, seed, dropout=0.2)
    balancer = tb.make(method, data.task_names)
    return model, balancer, fit(model, data, balancer, config, seed=seed, **kwargs)


def test_fit_reports_metrics_history_weights_and_cost():
    data = tiny_data()
    _, _, result = run(data)
    assert result.tasks == data.task_names
    assert set(result.test) == set(result.val) == set(data.task_names)
    assert all(math.isfinite(v) for v in result.test.values())
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    steps_per_epoch = math.ceil(len(data.train) / CONFIG.batch_size)
    assert result.steps == CONFIG.epochs * steps_per_epoch
    assert [len(epoch) for epoch in result.weights] == [steps_per_epoch] * CONFIG.epochs
    assert all(len(step) == len(data.tasks) for epoch in result.weights for step in epoch)
    assert result.ms_per_step > 0 and result.peak_memory_mb > 0
    assert 1 <= result.selected_epoch <= CONFIG.epochs


def test_ema_weights_in_the_trajectory_undo_the_loss_scales():
    data = tiny_data(binary=(), scales=[1.0, 100.0])
    _, _, result = run(data, "ema")
    first_step = result.weights[0][0]
    _, _, plain = run(data, "ew")
    assert plain.weights[0][0] == [1.0, 1.0]
    assert first_step[0] != first_step[1]  # EMA divides each loss by its own magnitude


def test_selection_uses_validation_only_when_val_and_test_disagree():
    # The test split's targets are the negation of the truth: the better the model on validation, the worse
    # on test. A loop that peeked at test would pick an early epoch.
    data = tiny_data(binary=(), flip_test=True)
    config = TrainConfig(epochs=6, batch_size=16, lr=2e-2, scheduler="none")
    test_by_epoch = []

    def spy(epoch, entry, model):
        metrics, _ = evaluate(model, data.test, data.tasks)
        test_by_epoch.append(metrics)

    model = build(data)
    result = fit(model, data, tb.make("ew", data.task_names), config, on_epoch_end=spy)
    scores = [h["score"] for h in result.history]
    assert result.selected_epoch == 1 + scores.index(min(scores))
    test_mean = [sum(m.values()) for m in test_by_epoch]
    best_on_test = 1 + test_mean.index(min(test_mean))
    assert best_on_test != result.selected_epoch, "the case must make validation and test disagree"
    assert result.test == test_by_epoch[result.selected_epoch - 1]
    assert result.val == result.history[result.selected_epoch - 1]["val"]


def test_selection_ignores_auxiliary_tasks():
    data = tiny_data(regression=("main",), binary=(), auxiliary=("aux",))
    model = build(data)
    result = fit(model, data, tb.make("ew", data.task_names), CONFIG)
    first = result.history[0]["val"]
    for entry in result.history:
        expected = (entry["val"]["main"] - first["main"]) / abs(first["main"])
        assert entry["score"] == pytest.approx(expected)


def test_resume_after_a_crash_equals_an_uninterrupted_run_bit_for_bit(tmp_path: Path):
    data = tiny_data(label_fraction=0.6)
    config = TrainConfig(epochs=4, batch_size=16, lr=1e-2)
    ckpt = tmp_path / "run.pt"
    model_a, balancer_a, straight = run(data, "ema", config, seed=3)

    class Crash(RuntimeError):
        pass

    def crash_after_two(epoch, entry, model):
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        run(data, "ema", config, seed=3, checkpoint=ckpt, on_epoch_end=crash_after_two)
    assert load_checkpoint(ckpt)["loop"]["epoch"] == 2
    # Fresh objects, different global RNG state: everything must come from the checkpoint.
    torch.manual_seed(12345)
    model_b = TinyModel(data, dropout=0.2)
    balancer_b = tb.make("ema", data.task_names)
    resumed = fit(model_b, data, balancer_b, config, seed=3, checkpoint=ckpt, resume=True)

    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    for key, value in balancer_a.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, balancer_b.state_dict()[key]), key
    assert resumed.test == straight.test and resumed.selected_epoch == straight.selected_epoch
    assert resumed.weights == straight.weights
    strip = [{k: v for k, v in h.items() if k != "train_seconds"} for h in straight.history]
    assert [{k: v for k, v in h.items() if k != "train_seconds"} for h in resumed.history] == strip


def test_resume_with_a_learnable_balancer_restores_its_parameters_and_optimiser(tmp_path: Path):
    methods = {m.name for m in tb.available()}
    method = "uw" if "uw" in methods else "ema"
    data = tiny_data()
    config = TrainConfig(epochs=3, batch_size=32, lr=1e-2)
    _, balancer_a, straight = run(data, method, config, seed=1)

    def stop(epoch, entry, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(data, method, config, seed=1, checkpoint=tmp_path / "c.pt", on_epoch_end=stop)
    _, balancer_b, resumed = run(data, method, config, seed=1, checkpoint=tmp_path / "c.pt", resume=True)
    assert resumed.test == straight.test
    for (name, p), q in zip(balancer_a.named_parameters(), balancer_b.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_refuses_a_checkpoint_from_another_protocol(tmp_path: Path):
    data = tiny_data()
    run(data, "ew", TrainConfig(epochs=1, batch_size=32), checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match="belongs to another run.*protocol"):
        run(data, "ew", TrainConfig(epochs=2, batch_size=32), checkpoint=tmp_path / "c.pt", resume=True)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path):
    data = tiny_data()
    config = TrainConfig(epochs=2, batch_size=32)
    _, _, fresh = run(data, "ew", config, checkpoint=tmp_path / "missing.pt", resume=True)
    _, _, plain = run(data, "ew", config)
    assert fresh.test == plain.test


def test_same_seed_same_run_and_different_seed_different_run():
    data = tiny_data()
    _, _, a = run(data, seed=0)
    _, _, b = run(data, seed=0)
    _, _, c = run(data, seed=1)
    assert a.test == b.test and a.weights == b.weights
    assert a.test != c.test


class Spy(EqualWeighting):
    """EW that records which tasks each step received and counts post-step calls."""

    needs_post_step_losses = True

    def __init__(self, tasks):
        super().__init__(tasks)
        self.seen: list[set[str]] = []
        self.post_steps = 0
        self.epochs_ended = 0

    def backward(self, losses, **kwargs):
        self.seen.append(set(losses))
        return super().backward(losses, **kwargs)

    def _on_post_step_losses(self, batch):
        assert not batch.values.requires_grad
        self.post_steps += 1

    def _on_epoch_end(self):
        self.epochs_ended += 1


def test_tasks_without_labels_in_a_batch_are_left_out_of_the_step():
    data = tiny_data(label_fraction=0.15, n_train=64)
    config = TrainConfig(epochs=2, batch_size=4)
    model = build(data)
    spy = Spy(data.task_names)
    result = fit(model, data, spy, config)
    order = torch.Generator().manual_seed(0)
    expected = []
    for _ in range(config.epochs):
        for _, _, mask in data.train.batches(config.batch_size, order, shuffle=True):
            expected.append({n for n in data.task_names if bool(mask[n].any())})
    assert spy.seen == expected
    assert any(len(s) < len(data.tasks) for s in expected), "some batch must miss a task"
    flat = [step for epoch in result.weights for step in epoch]
    for names, weights in zip(expected, flat, strict=True):
        assert [w != 0 for w in weights] == [n in names for n in data.task_names]
    assert spy.post_steps == result.steps and spy.epochs_ended == config.epochs


def test_fit_rejects_a_balancer_for_other_tasks():
    data = tiny_data()
    with pytest.raises(ValueError, match="balancer was made for"):
        fit(build(data), data, tb.make("ew", ["x", "y"]), CONFIG)


def test_bad_training_options_are_clear():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(TypeError, match="unknown training option"):
        TrainConfig.from_dict({"epochs": 2, "learning_rate": 1.0})


def test_checkpoints_are_written_atomically_and_read_safely(tmp_path: Path):
    path = tmp_path / "deep" / "c.pt"
    save_checkpoint({"format": 1, "x": torch.arange(3)}, path)
    save_checkpoint({"format": 1, "x": torch.arange(4)}, path)
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(4))
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a taskbalance checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
