"""The documentation runs: every example script, every fenced Python block, every link into the repository.

How the code is run (the rules a doc writer needs):

* ``examples/*.py`` — each runs as a script (``python examples/x.py``) in a fresh interpreter with
  ``TASKBALANCE_EXAMPLE_TINY=1``, which every long example reads to shrink itself (fewer seeds, steps, epochs)
  so that the whole file runs in seconds. It must exit 0.
* ``README.md`` and ``docs/*.md`` — the ```` ```python ```` blocks of **one page run in order in one fresh
  interpreter and share one namespace**, like a notebook: a block may use what an earlier block of the same
  page defined; pages never share. Each block is compiled with its page's name and line numbers, so a
  traceback points into the Markdown.
* Everything runs in an empty temporary working directory, offline, on the CPU. torchrun's variables for a
  one-process group are set (``RANK=0``, ``WORLD_SIZE=1``, ``MASTER_ADDR``, ``MASTER_PORT``), so a DDP
  snippet runs as under ``torchrun --nproc-per-node 1``.
* A block that cannot run here (a cluster address, several GPUs) is preceded by
  ``<!-- skip-run: reason -->`` on the line just above its fence; the reason is required. Keep these rare.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"^<!--\s*skip-run:(?P<reason>.*?)-->\s*$")
TIMEOUT_S = 600

# Runs a page's blocks in one namespace; argv[1] is a JSON list of [page, first line, source].
_RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for page, line, source in json.load(open(sys.argv[1])):
    exec(compile("\\n" * (line - 1) + source, page, "exec"), namespace)
"""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line
    language: str
    source: str
    skip_reason: str | None  # None: runs; "": marker without a reason (an error)


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of a Markdown page, with the skip marker just above it, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        start = i
        end = start + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        marker = SKIP_MARKER.match(lines[start - 1].strip()) if start > 0 else None
        reason = marker.group("reason").strip() if marker else None
        source = "\n".join(lines[start + 1:end]) + "\n"
        blocks.append(Block(page, start + 2, opening.group(1), source, reason))
        i = end + 1
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [b for b in fenced_blocks(page) if b.language == "python"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TASKBALANCE_EXAMPLE_TINY="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT),
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
    )
    return env


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=_name)
def test_example_runs_in_its_tiny_configuration(example: Path, tmp_path: Path) -> None:
    _run([sys.executable, str(example)], tmp_path)


PAGES_WITH_CODE = [p for p in PAGES if any(b.skip_reason is None for b in python_blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_name)
def test_python_blocks_of_a_page_run_in_order(page: Path, tmp_path: Path) -> None:
    runnable = [[_name(b.page), b.line, b.source] for b in python_blocks(page) if b.skip_reason is None]
    script = tmp_path / "blocks.json"
    script.write_text(json.dumps(runnable), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    _run([sys.executable, "-c", _RUNNER, str(script)], work)


def test_every_skipped_block_gives_its_reason() -> None:
    unexplained = [
        f"{_name(b.page)}:{b.line}" for p in PAGES for b in fenced_blocks(p) if b.skip_reason == ""
    ]
    assert not unexplained, f"<!-- skip-run: --> needs a reason: {unexplained}"


def test_the_readme_and_the_scaling_guide_have_code_that_runs() -> None:
    """The pages users copy from are run, not skipped (guards against a page silently losing its tests)."""
    for page in (ROOT / "README.md", ROOT / "docs" / "scaling.md", ROOT / "docs" / "auxiliary.md"):
        assert page in PAGES_WITH_CODE, page


def test_fenced_block_parser_reads_markers_lines_and_languages(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n<!-- skip-run: needs 8 GPUs -->\n```python\ny = 2\n```\n"
                    "```bash\nls\n```\n<!-- skip-run: -->\n```python\nz\n```\n")
    blocks = fenced_blocks(page)
    assert [(b.language, b.line, b.source, b.skip_reason) for b in blocks] == [
        ("python", 3, "x = 1\n", None), ("python", 7, "y = 2\n", "needs 8 GPUs"), ("bash", 10, "ls\n", None),
        ("python", 14, "z\n", ""),
    ]


# Files outside the repository that the docs once cited; users do not have them.
EXTERNAL_NOTES = ("METHODS.md", "QM9-NOTES")


def test_nothing_cites_notes_outside_the_repository() -> None:
    offenders = []
    for base in ("taskbalance", "tests", "docs", "examples", "benchmarks"):
        for path in (ROOT / base).rglob("*"):
            if path.suffix in {".py", ".md", ".toml"} and path != Path(__file__).resolve():
                text = path.read_text(encoding="utf-8")
                offenders += [f"{_name(path)}: {n}" for n in EXTERNAL_NOTES if n in text]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    offenders += [f"README.md: {n}" for n in EXTERNAL_NOTES if n in readme]
    assert not offenders, offenders


def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    in_code = False
    anchors = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_github_anchor(line.lstrip("#")))
    return anchors


def test_relative_links_in_the_docs_point_at_files_and_headings_that_exist() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # an absolute URL
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / path_part).resolve() if path_part else page
            if not linked.exists():
                broken.append(f"{_name(page)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{_name(page)}: {target} (no such heading)")
    assert not broken, broken


def test_code_cites_method_notes_sections_that_exist() -> None:
    """``docs/method-notes.md §N.M`` in the code names a section heading of that page."""
    notes = (ROOT / "docs" / "method-notes.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", notes, flags=re.M))
    cited = set()
    for base in ("taskbalance", "tests", "docs", "examples"):
        for path in (ROOT / base).rglob("*"):
            if path.suffix in {".py", ".md"}:
                text = path.read_text(encoding="utf-8")
                cited |= set(re.findall(r"method-notes\.md`{0,2} §(\d+(?:\.\d+)?)", text))
                cited |= set(re.findall(r"method notes §(\d+(?:\.\d+)?)", text))
    assert cited, "no citation of docs/method-notes.md found: has the page been renamed?"
    assert cited <= sections, sorted(cited - sections)
