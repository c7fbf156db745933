"""Lightning integration: the mixin trains with manual optimisation, applies the balancer's step exactly as
the plain loop does, logs weights, calls end_epoch, and resumes from a Lightning checkpoint bit-for-bit."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from toy import ToyMultiTask, toy_batch

import taskbalance
from taskbalance.integrations.lightning import TaskBalancingMixin

TASKS = ["a", "b", "c"]
METHODS = {"ema": {}, "mgda": {}, "pcgrad": {"seed": 5}}
N, BATCH = 32, 8


class LitMultiTask(TaskBalancingMixin, L.LightningModule):
    def __init__(self, method: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ToyMultiTask(TASKS)
        self.balancer = taskbalance.make(method, TASKS, **METHODS[method])

    def task_losses(self, batch):
        x, *targets = batch
        z, out = self.net(x)
        return {t: ((out[t] - y) ** 2).mean() for t, y in zip(TASKS, targets, strict=True)}, z

    def shared_parameters(self):
        return self.net.trunk.parameters()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def _loader() -> DataLoader:
    x, y = toy_batch(TASKS, n=N, scales={"a": 1.0, "b": 20.0, "c": 0.05})
    return DataLoader(TensorDataset(x, *(y[t] for t in TASKS)), batch_size=BATCH, shuffle=False)


def _trainer(tmp_path, epochs: int) -> L.Trainer:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1,
        enable_checkpointing=False,
    )


def _fit(module: L.LightningModule, tmp_path, epochs: int, ckpt_path=None) -> L.Trainer:
    trainer = _trainer(tmp_path, epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers etc.
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_mixin_takes_the_same_steps_as_the_plain_loop(method, tmp_path):
    module = LitMultiTask(method)
    trainer = _fit(module, tmp_path, epochs=2)

    reference = LitMultiTask(method)  # same seed: same initial weights and balancer
    optimizer = torch.optim.SGD(reference.net.parameters(), lr=0.1)
    for _ in range(2):
        for batch in _loader():
            optimizer.zero_grad()
            losses, z = reference.task_losses(batch)
            reference.balancer.backward(losses, shared=reference.shared_parameters(), features=z)
            optimizer.step()
        reference.balancer.end_epoch()

    for (name, p), q in zip(module.net.named_parameters(), reference.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert module.balancer.step_count == 2 * N // BATCH
    assert module.balancer.epoch_count == 2
    for task in TASKS:
        assert f"weight/{task}" in trainer.callback_metrics
    if method == "ema":  # the loss-level weights really were applied: scaled losses are ~1
        weights = torch.stack([trainer.callback_metrics[f"weight/{t}"] for t in TASKS])
        assert weights[1] < weights[0] < weights[2]  # task b's loss is 20x larger, c's 20x smaller


@pytest.mark.slow
def test_resuming_from_a_lightning_checkpoint_continues_bit_for_bit(tmp_path):
    uninterrupted = LitMultiTask("pcgrad")
    _fit(uninterrupted, tmp_path / "a", epochs=2)

    first = LitMultiTask("pcgrad")
    trainer = _fit(first, tmp_path / "b", epochs=1)
    checkpoint = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = LitMultiTask("pcgrad")
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG
    _fit(resumed, tmp_path / "c", epochs=2, ckpt_path=checkpoint)

    for p, q in zip(resumed.parameters(), uninterrupted.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(resumed.balancer.generator.get_state(), uninterrupted.balancer.generator.get_state())
    assert resumed.balancer.step_count == uninterrupted.balancer.step_count


def test_automatic_optimisation_is_refused(tmp_path):
    module = LitMultiTask("ema")
    module.automatic_optimization = True
    with pytest.raises(RuntimeError, match="manual optimisation"):
        module.training_step(next(iter(_loader())), 0)


def test_a_module_without_balancer_gets_a_clear_error():
    class NoBalancer(TaskBalancingMixin, L.LightningModule):
        pass

    with pytest.raises(AttributeError, match="self.balancer"):
        NoBalancer().training_step(None, 0)
