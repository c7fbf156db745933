"""``taskbalance methods``: the registered balancing methods."""

from __future__ import annotations

from rich.table import Table

from .common import make_console


def methods_command() -> None:
    """List the registered balancing methods."""
    from ..balancers.registry import available

    table = Table(title="Balancing methods (taskbalance.make(name, tasks, **hyperparameters))")
    for column in ("name", "family", "feature-level gradients", "cost per step", "description"):
        table.add_column(column)
    for info in available():
        description = info.description + (f" [our extension: {info.extension}]" if info.extension else "")
        table.add_row(info.name, info.family, info.feature_level, info.cost, description)
    make_console().print(table)
