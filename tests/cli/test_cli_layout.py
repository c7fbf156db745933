"""The command line is a package with one module per command, each registered explicitly on one app."""

from __future__ import annotations

import subprocess
import sys

from taskbalance.cli import app


def test_every_command_is_registered_once_by_name():
    names = [command.name for command in app.registered_commands]
    assert sorted(names) == ["bench", "diagnose", "export", "methods", "report", "train"]


def test_python_dash_m_runs_the_same_app():
    result = subprocess.run(
        [sys.executable, "-m", "taskbalance.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for name in ("methods", "train", "bench", "report", "export", "diagnose"):
        assert name in result.stdout
