"""Study files: a whole study in one TOML file (``taskbalance bench --study study.toml``).

::

    name = "sales"                      # the study's name (default output folder runs/<name>)
    description = "price with two auxiliaries"
    seeds = 3                           # seeds 0, 1, 2
    baselines = true                    # single-task baselines (needed for delta-m and verdicts)
    methods = "ew, hot=bmtl(temperature=5), bmtl(temperature=[1,5,25]), forkmerge"   # the --methods language

    [dataset]
    name = "table"                      # any registered dataset (taskbalance.data.available_datasets())
    options = { path = "sales.csv", targets = ["price:regression", "sold:binary", "views:regression"] }

    [model]
    arch = "mlp"                        # build_model's architectures
    options = { hidden = [64, 64], act = "relu" }

    [training]                          # TrainConfig: epochs, batch_size, lr, weight_decay, optimizer,
    epochs = 20                         # scheduler, balancer_lr, eval_batch_size, selection, ...
    batch_size = 128
    lr = 1e-3
    scheduler = "cosine"

    [tasks]                             # per task: role (target | auxiliary) and primary metric
    price = { role = "target", metric = "mae" }
    sold = { role = "auxiliary" }

    [executor]
    kind = "local"                      # local | serial | ray
    workers = 2
    device = "cpu"                      # torch device the runs train on: cpu | cuda | cuda:N

``methods`` is a ``--methods`` string, or a list of such strings and tables, or ``[[methods]]`` tables::

    [[methods]]
    name = "bmtl"
    label = "b"                                   # default: the variant's text, e.g. bmtl(temperature=1)
    hyperparameters = { }                         # fixed values (a list here is a list, not a grid)
    grid = { temperature = [1, 5, 25] }           # one variant per combination: b(temperature=1), ...

Parsed with :mod:`tomllib` (``tomli`` on Python 3.10). Unknown keys are errors naming the accepted ones; the
methods, hyperparameters, dataset and task roles are validated by the bench driver before any run starts.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig
from .method_text import expand_grid, variant_label
from .suites import MethodEntry, Suite, check_labels, parse_methods

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["load_study", "study_from_text", "study_from_mapping", "study_to_toml", "StudyFileError"]

_TOP = ("name", "description", "seeds", "baselines", "methods", "dataset", "model", "training", "tasks",
        "executor")
_ROLES = ("target", "auxiliary")


class StudyFileError(ValueError):
    """A study file that cannot be read; the message names the file and the key."""


def _check_keys(table: Mapping[str, Any], accepted: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(table) - set(accepted))
    if unknown:
        raise StudyFileError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")


def _table(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyFileError(f"{where} must be a table, got {type(value).__name__}")
    return dict(value)


def load_study(path: str | Path) -> Suite:
    """Read a study file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise StudyFileError(f"cannot read study file {file}: {error.strerror or error}") from error
    return study_from_text(text, str(file), default_name=file.stem)


