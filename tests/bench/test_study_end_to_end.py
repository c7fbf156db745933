"""Done-when of the study work: a TOML study with a grid, a ForkMerge entry and an auxiliary role on a user
CSV runs end to end, and resumes after ``kill -9`` without redoing finished rows."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def _csv(path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 3))
    frame = pd.DataFrame({"rownames": range(1, 241), "a": x[:, 0], "b": x[:, 1], "c": x[:, 2]})
    frame["price.usd"] = x @ [1.0, -2.0, 0.5] + 0.1 * rng.normal(size=240)
    frame["views"] = x @ [1.0, -1.5, 0.0] + 0.3 * rng.normal(size=240)
    frame.to_csv(path, index=False)


def _done(database: Path) -> dict[tuple[str, int], tuple[str, int]]:
    if not database.exists():
        return {}
    with sqlite3.connect(database) as db:
        if not db.execute("SELECT name FROM sqlite_master WHERE name = 'runs'").fetchall():
            return {}  # the store is being created
        rows = db.execute(
            "SELECT label, seed, finished_at, attempts FROM runs WHERE status = 'done'"
        ).fetchall()
    return {(label, seed): (finished, attempts) for label, seed, finished, attempts in rows}


@pytest.mark.slow
def test_a_study_file_runs_end_to_end_and_resumes_after_kill_9(tmp_path: Path) -> None:
    _csv(tmp_path / "sales.csv")
    study = tmp_path / "study.toml"
    study.write_text(f"""
name = "sales"
seeds = 2
methods = "ew, bmtl(temperature=[1,5]), forkmerge(merge_every=8)"

[dataset]
name = "table"
options = {{ path = "{tmp_path / "sales.csv"}", targets = ["price.usd:regression", "views:regression"] }}

[model]
arch = "mlp"
options = {{ hidden = [8] }}

[training]
epochs = 3
batch_size = 32
lr = 0.01

[tasks]
views = {{ role = "auxiliary" }}

[executor]
kind = "serial"
""")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "taskbalance.cli",
        "bench",
        "--study",
        str(study),
        "--out",
        str(out),
        "--no-report",
    ]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(_done(out / "results.sqlite")) < 3 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    before = _done(out / "results.sqlite")
    assert 3 <= len(before) < 10, before  # killed mid-study: 2 seeds × (1 baseline + 4 variants) = 10 rows
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _done(out / "results.sqlite")
    assert len(after) == 10
    labels = {label for label, _ in after}
    assert labels == {
        "stl:price_usd",
        "ew",
        "bmtl(temperature=1)",
        "bmtl(temperature=5)",
        "forkmerge(merge_every=8)",
    }
    for key, (finished, attempts) in before.items():
        assert after[key] == (finished, attempts)  # finished rows were not redone
    assert f"{10 - len(before)} run(s) executed, {len(before)} already done" in second.stdout
