"""benchmarks/step_overhead.py: a real (tiny) run gives the rows the README's speed table is made from, and
``--readme`` rewrites only that table. No timing is asserted (speed goals live in the script's output)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_run_of_the_compute_free_config_times_ours_against_torchjd(script):
    rows = script.run("z", ["mgda"], rounds=1, steps=1, with_torchjd=True, memory=False)
    by_variant = {r["variant"]: r for r in rows}
    assert {"plain sum", "mgda", "mgda (jacobian)", "mgda (features)", "torchjd mgda"} <= set(by_variant)
    ours = by_variant["mgda"]
    assert ours["ms_per_step"] > 0 and ours["ratio"] > 0 and ours["vs_autojac"] > 0
    assert by_variant["plain sum"]["ratio"] == 1.0
    assert math.isnan(ours["peak_mb"])  # memory=False
    assert ours["steps"] == 1


def test_short_rounds_get_more_steps(script):
    """A round of plain steps shorter than ``min_round_ms`` gets more steps (the compute-free config's 10
    steps last ~6 ms: too short to time on a shared machine)."""
    rows = script.run("z", [], rounds=1, steps=1, with_torchjd=False, memory=False, min_round_ms=20.0)
    assert rows[0]["steps"] > 1


def test_the_exact_floor_variant_runs_and_is_timed_against_torchjds_step(script):
    """``--floor``: k ordinary backward passes per step, against TorchJD's step of the same round."""
    rows = script.run("z", ["mgda"], rounds=1, steps=1, with_torchjd=True, memory=False, floor=True)
    floor_row = next(r for r in rows if r["kind"] == "floor")
    assert floor_row["vs_autojac"] > 0  # against TorchJD's MGDA step of the same round


def _row(config, variant, kind, method, ms, ratio, autojac=None, autogram=None, peak=float("nan")):
    return {"config": config, "variant": variant, "kind": kind, "method": method, "ms_per_step": ms,
            "ratio": ratio, "vs_autojac": autojac, "vs_autogram": autogram, "peak_mb": peak}


def test_the_readme_table_lists_our_rows_of_methods_torchjd_has_with_their_ratios(script):
    rows = [
        _row("a", "plain sum", "plain", "-", 2.0, 1.0, peak=0.9),
        _row("a", "ew", "ours", "ew", 2.1, 1.05, peak=0.9),
        _row("a", "mgda", "ours", "mgda", 6.0, 3.0, 0.84, 0.6, 2.2),
        _row("a", "torchjd mgda", "torchjd", "mgda", 7.0, 3.5, peak=3.5),
    ]
    table = script.markdown_table(rows, clock="cpu", rounds=5, steps=20)
    assert "| (a) | mgda | 6.00 | 3.00× | 0.84 | 0.60 | 2.2 (TorchJD 3.5) |" in table
    assert "| (a) | ew |" not in table and "torchjd mgda" not in table  # only ours, only compared methods
    assert "`--rounds 5`" in table and "steps per round: (a) 20" in table


def test_readme_rewrites_only_the_block_between_its_markers(script, tmp_path):
    readme = "# Title\n\n" + script.README_BEGIN + "\nold table\n" + script.README_END + "\n\nAfter.\n"
    out = script.replace_readme_block(readme, "| new |\n")
    assert out == "# Title\n\n" + script.README_BEGIN + "\n| new |\n" + script.README_END + "\n\nAfter.\n"
    with pytest.raises(ValueError, match="speed-table"):
        script.replace_readme_block("# no markers\n", "| new |\n")


def test_the_readme_has_the_block_the_script_rewrites(script):
    text = (SCRIPT.parents[1] / "README.md").read_text(encoding="utf-8")
    assert text.count(script.README_BEGIN) == 1 and text.count(script.README_END) == 1
    assert text.index(script.README_BEGIN) < text.index(script.README_END)
