"""The results store: one SQLite file per study, one row per run, idempotent and resumable.

Layout (``DIR/results.sqlite``):

* ``runs`` — one row per (dataset, protocol hash, method, hyperparameters JSON, seed) (a UNIQUE key):
  status (``running`` / ``done`` / ``failed``), label, protocol (JSON), task specs (JSON), test and validation
  primary metrics (JSON, ``{task: value}``), every test metric of each task's kind (``test_metrics``, JSON
  ``{task: {metric: value}}``: AUROC/AP/accuracy, macro-F1/accuracy, MAE/RMSE), the trivial predictor's test
  metrics (``trivial_metrics``, same shape: majority class / training mean), selected epoch, ms/step, peak
  memory, steps, wall time, package version, git revision,
  timestamps, error text, number of attempts.
* ``curves`` — per run, named JSON curves: ``history`` (per-epoch losses, validation metrics, mean weights),
  ``weights`` (the balancer's weights, epochs × steps × tasks), so reports plot them without re-running.

Durability: WAL journal, ``synchronous=FULL``, and every state change is one transaction. A study killed at
any point (even SIGKILL) leaves finished runs intact; rows still ``running`` are simply re-run on restart,
updating the same row (never a duplicate). One writer: the driver process; workers only return results.
All SQL is parameterised.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sqlite3
import subprocess
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keys import RunKey, run_key
from .spec import RunResult, RunSpec

__all__ = ["ResultsStore", "RunRecord", "git_revision", "STORE_NAME"]

STORE_NAME = "results.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    dataset TEXT NOT NULL,
    protocol_hash TEXT NOT NULL,
    method TEXT NOT NULL,
    hyperparameters TEXT NOT NULL,
    seed INTEGER NOT NULL,
    label TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    protocol TEXT NOT NULL,
    tasks TEXT,
    metrics TEXT,
    val_metrics TEXT,
    test_metrics TEXT,
    trivial_metrics TEXT,
    selected_epoch INTEGER,
    ms_per_step REAL,
    peak_memory_mb REAL,
    steps INTEGER,
    wall_seconds REAL,
    package_version TEXT,
    git_revision TEXT,
    started_at TEXT,
    finished_at TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    UNIQUE (dataset, protocol_hash, method, hyperparameters, seed)
);
CREATE TABLE IF NOT EXISTS curves (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""
_JSON_COLUMNS = ("protocol", "tasks", "metrics", "val_metrics", "test_metrics", "trivial_metrics")
_ADDED_COLUMNS = ("test_metrics", "trivial_metrics")
"""Columns added after the first release: a store written before them gains them (empty) when opened."""


@dataclass(frozen=True)
class RunRecord:
    """One stored run (a row of ``runs``), JSON columns decoded.

    ``tasks``/``metrics``/``val_metrics`` are empty until the run is ``done``; ``test_metrics`` (every
    metric of each task's kind) and ``trivial_metrics`` (the trivial predictor's, see
    :func:`taskbalance.data.metrics.trivial_metrics`) are ``{task: {metric: value}}``, empty for runs stored
    before they were recorded. Item access
    (``record["seed"]``) reads the attribute of that name, for readers written against the earlier dict rows.
    """

    id: int
    dataset: str
    protocol_hash: str
    method: str
    hyperparameters: dict[str, Any]
    seed: int
    label: str
    status: str
    protocol: dict[str, Any]
    tasks: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    trivial_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    selected_epoch: int | None = None
    ms_per_step: float | None = None
    peak_memory_mb: float | None = None
    steps: int | None = None
    wall_seconds: float | None = None
    package_version: str | None = None
    git_revision: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    attempts: int = 0
    claimed_by: str | None = None

    @property
    def key(self) -> RunKey:
        """The run's key (:func:`~taskbalance.bench.keys.run_key`), comparable with ``RunSpec.key``."""
        return run_key(self.dataset, self.protocol_hash, self.method, self.hyperparameters, self.seed)

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default) if name in self.__dataclass_fields__ else default

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RunRecord:
        item = {k: v for k, v in dict(row).items() if k in cls.__dataclass_fields__}
        item.setdefault("claimed_by", None)
        for column in (*_JSON_COLUMNS, "hyperparameters"):
            if item.get(column) is not None:  # read-only opens of old stores may lack added columns
                item[column] = json.loads(item[column])
        empties = (("tasks", list), ("metrics", dict), ("val_metrics", dict), ("test_metrics", dict),
                   ("trivial_metrics", dict))
        for column, empty in empties:
            if item.get(column) is None:
                item[column] = empty()
        return cls(**item)


