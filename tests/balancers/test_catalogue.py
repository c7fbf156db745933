"""The README/docs methods and coverage tables are generated from the registry and are current."""

from __future__ import annotations

from pathlib import Path

import torchjd.aggregation
import torchjd.scalarization

import taskbalance
from taskbalance.balancers import catalogue

ROOT = Path(__file__).resolve().parents[2]


def test_readme_and_docs_tables_are_what_the_registry_generates():
    for page in (ROOT / "README.md", ROOT / "docs" / "methods.md"):
        text = page.read_text(encoding="utf-8")
        assert "<!-- methods-table -->" in text or page.name == "README.md"
        assert catalogue.render(text) == text, (
            f"{page.name} is stale: run python -m taskbalance.balancers.catalogue"
        )
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for marker in ("methods-table", "comparison-table", "architectures-table"):
        assert f"<!-- {marker} -->" in readme


def test_every_registered_method_is_listed_with_its_reference_and_cost():
    table = catalogue.methods_table()
    for info in taskbalance.available():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{info.name}` |"))
        assert info.cost in row and info.family in row
        assert f"| {info.name} | `{info.name}` |" in catalogue.comparison_table()


def test_anchor_names_refer_to_registered_methods_and_to_real_torchjd_classes():
    registered = {m.name for m in taskbalance.available()}
    assert set(catalogue.ANCHOR_NAMES) <= registered
    assert not set(catalogue.ANCHOR_ONLY) & registered
    for _, torchjd_name in [
        *catalogue.ANCHOR_NAMES.values(),
        *((t, j) for t, j, _ in catalogue.ANCHOR_ONLY.values()),
    ]:
        for name in filter(None, (part.strip() for part in torchjd_name.split("/"))):
            assert hasattr(torchjd.aggregation, name) or hasattr(torchjd.scalarization, name), name


def test_the_methods_of_issue_16_are_registered():
    wanted = {
        "si",
        "imtl-l",
        "pbi",
        "cosmos",
        "krum",
        "trimmed-mean",
        "config",
        "fairgrad",
        "excess-mtl",
        "moco",
        "cr-mogm",
        "modo",
        "sdmgrad",
    }
    assert wanted <= {m.name for m in taskbalance.available()}
