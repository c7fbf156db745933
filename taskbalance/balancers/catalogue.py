"""The methods table and the coverage comparison with LibMTL and TorchJD, generated from the registry.

``python -m taskbalance.balancers.catalogue`` rewrites the blocks between ``<!-- methods-table -->`` /
``<!-- comparison-table -->`` markers in ``README.md`` and ``docs/methods.md``; a test checks that the
committed blocks equal what this module generates, so neither table is maintained by hand.

The only hand-written data here is what the two reference libraries call each method (:data:`ANCHOR_NAMES`)
and the methods they have that we do not (:data:`ANCHOR_ONLY`), as of LibMTL's ``LibMTL/weighting`` and
TorchJD 0.18's ``torchjd.aggregation`` / ``torchjd.scalarization``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .registry import available

__all__ = [
    "ANCHOR_NAMES",
    "ANCHOR_ONLY",
    "methods_table",
    "comparison_table",
    "architectures_table",
    "update",
]

ANCHOR_NAMES: dict[str, tuple[str, str]] = {
    # registry name: (LibMTL name, TorchJD name); "" where the library does not have the method
    "ew": ("EW", "Mean / Sum"),
    "uw": ("UW", "UW"),
    "dwa": ("DWA", "DWA"),
    "rlw": ("RLW", "Random"),
    "gls": ("GLS", "GeometricMean"),
    "stch": ("STCH", "STCH"),
    "famo": ("FAMO", "FAMO"),
    "imtl-l": ("IMTL (loss part)", "IMTLL"),
    "pbi": ("", "PBI"),
    "cosmos": ("", "COSMOS"),
    "mgda": ("MGDA", "MGDA"),
    "mgda-ub": ("MGDA (rep_grad)", ""),
    "pcgrad": ("PCGrad", "PCGrad"),
    "gradvac": ("GradVac", "GradVac"),
    "graddrop": ("GradDrop", "GradDrop"),
    "imtl": ("IMTL", ""),
    "imtl-g": ("IMTL (gradient part)", "IMTLG"),
    "cagrad": ("CAGrad", "CAGrad"),
    "nash-mtl": ("Nash_MTL", "NashMTL"),
    "aligned-mtl": ("Aligned_MTL", "AlignedMTL"),
    "upgrad": ("UPGrad", "UPGrad"),
    "dualproj": ("", "DualProj"),
    "db-mtl": ("DB_MTL", ""),
    "gradnorm": ("GradNorm", ""),
    "moco": ("MoCo", ""),
    "fairgrad": ("FairGrad", "FairGrad"),
    "excess-mtl": ("ExcessMTL", "ExcessMTL"),
    "config": ("", "ConFIG"),
    "krum": ("", "Krum"),
    "trimmed-mean": ("", "TrimmedMean"),
    "cr-mogm": ("", "CRMOGMWeighting"),
    "modo": ("MoDo", "MoDoWeighting"),
    "sdmgrad": ("SDMGrad", "SDMGradWeighting"),
}
ANCHOR_ONLY: dict[str, tuple[str, str, str]] = {
    # method: (LibMTL name, TorchJD name, why taskbalance does not have it)
    "RGW": ("RGW", "", "random gradient weighting; not built yet"),
    "PCD": ("", "PCD", "not built yet"),
}
ARCHITECTURES: dict[str, str] = {
    # build_model name: LibMTL architecture name (TorchJD has no architectures)
    "mlp": "HPS",
    "cross-stitch": "Cross_stitch",
    "mmoe": "MMoE",
    "cgc": "CGC",
    "ple": "PLE",
    "dselect-k": "DSelect_k",
}
LIBMTL_ONLY_ARCHITECTURES = {"MTAN": "attention over a conv trunk (image tasks)", "LTB": "learning to branch"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if text else "—"


def methods_table() -> str:
    """Markdown: every registered method with family, feature level, cost class and reference."""
    rows = ["| name | family | feature level | cost | reference |", "|---|---|---|---|---|"]
    for info in available():
        paper = info.paper + (f" *(our extension: {info.extension})*" if info.extension else "")
        rows.append(
            f"| `{info.name}` | {info.family} | {info.feature_level} | {info.cost} | {_cell(paper)} |"
        )
    return "\n".join(rows)


def comparison_table() -> str:
    """Markdown: which of taskbalance's, LibMTL's and TorchJD's methods each library has."""
    rows = ["| method | taskbalance | LibMTL | TorchJD |", "|---|---|---|---|"]
    for info in available():
        libmtl, torchjd = ANCHOR_NAMES.get(info.name, ("", ""))
        rows.append(f"| {info.name} | `{info.name}` | {_cell(libmtl)} | {_cell(torchjd)} |")
    for method, (libmtl, torchjd, why) in ANCHOR_ONLY.items():
        rows.append(f"| {method} | — ({why}) | {_cell(libmtl)} | {_cell(torchjd)} |")
    ours = {i.name for i in available()}
    libmtl_total = sum(bool(a[0]) for n, a in ANCHOR_NAMES.items() if n in ours) + sum(
        bool(a[0]) for a in ANCHOR_ONLY.values()
    )
    torchjd_total = sum(bool(a[1]) for n, a in ANCHOR_NAMES.items() if n in ours) + sum(
        bool(a[1]) for a in ANCHOR_ONLY.values()
    )
    rows.append(f"| **total** | **{len(ours)}** | **{libmtl_total}** | **{torchjd_total}** |")
    return "\n".join(rows)


def architectures_table() -> str:
    """Markdown: the architectures of ``build_model`` beside LibMTL's."""
    from ..models.build import ARCHITECTURES as OURS

    rows = ["| architecture | taskbalance (`arch=`) | LibMTL |", "|---|---|---|"]
    for name in OURS:
        if name != "auto":
            rows.append(f"| {name} | `{name}` | {_cell(ARCHITECTURES.get(name, ''))} |")
    for name, what in LIBMTL_ONLY_ARCHITECTURES.items():
        rows.append(f"| {name} | — ({what}; not built) | {name} |")
    return "\n".join(rows)


_BLOCKS = {
    "methods-table": methods_table,
    "comparison-table": comparison_table,
    "architectures-table": architectures_table,
}


def render(text: str) -> str:
    """``text`` with every ``<!-- NAME -->…<!-- /NAME -->`` block replaced by its generated table."""
    for name, build in _BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
        text = pattern.sub(lambda m, b=build: m.group(1) + b() + "\n" + m.group(2), text)  # type: ignore[misc]
    return text


def update(paths: list[Path]) -> list[Path]:
    """Rewrite the generated blocks in ``paths``; returns the files that changed."""
    changed = []
    for path in paths:
        old = path.read_text(encoding="utf-8")
        new = render(old)
        if new != old:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":  # pragma: no cover - a maintainer's tool, tested through render()
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    for path in update([root / "README.md", root / "docs" / "methods.md"]):
        print(f"updated {path}")
