"""QM9: parsing qm9pack's CSV format, the Coulomb-matrix descriptor, units, cache, and the real wheel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from qm9_files import ELEMENTS, _molecules, _write_qm9pack_like

from taskbalance.data import load
from taskbalance.data import qm9 as qm9_module
from taskbalance.data.qm9 import ATOMREF, BOHR_PER_ANGSTROM, HARTREE_TO_MEV, coulomb_eigenvalues


@pytest.fixture()
def fake_qm9(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[dict[str, object]]]:
    monkeypatch.setenv("TASKBALANCE_CACHE", str(tmp_path / "cache"))
    molecules = _molecules(30)
    _write_qm9pack_like(tmp_path / "qm9", molecules)
    return tmp_path / "qm9", molecules


def _dense_coulomb(symbols: list[str], xyz: np.ndarray) -> np.ndarray:
    z = np.array([qm9_module.ATOMIC_NUMBER[s] for s in symbols], dtype=float)
    r = xyz * BOHR_PER_ANGSTROM
    m = np.zeros((len(z), len(z)))
    for i in range(len(z)):
        for j in range(len(z)):
            m[i, j] = 0.5 * z[i] ** 2.4 if i == j else z[i] * z[j] / np.linalg.norm(r[i] - r[j])
    return m


def test_coulomb_eigenvalues_of_h2_match_the_closed_form() -> None:
    charges = torch.tensor([[1, 1, 0, 0]])
    positions = torch.zeros(1, 4, 3, dtype=torch.float64)
    positions[0, 1, 2] = 0.74
    values = coulomb_eigenvalues(charges, positions)
    inverse_distance = 1.0 / (0.74 * BOHR_PER_ANGSTROM)
    expected = torch.tensor([[0.5 + inverse_distance, 0.5 - inverse_distance, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(values, expected, atol=1e-12)


def test_coulomb_eigenvalues_match_a_dense_reference_and_are_invariant() -> None:
    molecules = _molecules(12, seed=1)[1:]
    charges = torch.zeros(len(molecules), 29, dtype=torch.long)
    positions = torch.zeros(len(molecules), 29, 3, dtype=torch.float64)
    for i, m in enumerate(molecules):
        k = len(m["symbols"])  # type: ignore[arg-type]
        charges[i, :k] = torch.tensor([qm9_module.ATOMIC_NUMBER[s] for s in m["symbols"]])  # type: ignore[attr-defined]
        positions[i, :k] = torch.from_numpy(m["xyz"])  # type: ignore[arg-type]
    values = coulomb_eigenvalues(charges, positions)
    for i, m in enumerate(molecules):
        reference = np.linalg.eigvalsh(_dense_coulomb(m["symbols"], m["xyz"]))  # type: ignore[arg-type]
        reference = reference[np.argsort(-np.abs(reference), kind="stable")]
        assert np.allclose(values[i, : len(reference)].numpy(), reference, atol=1e-9)
        assert torch.all(values[i, len(reference) :] == 0)
    # a rotation and a permutation of the atoms leave the descriptor unchanged
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    k = int((charges[0] > 0).sum())
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    moved_c, moved_p = charges[:1].clone(), positions[:1].clone()
    moved_c[0, :k], moved_p[0, :k] = charges[0, :k][perm], (positions[0, :k] @ q.T + 3.0)[perm]
    assert torch.allclose(coulomb_eigenvalues(moved_c, moved_p), values[:1], atol=1e-9)


def test_padding_must_come_last() -> None:
    with pytest.raises(ValueError, match="padding"):
        coulomb_eigenvalues(torch.tensor([[1, 0, 1]]), torch.zeros(1, 3, 3))


def test_fake_qm9pack_files_parse_to_published_units(fake_qm9: tuple[Path, list[dict[str, object]]]) -> None:
    folder, molecules = fake_qm9
    arrays = qm9_module.qm9_arrays(folder)
    assert arrays["x"].shape == (30, 34)
    counts = arrays["x"][:, 29:]
    for i, m in enumerate(molecules):
        symbols, t = m["symbols"], m["targets"]
        assert counts[i].tolist() == [symbols.count(e) for e in ELEMENTS]  # type: ignore[attr-defined]
        assert float(arrays["mu"][i]) == pytest.approx(t[0])  # type: ignore[index]
        assert float(arrays["homo"][i]) == pytest.approx(t[2] * HARTREE_TO_MEV)  # type: ignore[index]
        assert float(arrays["zpve"][i]) == pytest.approx(t[5] * HARTREE_TO_MEV)  # type: ignore[index]
        reference = sum(ATOMREF["u0"][ELEMENTS.index(s)] for s in symbols)  # type: ignore[attr-defined]
        assert float(arrays["u0"][i]) == pytest.approx((t[6] - reference) * HARTREE_TO_MEV)  # type: ignore[index]
        reference_g = sum(ATOMREF["g"][ELEMENTS.index(s)] for s in symbols)  # type: ignore[attr-defined]
        assert float(arrays["g"][i]) == pytest.approx((t[9] - reference_g) * HARTREE_TO_MEV)  # type: ignore[index]
        assert float(arrays["cv"][i]) == pytest.approx(t[10])  # type: ignore[index]
    inverse_distance = 1.0 / (0.74 * BOHR_PER_ANGSTROM)
    assert float(arrays["x"][0, 0]) == pytest.approx(0.5 + inverse_distance)


def test_second_load_reads_the_cache(fake_qm9: tuple[Path, list[dict[str, object]]], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    folder, _ = fake_qm9
    first = load("qm9", subset=None, source=folder, fractions=(0.6, 0.2, 0.2))
    assert len(list((folder.parent / "cache").glob("qm9_*.pt"))) == 1

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CSV files were parsed again")

    monkeypatch.setattr(qm9_module, "read_qm9_tables", fail)
    second = load("qm9", subset=None, source=folder, fractions=(0.6, 0.2, 0.2))
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y["u0"], second.test.y["u0"])
    # a corrupt cache file is rebuilt, not trusted
    cache = next((folder.parent / "cache").glob("qm9_*.pt"))
    cache.write_bytes(b"garbage")
    monkeypatch.undo()
    third = load("qm9", subset=None, source=folder, fractions=(0.6, 0.2, 0.2))
    assert torch.equal(first.val.x, third.val.x)


def test_split_targets_standardised_and_mae_in_original_units(
    fake_qm9: tuple[Path, list[dict[str, object]]],
) -> None:
    folder, _ = fake_qm9
    d = load("qm9", subset=20, source=folder, seed=2)
    assert (len(d.train), len(d.val), len(d.test)) == (16, 2, 2)
    assert [t.name for t in d.tasks] == [
        "mu",
        "alpha",
        "homo",
        "lumo",
        "r2",
        "zpve",
        "u0",
        "u",
        "h",
        "g",
        "cv",
    ]
    assert {t.unit for t in d.tasks} == {"D", "bohr^3", "meV", "bohr^2", "cal/mol/K"}
    arrays = qm9_module.qm9_arrays(folder)
    train_rows = qm9_module.split_indices(30, (16, 2, 2), 2)[0]
    homo = d.tasks[2]
    assert homo.scale == pytest.approx(float(arrays["homo"][train_rows].std(unbiased=False)))
    # predicting the training mean: the metric is the MAE of the original meV values around that mean
    test_rows = qm9_module.split_indices(30, (16, 2, 2), 2)[2]
    total, count = homo.metric_sums(torch.zeros(2), d.test.y["homo"])
    expected = (arrays["homo"][test_rows] - arrays["homo"][train_rows].mean()).abs().mean()
    assert float(total / count) == pytest.approx(float(expected), rel=1e-4)
    few = load("qm9", subset=20, source=folder, tasks=["u0", "mu"])
    assert few.task_names == ["u0", "mu"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tasks": ["u0", "energy"]}, "tasks must be"),
        ({"protocol": "huge"}, "protocol"),
        ({"subset": 10**6}, "subset"),
    ],
)
def test_bad_options(
    fake_qm9: tuple[Path, list[dict[str, object]]], options: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        load("qm9", source=fake_qm9[0], **options)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="qm9_part1.csv"):
        load("qm9", source=tmp_path)


@pytest.mark.slow
def test_real_qm9pack_has_130831_molecules() -> None:
    """The installed wheel; the first run parses it (tens of seconds), later runs read the cache."""
    d = load("qm9", protocol="full")
    assert (len(d.train), len(d.val), len(d.test)) == (110_000, 10_000, 10_831)
    assert d.input_shape == (34,)
    for split in (d.train, d.val, d.test):
        assert torch.isfinite(split.x).all()
    u0 = next(t for t in d.tasks if t.name == "u0")
    # atomisation energies in meV: about -76 eV on average, spread about 10 eV
    assert -80_000 < u0.offset < -70_000 and 5_000 < u0.scale < 15_000
    reduced = load("qm9")
    assert (len(reduced.train), len(reduced.val), len(reduced.test)) == (16_000, 2_000, 2_000)


def test_a_cache_file_that_is_not_a_torch_file_is_rebuilt(
    fake_qm9: tuple[Path, list[dict[str, object]]],
) -> None:
    folder, _ = fake_qm9
    first = qm9_module.qm9_arrays(folder)
    (cache,) = (folder.parent / "cache").glob("qm9_*.pt")
    cache.write_bytes(b"garbage")  # torch.load raises pickle.UnpicklingError on it
    again = qm9_module.qm9_arrays(folder)
    assert torch.equal(first["x"], again["x"])
    assert torch.load(cache, weights_only=True)["x"].shape == first["x"].shape  # rewritten
