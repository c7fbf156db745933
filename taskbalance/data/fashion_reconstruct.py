"""Classify + reconstruct on Fashion-MNIST (or MNIST): a cross-entropy task beside a pixel-MSE task.

Each 28×28 image is the input of two tasks sharing a trunk: ``label`` (its 10-class label, cross-entropy) and
``pixels`` (the image itself, 784 values in [0, 1], mean squared error: a vector regression task,
``Task.dim = 784``). The two losses differ in scale by one to two orders of magnitude (pixel MSE ~0.01–0.1,
cross-entropy ~0.3–2.3), the loss-scale mismatch the task-tensioners paper (Sánchez-Gómez et al.) pairs
classification and reconstruction to provoke on its Multi-MNIST variant; the pairing on Fashion-MNIST is
**our choice**. Pixels are scaled to [0, 1], neither inputs nor targets are standardised (the scale
mismatch is the point), and MAE/RMSE of ``pixels`` are in pixel units.

Splits as in :func:`taskbalance.data.fashion.load_multi_fashion`: the 60,000 training images give train and
validation (``val_fraction``, seeded), the 10,000 test images give test; ``train_size`` / ``test_size``
take seeded subsets. Files: the four standard IDX files, found like Multi-Fashion's (``data_dir=``, then
``$TASKBALANCE_DATA``, then ``/usr/share/datasets/fashion-mnist``). MNIST's files have the same names and
format, so ``data_dir=`` a folder holding MNIST's IDX files gives the MNIST version of the pair.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .base import MultiTaskData
from .fashion import _subset, find_fashion_mnist
from .idx import read_idx
from .prepare import assemble
from .tasks import Task

__all__ = ["load_fashion_reconstruct"]


def load_fashion_reconstruct(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> MultiTaskData:
    """Load the classify + reconstruct pair (see the module docstring).

    Args:
        data_dir: folder with Fashion-MNIST's (or MNIST's) IDX files (searched first).
        val_fraction: fraction of the (subset of the) 60,000 training images held out for validation.
        train_size, test_size: seeded random subsets of the training and test images (default: all).
        seed: seed of the subsets and the validation split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = find_fashion_mnist(data_dir)
    g = torch.Generator().manual_seed(int(seed))
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for part, size in (("train", train_size), ("test", test_size)):
        pixels, classes = read_idx(files[f"{part}_images"]), read_idx(files[f"{part}_labels"])
        if pixels.ndim != 3 or classes.ndim != 1 or len(pixels) != len(classes):
            raise ValueError(
                f"{part} IDX files: images {pixels.shape} and labels {classes.shape} do not form (N, H, W) "
                "images with N labels"
            )
        if classes.size and (classes.min() < 0 or classes.max() > 9):
            raise ValueError(f"{part} labels must be 0..9")
        keep = _subset(len(pixels), size, g)
        images.append(torch.from_numpy(np.array(pixels, dtype=np.float32))[keep] / 255.0)
        labels.append(torch.from_numpy(np.array(classes, dtype=np.int64))[keep])
    n_train_all = len(images[0])
    n_val = int(round(val_fraction * n_train_all))
    if n_val < 1 or n_val >= n_train_all:
        raise ValueError(f"val_fraction={val_fraction} leaves no train or validation rows of {n_train_all}")
    order = torch.randperm(n_train_all, generator=g)
    x = torch.cat(images)[:, None]  # (N, 1, H, W)
    side = x.shape[-2] * x.shape[-1]
    y = {"label": torch.cat(labels), "pixels": x.reshape(len(x), side)}
    tasks = (
        Task("label", "multiclass", num_classes=10),
        Task("pixels", "regression", dim=side, metric="mae"),
    )
    splits = (order[n_val:], order[:n_val], torch.arange(n_train_all, len(x)))
    return assemble(
        "fashion_reconstruct",
        tasks,
        x,
        y,
        None,
        splits,
        standardise_inputs=False,
        standardise_targets=False,
        protocol={
            "val_fraction": val_fraction, "train_size": train_size, "test_size": test_size, "seed": seed,
        },
    )