def study_from_text(text: str, source: str = "study file", *, default_name: str = "study") -> Suite:
    """Parse TOML ``text`` (``source`` names it in errors)."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise StudyFileError(f"{source}: not valid TOML: {error}") from error
    return study_from_mapping(values, source, default_name=default_name)


def _methods(value: Any, source: str) -> tuple[MethodEntry, ...]:
    items = value if isinstance(value, list) else [value]
    entries: list[MethodEntry] = []
    for i, item in enumerate(items):
        where = f"{source}: methods[{i}]"
        if isinstance(item, str):
            try:
                entries += parse_methods(item)
            except ValueError as error:
                raise StudyFileError(f"{source}: methods: {error}") from error
            continue
        table = _table(item, where)
        _check_keys(table, ("name", "label", "hyperparameters", "grid"), where)
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise StudyFileError(f"{where} needs a method name (name = \"ew\")")
        fixed = _table(table.get("hyperparameters"), f"{where}.hyperparameters")
        grid = _table(table.get("grid"), f"{where}.grid")
        bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
        if bad:
            raise StudyFileError(f"{where}.grid: {', '.join(bad)} must be non-empty lists of values")
        both = sorted(set(fixed) & set(grid))
        if both:
            raise StudyFileError(f"{where}: {', '.join(both)} given in both hyperparameters and grid")
        label = table.get("label")
        for point_values, point in expand_grid(grid):
            hyperparameters = {**fixed, **point_values}
            shown = variant_label(label, point) if label else variant_label(name.lower(), hyperparameters)
            entries.append(MethodEntry(shown, name.lower(), hyperparameters))
    try:
        return check_labels(entries)
    except ValueError as error:
        raise StudyFileError(f"{source}: {error}") from error


def study_from_mapping(
    values: Mapping[str, Any], source: str = "study", *, default_name: str = "study"
) -> Suite:
    """A :class:`Suite` from parsed TOML (see the module docstring for the keys)."""
    _check_keys(values, _TOP, source)
    dataset = _table(values.get("dataset"), f"{source}: [dataset]")
    _check_keys(dataset, ("name", "options"), f"{source}: [dataset]")
    if not isinstance(dataset.get("name"), str):
        raise StudyFileError(f"{source}: [dataset] needs name = \"<a registered dataset>\"")
    model = _table(values.get("model"), f"{source}: [model]")
    _check_keys(model, ("arch", "options"), f"{source}: [model]")
    training = _table(values.get("training"), f"{source}: [training]")
    try:
        train = TrainConfig.from_dict({**TrainConfig().to_dict(), **training})
    except (TypeError, ValueError) as error:
        raise StudyFileError(f"{source}: [training]: {error}") from error
    tasks: dict[str, dict[str, str]] = {}
    for task, options in _table(values.get("tasks"), f"{source}: [tasks]").items():
        where = f"{source}: [tasks] {task}"
        table = _table(options, where)
        _check_keys(table, ("role", "metric"), where)
        if "role" in table and table["role"] not in _ROLES:
            raise StudyFileError(f"{where}: role must be one of {', '.join(_ROLES)}, got {table['role']!r}")
        tasks[task] = {k: str(v) for k, v in table.items()}
    executor = _table(values.get("executor"), f"{source}: [executor]")
    _check_keys(executor, ("kind", "workers", "device"), f"{source}: [executor]")
    seeds = values.get("seeds", 2)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise StudyFileError(f"{source}: seeds must be a positive integer (seeds 0..N-1), got {seeds!r}")
    workers = executor.get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise StudyFileError(f"{source}: [executor] workers must be a positive integer, got {workers!r}")
    if "methods" not in values:
        raise StudyFileError(f"{source}: no methods; e.g. methods = \"ew,ema,pcgrad\"")
    return Suite(
        name=str(values.get("name", default_name)),
        description=str(values.get("description", "")),
        dataset=dataset["name"],
        dataset_options=_table(dataset.get("options"), f"{source}: [dataset] options"),
        arch=str(model.get("arch", "auto")),
        model_options=_table(model.get("options"), f"{source}: [model] options"),
        train=train,
        methods=_methods(values["methods"], source),
        seeds=seeds,
        baselines=bool(values.get("baselines", True)),
        task_options=tasks,
        executor=str(executor.get("kind", "local")),
        workers=workers,
        device=str(executor.get("device", "cpu")),
    )


# ---------------------------------------------------------------------------------------------- writing
def _key(name: str) -> str:
    return name if name and all(c.isalnum() or c in "_-" for c in name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise ValueError("TOML has no null; leave the key out")
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def study_to_toml(suite: Suite) -> str:
    """The study as a TOML study file (read back by :func:`study_from_text` to an equal study)."""
    lines = [
        f"name = {_value(suite.name)}",
        f"description = {_value(suite.description)}",
        f"seeds = {suite.seeds}",
        f"baselines = {_value(suite.baselines)}",
        "",
        "[dataset]",
        f"name = {_value(suite.dataset)}",
    ]
    if suite.dataset_options:
        lines.append(f"options = {_value(suite.dataset_options)}")
    lines += ["", "[model]", f"arch = {_value(suite.arch)}"]
    if suite.model_options:
        lines.append(f"options = {_value(suite.model_options)}")
    lines += ["", "[training]"]
    lines += [f"{k} = {_value(v)}" for k, v in suite.train.to_dict().items() if v is not None]
    if suite.task_options:
        lines += ["", "[tasks]"]
        lines += [f"{_key(t)} = {_value(o)}" for t, o in suite.task_options.items()]
    lines += ["", "[executor]", f"kind = {_value(suite.executor)}"]
    if suite.workers is not None:
        lines.append(f"workers = {suite.workers}")
    if suite.device != "cpu":
        lines.append(f"device = {_value(suite.device)}")
    for entry in suite.methods:
        lines += ["", "[[methods]]", f"name = {_value(entry.method)}", f"label = {_value(entry.label)}"]
        if entry.hyperparameters:
            lines.append(f"hyperparameters = {_value(entry.hyperparameters)}")
    return "\n".join(lines) + "\n"
