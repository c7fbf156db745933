"""``taskbalance report``: the Markdown/HTML report and plots of a stored study."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated

import typer

from .common import fail, make_console


def report_command(
    directory: Annotated[Path, typer.Argument(help="study directory given to `bench --out`")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="write the report here instead of into DIR (e.g. read-only)"),
    ] = None,
) -> None:
    """Write DIR/report.md, a self-contained DIR/report.html and DIR/plots/*.png from a study's results.

    One section per (dataset, protocol) in DIR/results.sqlite: metrics, Δm with 95% CIs, transfer verdicts,
    heatmap, weight trajectories, curves and cost per step. The store is only read; with ``--output`` a
    read-only study is reported into another folder.
    """
    target = directory if output is None else output
    try:
        from ..report import write_report

        files = write_report(directory, output=output)
    except ImportError as error:
        fail(f'the report needs the "report" extra: pip install "taskbalance[report]" ({error})')
    except FileNotFoundError as error:
        fail(str(error))
    except sqlite3.Error as error:
        fail(f"cannot read the results store in {directory}: {error}")
    except OSError as error:  # e.g. a read-only study folder: the report is written next to the results
        hint = "" if output is not None else "; pass --output DIR to write it elsewhere"
        fail(f"cannot write the report into {target}: {error.strerror or error}{hint}")
    console = make_console()
    console.print(f"wrote {files.markdown}", highlight=False)
    console.print(f"wrote {files.html} (self-contained)", highlight=False)
    console.print(f"wrote {len(files.plots)} plot(s) in {target / 'plots'}", highlight=False)
    for text in files.conclusions:  # last: what to act on (one per study in the store)
        console.print(text, highlight=False, markup=False, soft_wrap=True)
