"""IDX parsing and the Multi-Fashion construction, on tiny IDX files written in the test."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from fashion_files import _idx_bytes, _write_fashion

from taskbalance.data import fashion as fashion_module
from taskbalance.data import load
from taskbalance.data.fashion import overlay_pairs
from taskbalance.data.idx import read_idx, write_idx


def test_read_idx_parses_hand_written_files_gzipped_or_not(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(_idx_bytes(array))
    (tmp_path / "zipped").write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "plain"), array)
    assert np.array_equal(read_idx(tmp_path / "zipped"), array)


def test_write_idx_round_trips_other_types(tmp_path: Path) -> None:
    array = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    write_idx(tmp_path / "f.idx.gz", array)
    assert np.array_equal(read_idx(tmp_path / "f.idx.gz"), array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    truncated = _idx_bytes(np.zeros((4, 4), dtype=np.uint8))[:-3]
    (tmp_path / "short").write_bytes(truncated)
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(tmp_path / "short")


def test_overlay_places_the_item_top_left_and_the_partner_bottom_right() -> None:
    images = torch.zeros(2, 28, 28)
    images[0, 0, 0] = 1.0  # marks the top-left corner of image 0
    images[1, 27, 27] = 0.5  # marks the bottom-right corner of image 1
    canvas = overlay_pairs(images, torch.tensor([1, 0]), resize=False)
    assert canvas.shape == (2, 1, 36, 36)
    assert float(canvas[0, 0, 0, 0]) == 1.0  # image 0 at the top-left
    assert float(canvas[0, 0, 35, 35]) == 0.5  # its partner (image 1) shifted by 8 to the bottom-right
    assert float(canvas[1, 0, 27, 27]) == 0.5  # image 1 top-left; partner 0's corner lands at (8, 8)
    assert float(canvas[1, 0, 8, 8]) == 1.0
    assert float(canvas.sum()) == pytest.approx(3.0)  # nothing else
    resized = overlay_pairs(images, torch.tensor([1, 0]))
    assert resized.shape == (2, 1, 28, 28)


def test_overlapping_pixels_take_the_maximum() -> None:
    images = torch.full((1, 28, 28), 0.25)
    images[0, 10, 10] = 0.75
    canvas = overlay_pairs(images, torch.tensor([0]), resize=False)
    assert float(canvas[0, 0, 18, 18]) == 0.75  # (10, 10) shifted, over a 0.25 background pixel
    assert float(canvas[0, 0, 20, 20]) == 0.25


@pytest.mark.parametrize("gz", [True, False])
def test_multi_fashion_from_tiny_files(tmp_path: Path, gz: bool) -> None:
    _write_fashion(tmp_path / "fm", gz=gz)
    d = load("multi_fashion", data_dir=tmp_path / "fm", resize=False, val_fraction=0.25)
    assert d.task_names == ["left", "right"]
    assert all(t.kind == "multiclass" and t.num_classes == 10 for t in d.tasks)
    assert (len(d.train), len(d.val), len(d.test)) == (30, 10, 10)
    assert d.input_shape == (1, 36, 36)
    for split in (d.train, d.val, d.test):
        # the left label is read from the top-left block, the right one from the bottom-right block
        left_brightness = split.x[:, 0, 10, 10] * 255
        right_brightness = split.x[:, 0, 25, 25] * 255
        assert torch.allclose(((left_brightness - 50) / 20).floor(), split.y["left"].float(), atol=0.3)
        assert torch.allclose(((right_brightness - 50) / 20).floor(), split.y["right"].float(), atol=0.3)
    assert float(d.train.x.max()) <= 1.0 and float(d.train.x.min()) >= 0.0


def test_multi_fashion_is_deterministic_and_subsets(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "fm")
    a = load("multi_fashion", data_dir=tmp_path / "fm", train_size=20, test_size=5, seed=3)
    b = load("multi_fashion", data_dir=tmp_path / "fm", train_size=20, test_size=5, seed=3)
    c = load("multi_fashion", data_dir=tmp_path / "fm", train_size=20, test_size=5, seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y["right"], b.test.y["right"])
    assert not torch.equal(a.train.x, c.train.x)
    assert (len(a.train) + len(a.val), len(a.test)) == (20, 5)
    assert a.input_shape == (1, 28, 28)


def test_environment_variable_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fashion(tmp_path / "root" / "fashion-mnist")
    monkeypatch.setenv("TASKBALANCE_DATA", str(tmp_path / "root"))
    assert len(load("multi_fashion").test) == 10


def test_missing_files_error_names_the_places_searched_and_make_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKBALANCE_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(fashion_module, "SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(FileNotFoundError) as info:
        load("multi_fashion", data_dir=tmp_path / "given")
    message = str(info.value)
    for place in ("given", "env", "system"):
        assert str(tmp_path / place) in message
    assert "make data" in message and "train-images-idx3-ubyte" in message


def test_inconsistent_files_are_rejected(tmp_path: Path) -> None:
    _write_fashion(tmp_path / "fm", gz=False)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(ValueError, match="test files"):
        load("multi_fashion", data_dir=tmp_path / "fm")
