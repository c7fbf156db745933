"""The trainer's extra batches: an endless, seeded, resumable stream over the method's source split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import taskbalance as tb
from taskbalance.data.tiny import tiny_data
from taskbalance.models.tiny import TinyModel
from taskbalance.train import TrainConfig, fit, load_checkpoint, seed_everything
from taskbalance.train.extra_batches import BatchStream, extra_batch_stream


def drawn_rows(stream: BatchStream, batches: int) -> list[list[float]]:
    return [stream.next()[0][:, 0].tolist() for _ in range(batches)]


def test_each_pass_covers_the_split_once_in_a_new_order():
    split = tiny_data(n_val=10).val
    stream = BatchStream(split, batch_size=4, seed=0)
    passes = [sum(drawn_rows(stream, 3), []) for _ in range(3)]  # 10 samples: batches of 4, 4, 2
    every = sorted(split.x[:, 0].tolist())
    assert all(sorted(p) == every for p in passes)
    assert passes[0] != passes[1] != passes[2]


def test_a_stream_resumed_from_its_state_continues_as_an_uninterrupted_one():
    split = tiny_data(n_val=10).val
    straight = BatchStream(split, 4, seed=5)
    expected = drawn_rows(straight, 8)
    first = BatchStream(split, 4, seed=5)
    head = drawn_rows(first, 5)  # mid-way through the second pass
    state = first.state_dict()
    again = BatchStream(split, 4, seed=99)
    again.load_state_dict(state)
    assert head + drawn_rows(again, 3) == expected


def test_the_stream_draws_from_the_split_the_method_names():
    data = tiny_data()
    held_out = tb.make("hydalearn", data.task_names, main="a", main_gradient="held_out")
    stream = extra_batch_stream(held_out, data, batch_size=8, seed=0)
    assert stream is not None and stream.split is data.val
    assert extra_batch_stream(tb.make("ew", data.task_names), data, 8, 0) is None


def test_an_empty_source_split_is_refused_with_the_method_and_split_named():
    data = tiny_data(n_val=0)
    held_out = tb.make("hydalearn", data.task_names, main="a", main_gradient="held_out")
    with pytest.raises(ValueError, match="hydalearn draws its extra batches from the validation split"):
        extra_batch_stream(held_out, data, 8, 0)


def test_fit_feeds_validation_batches_and_resumes_bit_for_bit(tmp_path: Path):
    data = tiny_data(binary=())
    config = TrainConfig(epochs=3, batch_size=16, lr=1e-2)

    def run(**kwargs):
        seed_everything(2)
        model = TinyModel(data)
        balancer = tb.make("hydalearn", data.task_names, main="a", main_gradient="held_out")
        return model, fit(model, data, balancer, config, seed=2, progress=False, **kwargs)

    model_a, straight = run()
    gains = [step[1] for epoch in straight.weights for step in epoch]
    assert len(set(gains)) > 1  # the auxiliary's weight moves with the held-out gradient

    class Crash(RuntimeError):
        pass

    def crash(epoch, entry, model):
        if epoch == 2:
            raise Crash

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Crash):
        run(checkpoint=ckpt, on_epoch_end=crash)
    assert load_checkpoint(ckpt)["extra_batches"]["consumed"] > 0
    torch.manual_seed(777)
    model_b, resumed = run(checkpoint=ckpt, resume=True)
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key]), key
    assert resumed.weights == straight.weights
