"""The results store: one row per run key, finished runs skipped and never lost, even after SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from taskbalance.bench.runner import RunResult, RunSpec
from taskbalance.bench.store import ResultsStore


def spec(method="ew", seed=0, label="", **hp):
    return RunSpec("tiny", method, seed, hyperparameters=hp, label=label, arch="tiny", train={"epochs": 1})


def done(s, value=1.0):
    return RunResult(
        spec=s, status="done", tasks=[{"name": "a"}], metrics={"a": value}, val_metrics={"a": value + 1},
        selected_epoch=1, ms_per_step=2.5, peak_memory_mb=100.0, steps=3,
        history=[{"epoch": 1}], weights=[[[1.0], [0.5]]], started_at="t0", finished_at="t1",
    )


def test_finished_runs_are_skipped_and_unfinished_ones_are_pending(tmp_path: Path):
    a, b, c = spec("ew"), spec("ema"), spec("ew", seed=1)
    with ResultsStore(tmp_path) as store:
        assert store.path == tmp_path / "results.sqlite"
        for s in (a, b, c):
            store.mark_running(s)
        store.record(done(a))
        store.record(RunResult(spec=b, status="failed", error="boom"))
        assert store.pending([a, b, c, c]) == [b, c]
        rows = {r["method"] + str(r["seed"]): r for r in store.runs()}
        assert rows["ew0"]["status"] == "done" and rows["ema0"]["error"] == "boom"
        assert rows["ew1"]["status"] == "running"


def test_a_run_key_is_one_row_and_a_done_row_is_never_overwritten(tmp_path: Path):
    a = spec("ema", beta=0.5)
    with ResultsStore(tmp_path) as store:
        store.mark_running(a)
        store.mark_running(a)
        store.record(done(a, value=1.0))
        store.mark_running(a)  # e.g. a second driver by mistake: a finished row stays finished
        store.record(done(a, value=9.0))
        store.record(RunResult(spec=a, status="failed", error="late failure"))
        rows = store.runs()
        assert len(rows) == 1
        assert rows[0]["status"] == "done" and rows[0]["metrics"] == {"a": 1.0}
        assert rows[0]["attempts"] == 2 and rows[0]["hyperparameters"] == {"beta": 0.5}


def test_hyperparameters_and_protocol_are_part_of_the_key(tmp_path: Path):
    base = spec("ema", beta=0.5)
    other_hp = spec("ema", beta=0.9)
    other_protocol = RunSpec("tiny", "ema", 0, {"beta": 0.5}, arch="tiny", train={"epochs": 2})
    assert len({base.key, other_hp.key, other_protocol.key}) == 3
    assert base.key == spec("ema", beta=0.5, label="a different label").key
    with ResultsStore(tmp_path) as store:
        for s in (base, other_hp, other_protocol):
            store.record(done(s))
        assert len(store.runs(status="done")) == 3
        assert len(store.runs(protocol_hash=base.protocol_hash)) == 2


def test_row_contents_curves_and_provenance(tmp_path: Path):
    s = spec("ema", label="ema 'quoted' \"label\"; DROP TABLE runs; --", beta=0.5)
    with ResultsStore(tmp_path) as store:
        store.mark_running(s)
        store.record(done(s))
        (row,) = store.runs()
        assert row["label"] == s.label  # stored verbatim: parameterised SQL
        assert row["ms_per_step"] == 2.5 and row["peak_memory_mb"] == 100.0 and row["steps"] == 3
        assert row["val_metrics"] == {"a": 2.0} and row["tasks"] == [{"name": "a"}]
        assert row["package_version"] and row["started_at"] == "t0" and row["finished_at"] == "t1"
        assert row["protocol"]["train"] == {"epochs": 1}
        assert store.curves(row["id"]) == {"history": [{"epoch": 1}], "weights": [[[1.0], [0.5]]]}
    db = sqlite3.connect(tmp_path / "results.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _count(db_path: Path, status: str) -> int:
    if not db_path.exists():
        return 0
    try:
        db = sqlite3.connect(db_path, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM runs WHERE status = ?", (status,)).fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def _snapshot(db_path: Path) -> dict[tuple, tuple]:
    db = sqlite3.connect(db_path)
    rows = db.execute(
        "SELECT method, hyperparameters, seed, id, status, metrics, finished_at, attempts FROM runs"
    ).fetchall()
    db.close()
    return {(m, h, s): rest for m, h, s, *rest in rows}


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_study_killed_with_sigkill_loses_no_finished_run_and_duplicates_none(tmp_path: Path):
    """Kill the driver (not its workers) after its first finished run; restart; nothing lost or doubled."""
    out = tmp_path / "study"
    db_path = out / "results.sqlite"
    command = [sys.executable, "-m", "taskbalance.cli", "bench", "--suite", "quick", "--out", str(out),
               "--workers", "2", "--epochs", "4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _count(db_path, "done") < 1:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no run finished in time"
            time.sleep(0.02)
        workers = _children(process.pid)
        os.kill(process.pid, signal.SIGKILL)  # the driver only: its pool workers must notice and leave
        process.wait()
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers and not any(_alive(w) for w in workers), "orphaned workers kept running"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    before = _snapshot(db_path)
    finished = {k: v for k, v in before.items() if v[1] == "done"}
    total = 14  # quick suite: 3 single-task baselines + 4 methods, 2 seeds each
    assert 1 <= len(finished) < total, "the kill must land mid-study"

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{total - len(finished)} run(s) executed, {len(finished)} already done" in rerun.stdout
    after = _snapshot(db_path)
    assert len(after) == total  # one row per run, no duplicate
    assert all(v[1] == "done" for v in after.values())
    for key, row in finished.items():
        assert after[key] == row, "a finished run was changed by the restart"
    assert {v[4] for k, v in after.items() if k not in finished} == {2}  # started twice: killed, then rerun