def _connect_read_only(target: Path) -> sqlite3.Connection:
    """Open ``target`` for reading only, writing nothing next to it.

    With no ``-wal`` file beside the store, no writer is active (a writer that closes cleanly removes it): the
    store is opened ``immutable=1``, so SQLite creates no ``-wal``/``-shm`` file (a read-only, archived or
    someone else's study folder stays byte-identical). While a ``bench`` is writing (its ``-wal`` exists),
    the store is opened ``mode=ro`` and reads through the writer's shared-memory index, so the rows are
    consistent; a folder where even that fails (read-only with a stale ``-wal``) falls back to immutable.
    """
    if not target.exists():
        raise FileNotFoundError(f"no results store at {target}")
    uri = "file:" + urllib.parse.quote(str(target.resolve()))
    immutable = uri + "?mode=ro&immutable=1"
    if not target.with_name(target.name + "-wal").exists():
        return sqlite3.connect(immutable, uri=True, isolation_level=None)
    try:
        db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30.0, isolation_level=None)
        db.execute("SELECT count(*) FROM runs").fetchone()
        return db
    except sqlite3.OperationalError:
        return sqlite3.connect(immutable, uri=True, isolation_level=None)


def _claim_alive(owner: str | None, me: str) -> bool:
    """Whether the bench process that claimed a run may still be running it."""
    if not owner or owner == me:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's claim: we cannot tell, so we leave its run alone
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def git_revision() -> str | None:
    """The git commit of the installed package's checkout, if it is one (else ``None``)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """A study's SQLite results file.

    Args:
        path: a directory (the file is ``path/results.sqlite``) or a ``.sqlite`` file path.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        target = Path(path)
        if target.suffix not in (".sqlite", ".db"):
            target = target / STORE_NAME
        self.path = target
        self.read_only = read_only
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        if read_only:
            self._db = _connect_read_only(target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(target, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            present = {r[1] for r in self._db.execute("PRAGMA table_info(runs)").fetchall()}
            for column in (*_ADDED_COLUMNS, "claimed_by"):  # fixed literals, not user input
                if column not in present:
                    self._db.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
        self._db.row_factory = sqlite3.Row
        from .. import __version__

        self.package_version = __version__
        self.git_revision = git_revision()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ writing (driver only)
    def pending(self, specs: Sequence[RunSpec]) -> list[RunSpec]:
        """The specs without a finished (``done``) row, in the given order, duplicates removed."""
        done = self.done_keys()
        seen: set[tuple[Any, ...]] = set()
        todo = []
        for spec in specs:
            if spec.key not in done and spec.key not in seen:
                todo.append(spec)
                seen.add(spec.key)
        return todo

    def claim(self, spec: RunSpec) -> bool:
        """Mark the run ``running`` under this process, unless it is ``done`` or claimed by another live
        bench process on this host (then ``False``: that process is running it). Claims of dead processes
        (a driver killed with SIGKILL) are taken over."""
        with self._transaction() as db:
            row = db.execute(
                """SELECT status, claimed_by FROM runs WHERE dataset = ? AND protocol_hash = ? AND method = ?
                   AND hyperparameters = ? AND seed = ?""",
                spec.key,
            ).fetchone()
            if row is not None and row["status"] == "done":
                return False
            if row is not None and row["status"] == "running" and _claim_alive(row["claimed_by"], self.owner):
                return False
            self._mark_running(db, spec)
            return True

    def mark_running(self, spec: RunSpec) -> None:
        """Insert the run as ``running`` (or flip an unfinished row back); ``done`` rows are left alone."""
        with self._transaction() as db:
            self._mark_running(db, spec)

    def _mark_running(self, db: sqlite3.Connection, spec: RunSpec) -> None:
        db.execute(
            """INSERT INTO runs (dataset, protocol_hash, method, hyperparameters, seed, label, status,
                                 protocol,
                                 package_version, git_revision, started_at, attempts, claimed_by)
               VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, 1, ?)
               ON CONFLICT (dataset, protocol_hash, method, hyperparameters, seed) DO UPDATE SET
                   status = 'running', label = excluded.label, started_at = excluded.started_at,
                   attempts = runs.attempts + 1, error = NULL, claimed_by = excluded.claimed_by
               WHERE runs.status != 'done'""",
            (
                *spec.key,
                spec.display,
                json.dumps(spec.protocol, sort_keys=True),
                self.package_version,
                self.git_revision,
                _now(),
                self.owner,
            ),
        )

    def record(self, result: RunResult) -> None:
        """Write a finished (done or failed) run and its curves in one transaction."""
        spec = result.spec
        with self._transaction() as db:
            db.execute(
                """INSERT INTO runs (dataset, protocol_hash, method, hyperparameters, seed, label, status,
                                     protocol,
                                     attempts)
                   VALUES (?, ?, ?, ?, ?, ?, 'running', ?, 1)
                   ON CONFLICT (dataset, protocol_hash, method, hyperparameters, seed) DO NOTHING""",
                (*spec.key, spec.display, json.dumps(spec.protocol, sort_keys=True)),
            )
            row = db.execute(
                """SELECT id, status FROM runs WHERE dataset = ? AND protocol_hash = ? AND method = ?
                   AND hyperparameters = ? AND seed = ?""",
                spec.key,
            ).fetchone()
            if row["status"] == "done":
                return  # a finished run is never overwritten
            db.execute(
                """UPDATE runs SET status = ?, label = ?, tasks = ?, metrics = ?, val_metrics = ?,
                       test_metrics = ?, trivial_metrics = ?, selected_epoch = ?, ms_per_step = ?,
                       peak_memory_mb = ?, steps = ?, wall_seconds = ?,
                       package_version = ?, git_revision = ?, started_at = ?, finished_at = ?, error = ?
                   WHERE id = ?""",
                (
                    result.status,
                    spec.display,
                    json.dumps(result.tasks),
                    json.dumps(result.metrics),
                    json.dumps(result.val_metrics),
                    json.dumps(result.test_metrics),
                    json.dumps(result.trivial_metrics),
                    result.selected_epoch,
                    result.ms_per_step,
                    result.peak_memory_mb,
                    result.steps,
                    result.wall_seconds,
                    self.package_version,
                    self.git_revision,
                    result.started_at,
                    result.finished_at,
                    result.error,
                    row["id"],
                ),
            )
            db.execute("DELETE FROM curves WHERE run_id = ?", (row["id"],))
            if result.status == "done":
                db.executemany(
                    "INSERT INTO curves (run_id, name, data) VALUES (?, ?, ?)",
                    [
                        (row["id"], "history", json.dumps(result.history)),
                        (row["id"], "weights", json.dumps(result.weights)),
                    ],
                )

    # ------------------------------------------------------------------ reading
    def done_keys(self) -> set[RunKey]:
        rows = self._db.execute(
            "SELECT dataset, protocol_hash, method, hyperparameters, seed FROM runs WHERE status = 'done'"
        ).fetchall()
        return {tuple(r) for r in rows}  # type: ignore[misc]

    def runs(
        self, *, status: str | None = None, dataset: str | None = None, protocol_hash: str | None = None
    ) -> list[RunRecord]:
        """Stored runs as :class:`RunRecord`, ordered by id."""
        clauses, params = [], []
        for column, value in (("status", status), ("dataset", dataset), ("protocol_hash", protocol_hash)):
            if value is not None:
                clauses.append(f"{column} = ?")  # column names are fixed literals above
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(f"SELECT * FROM runs {where} ORDER BY id", params).fetchall()
        return [RunRecord.from_row(row) for row in rows]

    def curves(self, run_id: int) -> dict[str, Any]:
        """``{name: decoded JSON}`` of one run's curves (``history``, ``weights``)."""
        rows = self._db.execute("SELECT name, data FROM curves WHERE run_id = ?", (run_id,)).fetchall()
        return {r["name"]: json.loads(r["data"]) for r in rows}
