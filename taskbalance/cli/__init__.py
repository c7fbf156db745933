"""The ``taskbalance`` command line: ``methods``, ``train``, ``bench``, ``report``, ``export``, ``diagnose``.

Needs the ``cli`` extra (``pip install "taskbalance[cli]"``: typer and rich). One file per command; this
module builds the typer app and registers each command explicitly. Bad input (unknown method, dataset or
suite, malformed ``--target``/``--hp``) exits with status 2 and a message saying what is accepted; a study
with failed runs exits with status 1 after printing its table.
"""

from __future__ import annotations

try:
    import rich  # noqa: F401
    import typer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        f'the taskbalance command line needs the "cli" extra: pip install "taskbalance[cli]" ({error})'
    ) from error

from .bench import bench_command
from .diagnose import diagnose_command
from .export import export_command
from .methods import methods_command
from .report import report_command
from .train import train_command

__all__ = ["app", "main"]

app = typer.Typer(
    help="Multi-task training without negative transfer: balancers, training, benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("methods")(methods_command)
app.command("train")(train_command)
app.command("bench")(bench_command)
app.command("report")(report_command)
app.command("export")(export_command)
app.command("diagnose")(diagnose_command)


def main() -> None:
    """Console-script entry point."""
    app()
