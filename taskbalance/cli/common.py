"""What every command shares: the consoles, the one way to fail (exit 2, one line), and input parsing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console

KINDS = ("regression", "binary", "multiclass")


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=240)
    return console


def fail(message: str) -> NoReturn:
    make_console(stderr=True).print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


# ---------------------------------------------------------------------------------------------- parsing
def parse_hyperparameters(items: list[str]) -> dict[str, Any]:
    """``["beta=0.5", "reference=\"mean\""]`` → dict; values are JSON (numbers, true/false, strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            fail(f"--hp {item!r} must be key=value, e.g. --hp beta=0.9")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare word is a string
        out[key.strip()] = value
    return out


def check_targets(targets: list[str]) -> list[str]:
    if not targets:
        fail("--csv needs at least one --target column:kind, e.g. --target price:regression")
    for spec in targets:
        column, sep, kind = spec.rpartition(":")
        if not sep or not column:
            fail(f"--target {spec!r} must be column:kind with kind one of {', '.join(KINDS)}")
        if kind not in KINDS:
            fail(f"--target {spec!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return targets


def split_features(items: list[str] | None) -> list[str] | None:
    if not items:
        return None
    return [f.strip() for item in items for f in item.split(",") if f.strip()]


def dataset_source(
    dataset: str | None, csv: Path | None, targets: list[str], features: list[str] | None
) -> tuple[str, dict[str, Any], str]:
    """``(dataset name, loader options, data fingerprint)`` from ``--dataset`` or ``--csv``."""
    if csv is not None:
        if dataset is not None:
            fail("give either --dataset or --csv, not both")
        if not csv.is_file():
            fail(f"--csv {csv}: no such file")
        options: dict[str, Any] = {"path": str(csv.resolve()), "targets": check_targets(targets)}
        if features:
            options["features"] = features
        return "table", options, hashlib.sha256(csv.read_bytes()).hexdigest()
    if targets or features:
        fail("--target and --features describe a --csv table; give --csv PATH too")
    if dataset is None:
        fail("give a dataset: --dataset NAME (see the list below) or --csv PATH --target column:kind")
    from ..data import available_datasets

    known = available_datasets()
    if dataset not in known:
        fail(f"unknown dataset {dataset!r}; available: {', '.join(known)}")
    return dataset, {}, ""


def load_data(name: str, options: dict[str, Any]) -> Any:
    from ..bench.runner import load_dataset

    try:
        return load_dataset(name, options)
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError) as error:
        fail(f"could not load dataset {name!r}: {error}")


def check_methods(text: str) -> Any:
    from ..bench.kinds import kind_of, listable_methods
    from ..bench.suites import parse_methods

    try:
        entries = parse_methods(text)
    except ValueError as error:
        fail(str(error))
    accepted = listable_methods()
    for entry in entries:
        if entry.method not in accepted or not kind_of(entry.method).listable:
            fail(
                f"unknown balancing method {entry.method!r}; accepted: {', '.join(repr(m) for m in accepted)}"
            )
    return entries
