"""Multi-Fashion: two Fashion-MNIST items overlaid, two 10-class tasks (Sener & Koltun, NeurIPS 2018, §6.1).

Construction (Sener & Koltun's Multi-MNIST applied to Fashion-MNIST, as in Lin et al. 2019's
Multi-Fashion): for each image ``i`` of a split, a partner ``j`` is drawn uniformly at random (seeded; the
image itself may be drawn); ``i`` is placed at the top-left and ``j`` at the bottom-right of a 36×36
canvas, i.e. shifted by 8 pixels in each direction, and the two are overlaid with a pixel-wise maximum
(**our choice**: the paper does not say how overlapping pixels combine). Tasks: ``left`` (class of the
top-left item) and ``right`` (class of the bottom-right item). By default the canvas is resized to 28×28
(bilinear, antialiased) like the common Multi-MNIST releases, so the LeNet trunk of the paper applies
unchanged; ``resize=False`` keeps 36×36. Pixels are scaled to [0, 1] and not standardised.

Splits: the 60,000 training images give train and validation (``val_fraction=0.1`` of them, seeded), the
10,000 test images give test. ``train_size`` / ``test_size`` take seeded subsets for quick runs.

Files: standard IDX files (``train-images-idx3-ubyte`` and the ``labels``/``t10k`` siblings, ``.gz`` or
not), looked up in ``data_dir=``, then ``$TASKBALANCE_DATA`` (and its ``fashion-mnist/`` subfolder), then
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``: ``make data``).
Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import MultiTaskData
from .idx import read_idx
from .prepare import assemble
from .tasks import Task

__all__ = ["load_multi_fashion", "find_fashion_mnist", "overlay_pairs", "SYSTEM_DIR"]

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _candidates(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    places: list[Path] = []
    if data_dir is not None:
        places.append(Path(data_dir))
    env = os.environ.get("TASKBALANCE_DATA")
    if env:
        places += [Path(env), Path(env) / "fashion-mnist"]
    places.append(SYSTEM_DIR)
    return places


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files from the first place that has all of them."""
    searched = _candidates(data_dir)
    for folder in searched:
        found = {key: _find(folder, stem) for key, stem in _STEMS.items()}
        if all(found.values()):
            return {k: v for k, v in found.items() if v is not None}
    places = "\n".join(f"  - {p}" for p in searched)
    raise FileNotFoundError(
        "Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) not found. Searched:\n"
        f"{places}\n"
        "Run `make data` (installs the Debian package dataset-fashion-mnist), or pass data_dir=, or set "
        "$TASKBALANCE_DATA to a folder holding the files."
    )


def overlay_pairs(images: Tensor, partners: Tensor, *, resize: bool = True, shift: int = 8) -> Tensor:
    """``(N, 1, S, S)`` overlays: ``images`` top-left, ``images[partners]`` bottom-right, pixel-wise max.

    ``images`` is ``(N, H, W)`` in [0, 1]; the canvas is ``H + shift`` square (36 for 28 + 8), resized
    back to ``H × W`` when ``resize``.
    """
    n, h, w = images.shape
    canvas_left = F.pad(images, (0, shift, 0, shift))
    canvas_right = F.pad(images[partners], (shift, 0, shift, 0))
    canvas = torch.maximum(canvas_left, canvas_right)[:, None]
    if resize:
        canvas = F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return canvas


def _subset(n: int, size: int | None, g: torch.Generator) -> Tensor:
    if size is None:
        return torch.arange(n)
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be between 1 and {n}, got {size}")
    return torch.randperm(n, generator=g)[:size].sort().values


def load_multi_fashion(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    resize: bool = True,
    val_fraction: float = 0.1,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> MultiTaskData:
    """Load Multi-Fashion (see the module docstring).

    Args:
        data_dir: folder with the Fashion-MNIST IDX files (searched first).
        resize: resize the 36×36 canvas to 28×28 (default) or keep it.
        val_fraction: fraction of the (subset of the) 60,000 training images held out for validation.
        train_size, test_size: seeded random subsets of the training and test images (default: all).
        seed: seed of partner draws, subsets and the validation split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = find_fashion_mnist(data_dir)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {part} files: images {images.shape} and labels {labels.shape} "
                "do not form (N, H, W) images with N labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"Fashion-MNIST {part} labels must be 0..9")
    g = torch.Generator().manual_seed(int(seed))
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for part, size in (("train", train_size), ("test", test_size)):
        keep = _subset(len(arrays[f"{part}_images"]), size, g)
        pixels = torch.from_numpy(np.array(arrays[f"{part}_images"], dtype=np.float32))[keep] / 255.0
        classes = torch.from_numpy(np.array(arrays[f"{part}_labels"], dtype=np.int64))[keep]
        # partners are drawn within a split, so no test image is ever paired into a training example
        partners = torch.randint(len(pixels), (len(pixels),), generator=g)
        parts.append((overlay_pairs(pixels, partners, resize=resize), classes, classes[partners]))
    (x_train, left_train, right_train), (x_test, left_test, right_test) = parts
    n_train_all = len(x_train)
    n_val = int(round(val_fraction * n_train_all))
    if n_val < 1 or n_val >= n_train_all:
        raise ValueError(f"val_fraction={val_fraction} leaves no train or validation rows of {n_train_all}")
    order = torch.randperm(n_train_all, generator=g)
    x = torch.cat([x_train, x_test])
    y = {"left": torch.cat([left_train, left_test]), "right": torch.cat([right_train, right_test])}
    splits = (order[n_val:], order[:n_val], torch.arange(n_train_all, len(x)))
    tasks: Sequence[Task] = (
        Task("left", "multiclass", num_classes=10),
        Task("right", "multiclass", num_classes=10),
    )
    return assemble(
        "multi_fashion",
        tasks,
        x,
        y,
        None,
        splits,
        standardise_inputs=False,
        protocol={
            "resize": resize,
            "val_fraction": val_fraction,
            "train_size": train_size,
            "test_size": test_size,
            "seed": seed,
            "overlay": "max",
            "shift": 8,
        },
    )
