"""Development habits that packaging checks: one version source, a typed package, a changelog, lint in CI."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import taskbalance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_version_is_written_in_one_place_and_pyproject_reads_it() -> None:
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = _pyproject()["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "taskbalance._version.__version__"}
    from setuptools.config.pyprojecttoml import read_configuration

    resolved = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]["version"]
    assert resolved == taskbalance.__version__
    assigned = [str(p.relative_to(ROOT)) for p in (ROOT / "taskbalance").rglob("*.py")
                if re.search(r"^__version__\s*=", p.read_text(encoding="utf-8"), flags=re.M)]
    assert assigned == ["taskbalance/_version.py"]


def test_the_package_is_marked_typed_and_ships_the_marker() -> None:
    assert (ROOT / "taskbalance" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["taskbalance"]


def test_the_changelog_follows_keep_a_changelog_with_an_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "keepachangelog.com" in text
    sections = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert sections[0] == "Unreleased"
    assert f"## [{taskbalance.__version__}]" in text or sections == ["Unreleased"]


def test_ci_runs_the_linters_and_the_tests() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make lint\b", ci, flags=re.M) and re.search(r"^make test\b", ci, flags=re.M)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check taskbalance tests benchmarks examples" in lint and "mypy taskbalance" in lint
