"""Hugging Face integration: BalancedTrainer trains a plain nn.Module offline, applies the balancer's step
exactly as the plain loop does, logs weights, and resumes the balancer's state from a checkpoint."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from toy import ToyMultiTask, toy_batch
from transformers import TrainingArguments
from transformers.utils import logging as hf_logging

import taskbalance
from taskbalance.integrations.huggingface import BalancedTrainer

TASKS = ["a", "b", "c"]
METHODS = {"ema": {}, "mgda": {}, "pcgrad": {"seed": 5}, "uw": {}}
N = 8  # one batch per epoch: the Trainer's shuffling cannot change the result


class Rows(Dataset):
    def __init__(self) -> None:
        self.x, self.y = toy_batch(TASKS, n=N, scales={"a": 1.0, "b": 20.0, "c": 0.05})

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], **{f"y_{t}": self.y[t][i] for t in TASKS}}


class MultiTaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ToyMultiTask(TASKS)

    def forward(self, x, y_a, y_b, y_c):
        z, out = self.net(x)
        targets = {"a": y_a, "b": y_b, "c": y_c}
        return {"task_losses": {t: ((out[t] - targets[t]) ** 2).mean() for t in TASKS}, "features": z}


class SingleLossModel(nn.Module):
    def forward(self, x):
        return {"loss": x.sum()}


def _trainer(method: str, tmp_path, epochs: int, save: bool = False):
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = MultiTaskModel()
    balancer = taskbalance.make(method, TASKS, **METHODS.get(method, {}))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=N, num_train_epochs=epochs, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        save_strategy="epoch" if save else "no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    trainer = BalancedTrainer(
        model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(), balancer=balancer,
        shared_parameters=lambda m: m.net.trunk.parameters(),
    )
    return trainer, model, balancer


def _train(trainer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.train(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_takes_the_same_steps_as_the_plain_loop(method, tmp_path):
    trainer, model, balancer = _trainer(method, tmp_path, epochs=3)
    _train(trainer)

    reference = MultiTaskModel()
    ref_balancer = taskbalance.make(method, TASKS, **METHODS.get(method, {}))
    optimizer = torch.optim.SGD([*reference.parameters(), *ref_balancer.parameters()], lr=0.1)
    batch = {k: torch.stack([row[k] for row in Rows()]) for k in Rows()[0]}
    for _ in range(3):
        optimizer.zero_grad()
        out = reference(**batch)
        shared = reference.net.trunk.parameters()
        ref_balancer.backward(out["task_losses"], shared=shared, features=out["features"])
        optimizer.step()
        ref_balancer.end_epoch()

    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for p, q in zip(balancer.parameters(), ref_balancer.parameters(), strict=True):  # UW's log-variances
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert balancer.step_count == 3 and balancer.epoch_count == 3
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(f"weight/{t}" in entry for entry in logged for t in TASKS)
    if method == "ema":  # the weights really were applied: task b's loss is 20x larger, c's 20x smaller
        last = logged[-1]
        assert last["weight/b"] < last["weight/a"] < last["weight/c"]
    assert "eval_loss" in trainer.evaluate()


@pytest.mark.slow
def test_resume_from_checkpoint_restores_the_balancer_bit_for_bit(tmp_path):
    uninterrupted, model_a, balancer_a = _trainer("pcgrad", tmp_path / "a", epochs=3)
    _train(uninterrupted)

    first, _, _ = _trainer("pcgrad", tmp_path / "b", epochs=3, save=True)
    _train(first)
    resumed, model_c, balancer_c = _trainer("pcgrad", tmp_path / "c", epochs=3)
    torch.manual_seed(99)  # whatever the global RNG, the balancer's own stream comes from the checkpoint
    _train(resumed, resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))

    assert (tmp_path / "b" / "checkpoint-2" / "balancer.pt").exists()
    assert balancer_c.step_count == balancer_a.step_count == 3
    assert torch.equal(balancer_c.generator.get_state(), balancer_a.generator.get_state())
    # The model itself is the Trainer's business: the rows of the one batch may come in another order after a
    # resume (the sampler's RNG), which changes only the summation order of the batch mean.
    for p, q in zip(model_c.parameters(), model_a.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        BalancedTrainer(
            model=MultiTaskModel(),
            args=TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, use_cpu=True,
                                   report_to=[]),
            train_dataset=Rows(), balancer=taskbalance.make("ew", TASKS),
        )


def test_a_model_without_task_losses_gets_a_clear_error(tmp_path):
    trainer, _, _ = _trainer("ew", tmp_path, epochs=1)
    with pytest.raises(ValueError, match="task_losses"):
        trainer.compute_loss(SingleLossModel(), {"x": torch.zeros(1)})
