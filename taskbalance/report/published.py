"""Published Δm beside ours, with the rank correlation between them, for studies under a published protocol.

The published tables ship as package data (``taskbalance/data/published/*.json``), each value with its source
("as reported by …") and whether it was checked against a second public source. A study is *under* a
published protocol when its dataset and architecture are the protocol's (``qm9_graph`` + ``mpnn``: the
``qm9-paper`` suite); when it departs from it otherwise (fewer epochs, a ``--subset``), the report says so
next to the numbers.

Methods are matched by display label (a suite's entries are labelled with their registry name; a labelled
variant such as ``mgda-ub`` is a different method and is not matched). Spearman's ρ is computed over the
methods both tables have, with average ranks for ties (the usual definition; equal to
``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data import Section
    from .render import Block

__all__ = [
    "PublishedValue",
    "PublishedTable",
    "Comparison",
    "PUBLISHED_TABLES",
    "load_published",
    "published_table_for",
    "protocol_deviations",
    "spearman_rho",
    "compare",
    "published_blocks",
    "published_line",
]

PUBLISHED_TABLES = ("qm9",)
"""Names of the shipped tables (``taskbalance/data/published/<name>.json``)."""


@dataclass(frozen=True)
class PublishedValue:
    """One method's published Δm%."""

    method: str  # our label / registry name
    paper_label: str  # the paper's name for it (e.g. "LS" for our "ew")
    delta_m: float
    citation: str  # "Navon et al., …, Table 2 (QM9)"
    confirmed: bool  # checked against a second, independent public source
    confirmation: str = ""


@dataclass(frozen=True)
class PublishedTable:
    """A published Δm table and the protocol it was measured under."""

    name: str
    title: str
    protocol: dict[str, Any]
    metric: str
    values: tuple[PublishedValue, ...]
    provenance: str

    def value(self, method: str) -> PublishedValue | None:
        return next((v for v in self.values if v.method == method), None)


@dataclass(frozen=True)
class Comparison:
    """Ours against published over the methods both have."""

    table: PublishedTable
    rows: tuple[tuple[PublishedValue, float | None], ...]  # every published value, ours or None
    rho: float  # Spearman ρ over the methods both have (nan with fewer than 3)
    matched: int


@cache
def load_published(name: str) -> PublishedTable:
    """The shipped table ``name`` (one of :data:`PUBLISHED_TABLES`); ``KeyError`` for an unknown name."""
    if name not in PUBLISHED_TABLES:
        raise KeyError(f"no published table {name!r}; shipped: {', '.join(PUBLISHED_TABLES)}")
    text = resources.files("taskbalance.data").joinpath("published", f"{name}.json").read_text("utf-8")
    raw = json.loads(text)
    sources: dict[str, str] = raw["sources"]
    values = tuple(
        PublishedValue(
            method=e["method"],
            paper_label=e["paper_label"],
            delta_m=float(e["delta_m"]),
            citation=sources[e["source"]],
            confirmed=bool(e["confirmed"]),
            confirmation=e.get("confirmation", ""),
        )
        for e in raw["entries"]
    )
    return PublishedTable(
        raw["name"], raw["title"], dict(raw["protocol"]), raw["metric"], values, raw["provenance"]
    )


def published_table_for(protocol: Mapping[str, Any] | None) -> PublishedTable | None:
    """The published table whose protocol a study's protocol (``RunSpec.protocol``) follows, or ``None``."""
    if not protocol:
        return None
    for name in PUBLISHED_TABLES:
        table = load_published(name)
        wanted = (table.protocol["dataset"], table.protocol["arch"])
        if (protocol.get("dataset"), protocol.get("arch")) == wanted:
            return table
    return None


def protocol_deviations(
    table: PublishedTable, protocol: Mapping[str, Any], seeds: int | None = None
) -> list[str]:
    """How a study departs from the published protocol (empty when it follows it)."""
    out: list[str] = []
    epochs = (protocol.get("train") or {}).get("epochs")
    if epochs is not None and epochs != table.protocol["epochs"]:
        out.append(f"{epochs} epoch(s) instead of {table.protocol['epochs']}")
    subset = (protocol.get("dataset_options") or {}).get("subset")
    if subset is not None:
        out.append(f"a {subset}-molecule subset instead of the full dataset")
    if seeds is not None and seeds != table.protocol["seeds"]:
        out.append(f"{seeds} seed(s) instead of {table.protocol['seeds']}")
    return out


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); nan when undefined.

    Undefined: fewer than 2 pairs, a non-finite value, or a constant sequence.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman_rho needs sequences of equal length, got {len(x)} and {len(y)}")
    if len(x) < 2 or not all(math.isfinite(v) for v in (*x, *y)):
        return math.nan
    rx, ry = _average_ranks(list(x)), _average_ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def compare(table: PublishedTable, ours: Mapping[str, float]) -> Comparison:
    """Ours (label → Δm%) against ``table``; ρ needs at least 3 methods in both (nan otherwise)."""
    rows = tuple(
        (value, ours[value.method] if math.isfinite(ours.get(value.method, math.nan)) else None)
        for value in table.values
    )
    pairs = [(mine, value.delta_m) for value, mine in rows if mine is not None]
    rho = spearman_rho([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= 3 else math.nan
    return Comparison(table, rows, rho, len(pairs))


def _rho_text(comparison: Comparison) -> str:
    if not math.isfinite(comparison.rho):
        return (
            f"Spearman ρ between our and the published Δm: not computed ({comparison.matched} method(s) in "
            "both; it needs at least 3 with distinct values)."
        )
    return (
        f"Spearman ρ between our and the published Δm over the {comparison.matched} methods in both: "
        f"{comparison.rho:+.2f} (1 = the same ranking)."
    )


def published_blocks(section: Section) -> list[Block]:
    """The report's "Published numbers" sub-section of ``section``; empty without a published protocol."""
    table = published_table_for(section.protocol)
    if table is None:
        return []
    from .render import Cell, Heading, Note, Table

    ours = {view.label: view.delta_m for view in section.methods}
    comparison = compare(table, ours)
    seeds = max((view.summary.seeds for view in section.methods), default=None)
    blocks: list[Block] = [Heading(3, "Published numbers beside ours")]
    deviations = protocol_deviations(table, section.protocol, seeds)
    if deviations:
        blocks.append(
            Note(
                "This study departs from the published protocol (" + "; ".join(deviations) + "): the "
                "comparison is indicative only.",
                "warning",
            )
        )
    rows = [
        [
            Cell(value.method),
            Cell(value.paper_label),
            Cell("–" if mine is None else f"{mine:.1f}"),
            Cell(f"{value.delta_m:.1f}"),
            Cell(f"as reported by {value.citation}"),
            Cell("yes: " + value.confirmation if value.confirmed else "no (transcribed from the paper)"),
        ]
        for value, mine in comparison.rows
    ]
    blocks.append(
        Table(
            ["method", "paper's name", "our Δm%", "published Δm%", "source", "confirmed by a second source"],
            rows,
        )
    )
    blocks.append(Note(f"{table.metric}. {table.provenance} {_rho_text(comparison)}"))
    return blocks


def published_line(protocol: Mapping[str, Any] | None, ours: Mapping[str, float]) -> str | None:
    """One line for the terminal: ρ against the published table, or ``None`` without a published protocol."""
    table = published_table_for(protocol)
    if table is None:
        return None
    comparison = compare(table, ours)
    deviations = protocol_deviations(table, protocol or {})
    suffix = f" (indicative: {'; '.join(deviations)})" if deviations else ""
    return f"Published protocol ({table.title}): {_rho_text(comparison)}{suffix} See the report's table."
