"""Where accepted jobs are kept, so that none is lost to a crash.

Every accepted job is written (and committed) before the server answers
``Job added``; its state moves queued -> done, and after a crash every job
not done is either found complete (its output file was renamed into place
before the crash) or run again. Job ids come from a counter that only grows,
so an id is never given twice, even across restarts.

The default store is SQLite in WAL mode with ``synchronous=NORMAL``: a
commit survives the process being killed (the case that matters here); it
may not survive the machine losing power.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import InputFile, TangoJob, TangoMachine

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    courselab TEXT NOT NULL,
    state TEXT NOT NULL,
    job TEXT NOT NULL,
    output_file TEXT NOT NULL,
    outcome TEXT,
    message TEXT,
    created REAL NOT NULL,
    finished REAL,
    callback_pending INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
-- (run_seconds, queue_seconds: added by _migrate to older databases)
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""


@dataclass
class StoredJob:
    id: int
    key: str
    courselab: str
    state: str
    job: TangoJob
    outcome: str | None
    message: str | None
    created: float
    finished: float | None
    callback_pending: bool


class Sealer:
    """Encrypts secrets kept in the store (a job's ``accessKey``) with a key
    of the server's own (Fernet: AES-128-CBC + HMAC-SHA256): the database
    alone (a backup, a copy) does not give them away. The key is
    ``VMPOOL_STORE_KEY`` if set, else a file beside the database (0600),
    made at first use."""

    def __init__(self, key_file: Path) -> None:
        from cryptography.fernet import Fernet

        key = os.environ.get("VMPOOL_STORE_KEY", "").encode()
        if not key:
            try:
                fd = os.open(key_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                key = key_file.read_bytes().strip()
            else:
                key = Fernet.generate_key()
                with os.fdopen(fd, "wb") as f:
                    f.write(key + b"\n")
        self._fernet = Fernet(key)

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str | None:
        """The secret, or None if this key did not seal it."""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except (InvalidToken, ValueError):
            return None


def job_to_json(job: TangoJob, sealer: Sealer | None = None) -> str:
    d = job.to_dict()
    d["disableNetwork"] = job.disableNetwork
    d["accessKeyId"] = job.accessKeyId
    if job.accessKey and sealer is not None:
        # never in the clear: the store keeps it sealed, /jobs never shows it
        d["accessKeySealed"] = sealer.seal(job.accessKey)
    return json.dumps(d)


def job_from_json(text: str, sealer: Sealer | None = None) -> TangoJob:
    d: dict[str, Any] = json.loads(text)
    sealed = d.pop("accessKeySealed", None)
    if isinstance(sealed, str) and sealer is not None:
        # None if the key changed: the job then fails, clearly (scheduler)
        d["accessKey"] = sealer.open(sealed)
    vm_fields = d.pop("vm") or {}
    known = TangoMachine.__dataclass_fields__
    vm = TangoMachine(**{k: v for k, v in vm_fields.items() if k in known})
    inputs = [InputFile(f["localFile"], f["destFile"]) for f in d.pop("input", [])]
    fields = {k: v for k, v in d.items() if k in TangoJob.__dataclass_fields__}
    fields["trace"] = list(fields.get("trace") or [])
    return TangoJob(vm=vm, input=inputs, **fields)


class SQLiteStore:
    """Jobs in one SQLite file. Calls are short and synchronous (one small
    write per call, ~0.1 ms in WAL mode); one lock serialises them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # owner-only: jobs hold the courses' keys, file names and outputs
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._sealer = Sealer(self.path.with_name(self.path.name + ".key"))
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
            row = self._db.execute("SELECT v FROM meta WHERE k='next_id'").fetchone()
            if row is None:
                top = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM jobs").fetchone()[0]
                self._db.execute("INSERT INTO meta VALUES ('next_id', ?)", (str(top + 1),))

    def _migrate(self) -> None:
        """Columns later versions added (a database of an earlier one keeps working)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column in ("run_seconds", "queue_seconds"):
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, job: TangoJob, key: str, courselab: str) -> int:
        """Give ``job`` its id and keep it; committed when this returns."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (next_id,) = self._db.execute("SELECT v FROM meta WHERE k='next_id'").fetchone()
                job.id = int(next_id)
                self._db.execute(
                    "UPDATE meta SET v=? WHERE k='next_id'", (str(job.id + 1),)
                )
                self._db.execute(
                    "INSERT INTO jobs (id, key, courselab, state, job, output_file, created,"
                    " callback_pending) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (job.id, key, courselab, job_to_json(job, self._sealer), job.outputFile,
                     time.time(),
                     int(bool(job.notifyURL))),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return job.id

    def finish(self, job: TangoJob, outcome: str, message: str,
               run_seconds: float | None = None, queue_seconds: float | None = None) -> None:
        """The job is done; ``run_seconds`` (its VM's time on it) and
        ``queue_seconds`` (its wait for a VM) feed ``vmpool trace``."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state='done', outcome=?, message=?, finished=?, job=?,"
                " run_seconds=?, queue_seconds=? WHERE id=?",
                # a done job is never run again: its sealed key is dropped
                (outcome, message, time.time(), job_to_json(job), run_seconds, queue_seconds,
                 job.id),
            )

    def trace_rows(self) -> list[tuple[float, str, str, float, str | None]]:
        """The done jobs that ran, as (submitted, image, courselab, run
        seconds, outcome): what :func:`vmpool.load.workload.trace_from_rows`
        takes (``vmpool trace``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT created, job, courselab, run_seconds, outcome FROM jobs"
                " WHERE state = 'done' AND run_seconds > 0 ORDER BY created").fetchall()
        out = []
        for created, text, courselab, run, outcome in rows:
            image = (json.loads(text).get("vm") or {}).get("image") or "unknown"
            out.append((float(created), str(image), str(courselab), float(run), outcome))
        return out

    def callback_done(self, job_id: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET callback_pending=0 WHERE id=?", (job_id,))

    def unfinished(self) -> list[StoredJob]:
        return self._select("state != 'done' ORDER BY id")

    def pending_callbacks(self) -> list[StoredJob]:
        return self._select("state = 'done' AND callback_pending = 1 ORDER BY id")

    def done(self, limit: int = 1000) -> list[StoredJob]:
        rows = self._select(f"state = 'done' ORDER BY id DESC LIMIT {int(limit)}")
        return rows[::-1]

    def get(self, job_id: int) -> StoredJob | None:
        rows = self._select(f"id = {int(job_id)}")
        return rows[0] if rows else None

    def count(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    def _select(self, where: str) -> list[StoredJob]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, key, courselab, state, job, outcome, message, created, finished,"
                f" callback_pending FROM jobs WHERE {where}"
            ).fetchall()
        return [
            StoredJob(r[0], r[1], r[2], r[3], job_from_json(r[4], self._sealer), r[5], r[6],
                      r[7], r[8], bool(r[9]))
            for r in rows
        ]
