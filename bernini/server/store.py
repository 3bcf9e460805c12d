"""The durable job table: one SQLite file beside the outputs; every state change is one transaction."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATES = ("queued", "in_progress", "completed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,      -- queue order
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,                       -- queued | in_progress | completed | failed
    progress INTEGER NOT NULL DEFAULT 0,        -- 0-100
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    spec TEXT NOT NULL,                         -- what to render (JSON): the case and the settings
    info TEXT NOT NULL,                         -- what a client is shown (JSON): model, prompt, size, seconds...
    error TEXT,                                 -- JSON {code, message}
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    remixed_from TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,        -- renders started; 2 after a crash mid-render
    deleted INTEGER NOT NULL DEFAULT 0,         -- cancelled by DELETE; hidden, purged once no render holds it
    seconds REAL                                -- wall time of the completed render
);
"""
_COLUMNS = "id, status, progress, created_at, completed_at, spec, info, error, idempotency_key, request_hash, remixed_from, attempts, deleted, seconds"


class QueueFull(Exception):
    """The queue holds its limit of waiting jobs."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key already names a job made from a different request."""


@dataclass(frozen=True)
class JobRow:
    id: str
    status: str
    progress: int
    created_at: int
    completed_at: int | None
    spec: dict[str, Any]
    info: dict[str, Any]
    error: dict[str, Any] | None
    idempotency_key: str | None
    request_hash: str | None
    remixed_from: str | None
    attempts: int
    deleted: bool
    seconds: float | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> JobRow:
        (id_, status, progress, created, completed, spec, info, error, key, digest, remixed, attempts, deleted, seconds) = row
        return cls(id_, status, progress, created, completed, json.loads(spec), json.loads(info), json.loads(error) if error else None,
                   key, digest, remixed, attempts, bool(deleted), seconds)


@dataclass(frozen=True)
class NewJob:
    id: str
    spec: dict[str, Any]
    info: dict[str, Any]
    idempotency_key: str | None = None
    request_hash: str | None = None
    remixed_from: str | None = None


class JobStore:
    """Jobs in SQLite (WAL, synchronous=FULL: a state the server reported survives kill -9 and power loss).

    A connection per call keeps it safe from any thread (the HTTP threads, the worker).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise ValueError(f"{self.path}: job table version {version} is not {SCHEMA_VERSION}; use another --data_dir or move this one away")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.execute("PRAGMA synchronous=FULL")
            yield db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # take the write lock now: the checks below see what the write changes
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------ creating

    def insert(self, job: NewJob, max_queued: int) -> tuple[JobRow, bool]:
        """Queue a job; (row, True), or (the job its Idempotency-Key already names, False). QueueFull, IdempotencyConflict."""
        with self._transaction() as db:
            if job.idempotency_key is not None:
                found = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)).fetchone()
                if found is not None:
                    row = JobRow.from_row(found)
                    if row.request_hash != job.request_hash:
                        raise IdempotencyConflict(job.idempotency_key)
                    return row, False
            waiting = db.execute("SELECT count(*) FROM jobs WHERE status = 'queued' AND deleted = 0").fetchone()[0]
            if waiting >= max_queued:
                raise QueueFull(waiting)
            db.execute(
                "INSERT INTO jobs (id, status, created_at, spec, info, idempotency_key, request_hash, remixed_from) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job.id, int(time.time()), json.dumps(job.spec), json.dumps(job.info), job.idempotency_key, job.request_hash, job.remixed_from),
            )
            return JobRow.from_row(db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job.id,)).fetchone()), True

    # ------------------------------------------------------------ reading

    def get(self, job_id: str) -> JobRow | None:
        """A job clients can see (not deleted)."""
        with self._connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ? AND deleted = 0", (job_id,)).fetchone()
        return JobRow.from_row(row) if row else None

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[JobRow], bool] | None:
        """Up to `limit` jobs after the job `after` in creation order (asc|desc), and whether more follow; None: no such `after`."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        with self._connect() as db:
            if after is None:
                rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE deleted = 0 ORDER BY seq {direction} LIMIT ?", (limit + 1,)).fetchall()
            else:
                anchor = db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if anchor is None:
                    return None
                rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE deleted = 0 AND seq {op} ? ORDER BY seq {direction} LIMIT ?", (anchor[0], limit + 1)).fetchall()
        return [JobRow.from_row(r) for r in rows[:limit]], len(rows) > limit

    def is_deleted(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT deleted FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row[0])

    def counts(self) -> dict[str, int]:
        """Visible jobs by state (every state present, 0 when none)."""
        with self._connect() as db:
            found = dict(db.execute("SELECT status, count(*) FROM jobs WHERE deleted = 0 GROUP BY status").fetchall())
        return {state: int(found.get(state, 0)) for state in STATES}

    def completed_seconds(self) -> tuple[int, float]:
        """(completed jobs, their total render seconds)."""
        with self._connect() as db:
            count, total = db.execute("SELECT count(seconds), coalesce(sum(seconds), 0) FROM jobs WHERE status = 'completed' AND deleted = 0").fetchone()
        return int(count), float(total)

    def ids(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT id FROM jobs").fetchall()]

    # ------------------------------------------------------------ the worker's transitions

    def claim(self) -> JobRow | None:
        """The oldest queued job, now in_progress (one attempt more); None when nothing waits."""
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status = 'queued' AND deleted = 0 ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'in_progress', progress = 0, attempts = attempts + 1 WHERE id = ?", (row[0],))
            return JobRow.from_row(db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone())

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'", (progress, job_id))

    def complete(self, job_id: str, seconds: float) -> bool:
        """in_progress -> completed; False when the job was deleted meanwhile (its files are the caller's to remove)."""
        with self._connect() as db:
            done = db.execute(
                "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, seconds = ?, error = NULL WHERE id = ? AND status = 'in_progress' AND deleted = 0",
                (int(time.time()), seconds, job_id),
            )
            return done.rowcount == 1

    def fail(self, job_id: str, code: str, message: str) -> bool:
        with self._connect() as db:
            done = db.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE id = ? AND status = 'in_progress' AND deleted = 0",
                (int(time.time()), json.dumps({"code": code, "message": message}), job_id),
            )
            return done.rowcount == 1

    def requeue(self, job_id: str) -> None:
        """A render the server stopped for shutting down: it runs again, first in line."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET status = 'queued', progress = 0 WHERE id = ? AND status = 'in_progress'", (job_id,))

    def recover(self) -> list[str]:
        """At start: jobs a crash left in_progress are queued again (they keep their place); their ids."""
        with self._transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE status = 'in_progress' AND deleted = 0").fetchall()]
            db.execute("UPDATE jobs SET status = 'queued', progress = 0 WHERE status = 'in_progress' AND deleted = 0")
            return ids

    # ------------------------------------------------------------ deleting

    def mark_deleted(self, job_id: str) -> str | None:
        """Hide a job and stop it; its status before (None: no such visible job). A queued job is never claimed after this."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ? AND deleted = 0", (job_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET deleted = 1 WHERE id = ?", (job_id,))
            return str(row[0])

    def purge(self, job_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM jobs WHERE id = ? AND deleted = 1", (job_id,))

    def deleted_ids(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT id FROM jobs WHERE deleted = 1").fetchall()]
