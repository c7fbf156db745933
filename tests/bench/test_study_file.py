"""Study files and the --methods language: variants, labels, grids, validation before any row is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskbalance.bench.method_text import MethodTextError
from taskbalance.bench.study_file import StudyFileError, load_study, study_from_text, study_to_toml
from taskbalance.bench.suites import SUITES, MethodEntry, parse_methods
from taskbalance.cli import app

runner = CliRunner()


def test_methods_text_gives_variants_labels_and_grids():
    entries = parse_methods(
        "ew, hot=bmtl(temperature=5), bmtl(temperature=[1,5,25]), imtl-g(gradients=features)"
    )
    assert entries == (
        MethodEntry("ew", "ew"),
        MethodEntry("hot", "bmtl", {"temperature": 5}),
        MethodEntry("bmtl(temperature=1)", "bmtl", {"temperature": 1}),
        MethodEntry("bmtl(temperature=5)", "bmtl", {"temperature": 5}),
        MethodEntry("bmtl(temperature=25)", "bmtl", {"temperature": 25}),
        MethodEntry("imtl-g(gradients=features)", "imtl-g", {"gradients": "features"}),
    )
    grid = parse_methods("t=x(a=[1,2], b=['u v', true], c=0.5)")
    assert [e.label for e in grid] == ["t(a=1,b='u v')", "t(a=1,b=true)", "t(a=2,b='u v')", "t(a=2,b=true)"]
    assert grid[0].hyperparameters == {"a": 1, "b": "u v", "c": 0.5}
    assert parse_methods("forkmerge(topk=[[0,1]])")[0].hyperparameters == {"topk": [0, 1]}


@pytest.mark.parametrize(
    "text",
    ["bmtl(temperature=5", "bmtl(temperature)", "__import__('os').system('x')", "a b", "x(k=1,k=2)", ""],
)
def test_malformed_methods_text_is_an_error_never_evaluated(text: str):
    with pytest.raises(ValueError):
        parse_methods(text)
    with pytest.raises(MethodTextError):
        parse_methods("ew,(")


def test_builtin_suites_are_study_files_that_round_trip():
    for suite in SUITES.values():
        assert study_from_text(study_to_toml(suite)) == suite
    result = runner.invoke(
        app, ["bench", "--suite", "demo", "--print-study", "--epochs", "3", "--role", "mu=auxiliary"]
    )
    assert result.exit_code == 0, result.output
    printed = study_from_text(result.output)
    assert (
        printed.dataset == "qm9"
        and printed.train.epochs == 3
        and printed.task_options == {"mu": {"role": "auxiliary"}}
    )
    assert [m.label for m in printed.methods] == [m.label for m in SUITES["demo"].methods]


def test_a_study_file_holds_the_whole_study(tmp_path: Path):
    file = tmp_path / "s.toml"
    file.write_text(
        """
name = "mine"
seeds = 3
methods = ["ew,hot=bmtl(temperature=5)", { name = "bmtl", label = "b", grid = { temperature = [1, 25] } }]

[dataset]
name = "tiny"
options = { n_train = 40 }

[model]
arch = "tiny"
options = { width = 8 }

[training]
epochs = 2
batch_size = 16
lr = 0.01
balancer_lr = 0.1

[tasks]
b = { role = "auxiliary", metric = "rmse" }

[executor]
kind = "serial"
"""
    )
    study = load_study(file)
    assert study.name == "mine" and study.seeds == 3 and study.dataset_options == {"n_train": 40}
    assert (
        study.model_options == {"width": 8} and study.train.balancer_lr == 0.1 and study.executor == "serial"
    )
    assert [m.label for m in study.methods] == ["ew", "hot", "b(temperature=1)", "b(temperature=25)"]
    assert study.task_options == {"b": {"role": "auxiliary", "metric": "rmse"}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("methods = 'ew'\n[dataset]\nname='tiny'\n[training]\nepoch = 3", "unknown training option"),
        (
            "methods = 'ew'\n[dataset]\nname='tiny'\ncolour = 1",
            "unknown key(s) colour; accepted: name, options",
        ),
        ("methods = 'ew'\n[dataset]\nname='tiny'\n[tasks]\na = { role = 'main' }", "role must be one of"),
        ("[dataset]\nname='tiny'", "no methods"),
        ("methods = 'ew'\nseeds = 0\n[dataset]\nname='tiny'", "seeds must be a positive integer"),
        ("methods = 'ew'\n[dataset", "not valid TOML"),
    ],
)
def test_study_file_errors_name_the_key(text: str, message: str):
    with pytest.raises(StudyFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        study_from_text(text, "s.toml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "bmtl(T=5)"], "method 'bmtl(T=5)'"),
        (["--methods", "ew,forkmerge(momentum=1)"], "unknown ForkMerge option"),
        (["--methods", "ew,emma"], "unknown balancing method 'emma'"),
        (["--role", "zzz=auxiliary"], "not tasks of 'tiny'"),
        (["--role", "a=main"], "must be target or auxiliary"),
        (["--metric", "a=auroc"], "does not fit a regression task"),
        (["--model-option", "depth=3"], "unknown option"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--methods", "bmtl(temperature=5"], "expected"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_any_row_is_written(
    tmp_path: Path, args: list[str], message: str
):
    result = runner.invoke(app, ["bench", "--suite", "quick", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "results.sqlite").exists()
