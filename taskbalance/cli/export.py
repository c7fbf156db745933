"""``taskbalance export``: a study's runs table as CSV or Parquet."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated

import typer

from .common import fail, make_console


def export_command(
    directory: Annotated[Path, typer.Argument(help="study directory given to `bench --out`")],
    fmt: Annotated[str, typer.Option("--format", help="csv or parquet")] = "csv",
    output: Annotated[Path | None, typer.Option(help="output file (default DIR/results.<format>)")] = None,
) -> None:
    """Export a study's runs table (one row per run, metrics as columns)."""
    from ..bench.export import export_runs

    try:
        path = export_runs(directory, fmt, output)
    except (FileNotFoundError, ValueError, ImportError) as error:
        fail(str(error))
    except sqlite3.Error as error:
        fail(f"cannot read the results store in {directory}: {error}")
    except OSError as error:
        fail(f"cannot write {output or 'the export'}: {error.strerror or error} (choose --output FILE)")
    make_console().print(f"wrote {path}")
