"""SQLite runtime state: per-job state, occurrence claims, runs, meta, replay cache.

One ``state.db`` under the state directory, in WAL mode, opened by every
chronosd process that touches the state (the daemon, ``chronosd fire``, the
read-only CLI views). The API is synchronous on purpose: every call is one
short statement or one short ``BEGIN IMMEDIATE`` transaction, so the async
daemon calls it directly instead of pushing it to a thread.

Decisions worth knowing:

- ``synchronous=NORMAL``, and ``FULL`` around the claims (claim() and
  claim_and_advance()). In WAL mode ``NORMAL`` survives a crash of the process
  but may lose the last commits on power loss. Losing a claim would let an
  occurrence whose job already started start a second time after the reboot,
  breaking "at most once per state database", so a claim is fsynced before
  it returns (and with it every earlier commit in the WAL). Losing anything
  else is repaired by the next start: a lost run start or end leaves a claim
  of a dead owner that recovery marks ``interrupted``; a lost nonce lets a
  replayed fire through to a claim that refuses it. That keeps the fsyncs
  to one per fire, on the claim, which is the only one before the 202.
- Group commit: the daemon commits a claim with ``durable=False`` and then
  waits for a SyncGroup round, one fsync of the WAL file in a worker thread
  shared by every claim committed before the round began. The claim is as
  durable as a ``FULL`` commit once the round returns; if the round fails,
  ``undo_claim`` takes the claim back so that the caller's retry finds it
  unclaimed. Other readers may see such a claim before it is durable, which
  is why a duplicate answered from someone else's claim waits for a round too.
- ``busy_timeout`` (5 s by default) is the only place a call may block for
  long: another process is holding the write lock for longer than any of our
  transactions ever should. When it runs out, the caller gets a StateError
  (the HTTP layer answers 503 and the NAS retries).
- Instants are stored as wire text (``YYYY-MM-DDTHH:MM:SS+00:00``, see
  chronosd.timefmt): readable with the sqlite3 shell, and ordered correctly
  as text. Sub-second parts are dropped on the way in.
- Inserting the occurrence row *is* the claim: one autocommit
  ``INSERT ... ON CONFLICT DO NOTHING``, and the affected-row count decides.
- Every ``sqlite3.Error`` (and every OSError on the run logs) reaches callers
  as one StateError with a one-line message.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Final, NamedTuple

from chronosd.errors import StateError
from chronosd.timefmt import parse_instant, to_wire

DB_NAME: Final = "state.db"
RUNS_DIR: Final = "runs"
DEFAULT_BUSY_TIMEOUT: Final = 5.0
NONCE_PURGE_EVERY: Final = 60.0  # seconds between deletes of expired replay-cache rows
# With checkpoints deferred (StateDB.defer_checkpoints), a commit checkpoints inline only past
# this many WAL pages (16 MB); SyncGroup checkpoints in a worker thread once CHECKPOINT_AFTER
# claims were made durable since the last time, at most every CHECKPOINT_EVERY seconds.
DEFERRED_CHECKPOINT_PAGES: Final = 4096
CHECKPOINT_EVERY: Final = 0.2
CHECKPOINT_AFTER: Final = 64  # callers (claims, ~8 pages each) served since the last one

OCCURRENCE_STATES: Final = frozenset(
    {"claimed", "running", "done", "failed", "skipped", "missed", "interrupted"}
)
TRIGGERS: Final = frozenset({"schedule", "catch-up", "manual", "retry"})
RUN_STATUSES: Final = frozenset({"ok", "failed", "timeout", "killed", "spawn-error", "interrupted"})

# Job ids are validated by the jobs file loader; this second check guards the
# one place where an id becomes a file-system path.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class JobState:
    """One row of job_state."""

    job_id: str
    spec_hash: str
    schedule_key: str
    anchor: datetime
    next_fire: datetime | None
    armed_fire: datetime | None
    armed_confirmed_at: datetime | None
    runs_started: int
    last_run_id: str | None
    last_status: str | None
    completed: bool


class ArmState(NamedTuple):
    """The columns of job_state that reconciling an arm compares."""

    next_fire: datetime | None
    armed_fire: datetime | None
    armed_confirmed_at: datetime | None


class JobSummary(NamedTuple):
    spec_hash: str
    schedule_key: str
    planned: bool  # next_fire is set
    completed: bool


@dataclass(frozen=True)
class Occurrence:
    """One row of occurrences: a claimed (or recorded) occurrence."""

    job_id: str
    scheduled_at: datetime
    state: str
    owner: str
    trigger: str
    claimed_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class RunRecord:
    """One row of runs."""

    run_id: str
    job_id: str
    scheduled_at: datetime
    attempt: int
    trigger: str
    pid: int | None
    started_at: datetime
    ended_at: datetime | None
    exit_code: int | None
    status: str | None  # "running" until finished, then one of RUN_STATUSES
    output_path: Path
    output_bytes: int
    owner: str = ""


_JOB_FIELDS: Final = tuple(f.name for f in fields(JobState))
_JOB_UPDATABLE: Final = frozenset(_JOB_FIELDS) - {"job_id"}
_JOB_INSTANT_FIELDS: Final = frozenset({"anchor", "next_fire", "armed_fire", "armed_confirmed_at"})

# --------------------------------------------------------------------------- schema
#
# Migrations are forward only. _MIGRATIONS[n] takes a database at version n to
# n + 1; each runs in its own transaction together with the new user_version,
# so a crash leaves the database at a version it really has.

_SCHEMA_V1: Final = (
    """CREATE TABLE job_state (
        job_id TEXT PRIMARY KEY,
        spec_hash TEXT NOT NULL,
        anchor TEXT NOT NULL,
        next_fire TEXT,
        armed_fire TEXT,
        runs_started INTEGER NOT NULL DEFAULT 0,
        last_run_id TEXT,
        last_status TEXT,
        completed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE occurrences (
        job_id TEXT NOT NULL,
        scheduled_at TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT NOT NULL,
        claimed_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (job_id, scheduled_at)
    ) WITHOUT ROWID""",
    # seq keeps "newest first" independent of clock steps and of run id text.
    """CREATE TABLE runs (
        seq INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL UNIQUE,
        job_id TEXT NOT NULL,
        scheduled_at TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        pid INTEGER,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        exit_code INTEGER,
        status TEXT,
        output_path TEXT NOT NULL,
        output_bytes INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX runs_by_job ON runs (job_id, seq)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)

_MIGRATE_V1_TO_V2: Final = (
    # An empty schedule_key means "not known": version 1 did not record it.
    "ALTER TABLE job_state ADD COLUMN schedule_key TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE job_state ADD COLUMN armed_confirmed_at TEXT",
    """ALTER TABLE occurrences ADD COLUMN "trigger" TEXT NOT NULL DEFAULT 'schedule'""",
    """ALTER TABLE runs ADD COLUMN "trigger" TEXT NOT NULL DEFAULT 'schedule'""",
    "ALTER TABLE runs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
    # Version 1 knew the owner only on the occurrence; copy it so that runs
    # left running by a dead version-1 process can still be recovered.
    """UPDATE runs SET owner = COALESCE(
        (SELECT o.owner FROM occurrences AS o
         WHERE o.job_id = runs.job_id AND o.scheduled_at = runs.scheduled_at), '')""",
    # Version 1 left status NULL while a run was in progress.
    "UPDATE runs SET status = 'running' WHERE status IS NULL",
    "CREATE INDEX runs_running ON runs (status) WHERE status = 'running'",
    "CREATE INDEX occurrences_by_time ON occurrences (scheduled_at)",
    "CREATE TABLE nonces (nonce TEXT PRIMARY KEY, expires TEXT NOT NULL) WITHOUT ROWID",
    "CREATE INDEX nonces_by_expiry ON nonces (expires)",
)


# meta key of the "arms are settled" mark (see StateDB.arms_settled): any write to job_state
# deletes it, whoever makes the write, so a mark that is present describes job_state as it is.
META_ARMS_SETTLED: Final = "arms_settled"

_MIGRATE_V2_TO_V3: Final = tuple(
    f"""CREATE TRIGGER job_state_{event.lower()}_unsettles AFTER {event} ON job_state
    BEGIN DELETE FROM meta WHERE key = '{META_ARMS_SETTLED}'; END"""
    for event in ("INSERT", "UPDATE", "DELETE")
)


def _script(statements: Sequence[str]) -> Callable[[sqlite3.Connection], None]:
    # executescript() would COMMIT the surrounding transaction first; running
    # the statements one by one keeps each migration atomic.
    def run(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return run


# Verified hmac signatures get their own replay cache, keyed by (expires, signature): a
# signature covers its t, from which the caller derives expires, so a replay presents the same
# key; an insert lands at the recent end of one B-tree (instead of at a random place in two, as
# in nonces, which token ids need: a jti is refused whatever exp its token carries), and expired
# rows are a prefix.
_MIGRATE_V3_TO_V4: Final = (
    """CREATE TABLE signatures (
        expires TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (expires, signature)
    ) WITHOUT ROWID""",
    "INSERT INTO signatures (expires, signature) "
    "SELECT expires, nonce FROM nonces WHERE nonce LIKE 'hmac:%'",
    "DELETE FROM nonces WHERE nonce LIKE 'hmac:%'",
)

# meta becomes a rowid table. It holds values of megabytes (the applied jobs.json, the
# validation memo), and in a WITHOUT ROWID table a row is its own key: a lookup that passes such
# a row on its way down the B-tree reads the whole value, overflow pages and all, to compare
# keys. Every meta read or write of a 10,000-job state database cost 2-7 ms; in a rowid table
# the lookup walks the key index and reads a value only when it is asked for (~0.05 ms). The
# triggers that delete the settled mark name meta, so they are made again around the swap.
_MIGRATE_V4_TO_V5: Final = (
    *(f"DROP TRIGGER job_state_{event}_unsettles" for event in ("insert", "update", "delete")),
    "CREATE TABLE meta_v5 (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "INSERT INTO meta_v5 (key, value) SELECT key, value FROM meta",
    "DROP TABLE meta",
    "ALTER TABLE meta_v5 RENAME TO meta",
    *_MIGRATE_V2_TO_V3,
)

_MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _script(_SCHEMA_V1),
    _script(_MIGRATE_V1_TO_V2),
    _script(_MIGRATE_V2_TO_V3),
    _script(_MIGRATE_V3_TO_V4),
    _script(_MIGRATE_V4_TO_V5),
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

# --------------------------------------------------------------------------- helpers


def _wire(instant: datetime) -> str:
    return to_wire(instant)


def _wire_opt(instant: datetime | None) -> str | None:
    return None if instant is None else to_wire(instant)


@functools.lru_cache(maxsize=4096)
def _instant(text: str) -> datetime:
    # Cached: rows share instants (a start anchors every new job at the same second), and
    # reading 10,000 job rows otherwise spends most of its time parsing them.
    try:
        return parse_instant(text)
    except ValueError as exc:
        raise StateError(
            f"state database holds a malformed instant {text!r}; the file was edited by hand "
            "or is damaged"
        ) from exc


def _instant_opt(text: str | None) -> datetime | None:
    return None if text is None else _instant(text)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise StateError(
            f"refusing {kind} {name!r} as a file name: it must match "
            "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
        )
    return name


def _check_choice(kind: str, value: str, allowed: frozenset[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {', '.join(sorted(allowed))}")


_HINTS: Final = {
    "SQLITE_BUSY": "another process holds the state database; retry shortly",
    "SQLITE_LOCKED": "another process holds the state database; retry shortly",
    "SQLITE_READONLY": "the state database or its directory is not writable; check permissions",
    "SQLITE_FULL": "the disk holding the state directory is full; free some space",
    "SQLITE_IOERR": "the disk holding the state directory failed; check the file system",
    "SQLITE_CANTOPEN": "check that the state directory exists and is writable",
    "SQLITE_CORRUPT": "the state database is damaged; move it aside to start afresh",
    "SQLITE_NOTADB": "the state database is not an SQLite file; move it aside to start afresh",
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _state_error(path: Path, action: str, exc: BaseException) -> StateError:
    reason = _one_line(str(exc)) or type(exc).__name__
    name = getattr(exc, "sqlite_errorname", "") or ""
    hint = next((h for code, h in _HINTS.items() if name.startswith(code)), "")
    if not hint and isinstance(exc, OSError):
        hint = "check the state directory's permissions and free space"
    message = f"state database {path}: {action} failed: {reason}"
    return StateError(f"{message}; {hint}" if hint else message)


# --------------------------------------------------------------------------- StateDB


class StateDB:
    """The runtime state of one chronosd installation (one state directory)."""

    def __init__(
        self, conn: sqlite3.Connection, state_dir: Path, *, owner: str, read_only: bool
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self.owner = owner
        self.read_only = read_only
        self._synced_inode: int | None = None  # the WAL file whose directory entry was synced
        self._nonce_purge_at = 0.0  # time.monotonic() of the next delete of expired nonces
        self._busy_timeout = DEFAULT_BUSY_TIMEOUT
        self._checkpointer: sqlite3.Connection | None = None  # see checkpoint_passive

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        owner: str | None = None,
        read_only: bool = False,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> StateDB:
        """Open (and create and migrate, unless ``read_only``) ``state_dir/state.db``.

        ``owner`` names this process in claims and runs (default owner_token()).
        ``read_only`` opens with SQLite's ``mode=ro`` for views such as
        ``chronosd list`` run by a user who may not write the state.
        """
        state_dir = Path(state_dir)
        path = state_dir / DB_NAME
        try:
            if read_only:
                conn = sqlite3.connect(
                    f"{path.absolute().as_uri()}?mode=ro",
                    uri=True,
                    timeout=busy_timeout,
                    isolation_level=None,
                )
            else:
                make_private_dir(state_dir)
                _make_private_file(path)
                conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise _state_error(path, "opening", exc) from exc
        db = cls(conn, state_dir, owner=owner or owner_token(), read_only=read_only)
        try:
            db._configure(busy_timeout)
            if read_only:
                db._check_version()
            else:
                db._migrate()
        except BaseException:
            db.close()
            raise
        return db

    def _configure(self, busy_timeout: float) -> None:
        self._busy_timeout = busy_timeout
        conn = self._db
        with self._guard("configuring"):
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("PRAGMA synchronous = NORMAL")
            if self.read_only:
                return
            deadline = time.monotonic() + busy_timeout
            while True:
                try:
                    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
                    break
                except sqlite3.OperationalError as exc:
                    # Turning a new database to WAL needs it alone, and SQLite answers "locked"
                    # at once, without waiting out busy_timeout, while another process is
                    # creating or migrating it (two daemons, or a daemon and `chronosd fire`,
                    # started on a new state directory).
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise StateError(
                f"state database {self.path}: cannot use WAL mode (journal mode is {mode}); "
                "put the state directory on a local file system"
            )

    def _user_version(self) -> int:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return int(version)

    def _check_version(self) -> None:
        with self._guard("reading the schema version"):
            version = self._user_version()
        if version != SCHEMA_VERSION:
            raise StateError(
                f"state database {self.path}: schema version {version}, this chronosd reads "
                f"version {SCHEMA_VERSION}; start the daemon once to migrate it"
            )

    def _migrate(self) -> None:
        with self._guard("reading the schema version"):
            version = self._user_version()
        if version == SCHEMA_VERSION:
            return
        while True:
            # Re-read inside the write lock: another process may have migrated meanwhile.
            with self._write("migrating the schema") as conn:
                version = self._user_version()
                if version > SCHEMA_VERSION:
                    raise StateError(
                        f"state database {self.path}: schema version {version} is newer than "
                        f"this chronosd supports ({SCHEMA_VERSION}); upgrade chronosd or use "
                        "another state directory"
                    )
                if version == SCHEMA_VERSION:
                    return
                _MIGRATIONS[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1}")
            _log().info(
                "state.migrated", path=str(self.path), from_version=version, to_version=version + 1
            )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        checkpointer, self._checkpointer = self._checkpointer, None
        for each in (checkpointer, conn):
            if each is not None:
                with contextlib.suppress(sqlite3.Error):
                    each.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- plumbing

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"state database {self.path} is closed; this is a bug in chronosd")
        return self._conn

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise _state_error(self.path, action, exc) from exc

    @contextlib.contextmanager
    def _write(self, action: str, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: all of it or none of it.

        ``durable`` fsyncs the commit (``synchronous=FULL``) before returning.
        """
        conn = self._db
        with self._guard(action), self._synchronous(durable):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (SQLITE_FULL, IOERR).
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _synchronous(self, durable: bool) -> Iterator[None]:
        if not durable:
            yield
            return
        conn = self._db
        conn.execute("PRAGMA synchronous = FULL")
        try:
            yield
        finally:
            conn.execute("PRAGMA synchronous = NORMAL")

    def _run_log(self, job_id: str, run_id: str) -> tuple[Path, str]:
        relative = f"{RUNS_DIR}/{_check_name('job id', job_id)}/{_check_name('run id', run_id)}.log"
        return self.state_dir / relative, relative

    def _resolve(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.state_dir / path

    # ----------------------------------------------------------------- job state

    _JOB_SELECT: Final = "SELECT " + ", ".join(_JOB_FIELDS) + " FROM job_state"

    @staticmethod
    def _job(row: Sequence[Any]) -> JobState:
        return JobState(
            job_id=row[0],
            spec_hash=row[1],
            schedule_key=row[2],
            anchor=_instant(row[3]),
            next_fire=_instant_opt(row[4]),
            armed_fire=_instant_opt(row[5]),
            armed_confirmed_at=_instant_opt(row[6]),
            runs_started=int(row[7]),
            last_run_id=row[8],
            last_status=row[9],
            completed=bool(row[10]),
        )

    def get_job(self, job_id: str) -> JobState | None:
        with self._guard("reading job state"):
            row = self._db.execute(self._JOB_SELECT + " WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def all_jobs(self) -> dict[str, JobState]:
        with self._guard("reading job state"):
            rows = self._db.execute(self._JOB_SELECT + " ORDER BY job_id").fetchall()
        return {row[0]: self._job(row) for row in rows}

    def job_summaries(self, job_ids: Iterable[str] | None = None) -> dict[str, JobSummary]:
        """What applying jobs.json compares for every job (or those of ``job_ids``), without
        building whole states (a tenth of all_jobs()'s cost for 10,000 jobs)."""
        sql = (
            "SELECT job_id, spec_hash, schedule_key, next_fire IS NOT NULL, completed "
            "FROM job_state"
        )
        with self._guard("reading job state"):
            if job_ids is None:
                rows = self._db.execute(sql).fetchall()
            else:
                rows = [
                    row
                    for job_id in job_ids
                    for row in self._db.execute(sql + " WHERE job_id = ?", (job_id,))
                ]
        return {row[0]: JobSummary(row[1], row[2], bool(row[3]), bool(row[4])) for row in rows}

    def arm_states(self) -> dict[str, ArmState]:
        """Every job's planned and armed fire, without building whole states."""
        with self._guard("reading job state"):
            rows = self._db.execute(
                "SELECT job_id, next_fire, armed_fire, armed_confirmed_at FROM job_state"
            ).fetchall()
        return {
            row[0]: ArmState(_instant_opt(row[1]), _instant_opt(row[2]), _instant_opt(row[3]))
            for row in rows
        }

    def jobs_due(self, now: datetime) -> dict[str, JobState]:
        """Jobs whose planned fire is at or before ``now``."""
        # Instants are stored in one fixed-width UTC form, so text order is time order.
        with self._guard("reading job state"):
            rows = self._db.execute(
                self._JOB_SELECT
                + " WHERE next_fire IS NOT NULL AND next_fire <= ? ORDER BY job_id",
                (_wire(now),),
            ).fetchall()
        return {row[0]: self._job(row) for row in rows}

    _PUT_JOB: Final = (
        f"INSERT INTO job_state ({', '.join(_JOB_FIELDS)}) "
        f"VALUES ({', '.join('?' * len(_JOB_FIELDS))}) "
        "ON CONFLICT (job_id) DO UPDATE SET "
        + ", ".join(f"{name} = excluded.{name}" for name in _JOB_FIELDS[1:])
    )

    def put_job(self, js: JobState) -> None:
        """Insert or replace the whole state of one job."""
        self.put_jobs([js])

    def put_jobs(self, states: Sequence[JobState]) -> None:
        """Insert or replace the whole state of each job, in one transaction (a first start
        plans thousands: one commit each was most of its time)."""
        rows = [[_job_value(name, getattr(js, name)) for name in _JOB_FIELDS] for js in states]
        if len(rows) == 1:
            with self._guard("saving job state"):
                self._db.execute(self._PUT_JOB, rows[0])
        elif rows:
            with self._write("saving job state") as conn:
                conn.executemany(self._PUT_JOB, rows)

    def update_job(self, job_id: str, /, **fields: Any) -> None:
        """Change some JobState fields of one job.

        A job whose state was deleted meanwhile stays deleted (no-op): the
        removal is the newer fact.
        """
        unknown = set(fields) - _JOB_UPDATABLE
        if unknown:
            raise ValueError(f"update_job: unknown JobState fields {sorted(unknown)}")
        if not fields:
            return
        names = sorted(fields)
        assignments = ", ".join(f"{name} = ?" for name in names)
        values = [_job_value(name, fields[name]) for name in names]
        with self._guard("updating job state"):
            self._db.execute(
                f"UPDATE job_state SET {assignments} WHERE job_id = ?", [*values, job_id]
            )

    def delete_job(self, job_id: str) -> None:
        """Forget a job's state; its occurrences and runs stay as history."""
        with self._guard("deleting job state"):
            self._db.execute("DELETE FROM job_state WHERE job_id = ?", (job_id,))

    # ----------------------------------------------------------------- occurrences

    _OCC_SELECT: Final = (
        'SELECT job_id, scheduled_at, state, owner, "trigger", claimed_at, updated_at '
        "FROM occurrences"
    )
    _OCC_INSERT: Final = (
        'INSERT INTO occurrences (job_id, scheduled_at, state, owner, "trigger", claimed_at, '
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
    )

    @staticmethod
    def _occurrence(row: Sequence[Any]) -> Occurrence:
        return Occurrence(
            job_id=row[0],
            scheduled_at=_instant(row[1]),
            state=row[2],
            owner=row[3],
            trigger=row[4],
            claimed_at=_instant(row[5]),
            updated_at=_instant(row[6]),
        )

    @staticmethod
    def _occ_values(
        job_id: str, scheduled_at: datetime, state: str, owner: str, trigger: str, now: datetime
    ) -> tuple[str, ...]:
        _check_choice("occurrence state", state, OCCURRENCE_STATES)
        _check_choice("trigger", trigger, TRIGGERS)
        stamp = _wire(now)
        return (job_id, _wire(scheduled_at), state, owner, trigger, stamp, stamp)

    def claim(
        self,
        job_id: str,
        scheduled_at: datetime,
        *,
        owner: str,
        trigger: str,
        now: datetime,
        state: str = "claimed",
    ) -> bool:
        """Insert the occurrence row; True when this call inserted it (won the claim).

        Also records skipped or missed occurrences (``state="skipped"``/``"missed"``),
        which then can never be claimed to run.
        """
        values = self._occ_values(job_id, scheduled_at, state, owner, trigger, now)
        with self._guard("claiming an occurrence"), self._synchronous(durable=True):
            cursor = self._db.execute(self._OCC_INSERT, values)
        return cursor.rowcount == 1

    def claim_and_advance(
        self,
        job_id: str,
        scheduled_at: datetime,
        *,
        owner: str,
        trigger: str,
        now: datetime,
        next_fire: datetime | None,
        runs_started_inc: int = 1,
        completed: bool = False,
        durable: bool = True,
    ) -> bool:
        """Claim an occurrence and plan the job's next fire, atomically.

        Returns whether the occurrence was inserted; when it was not (someone
        else claimed it), the job state is left alone. Raises StateError, with
        nothing written, when the job has no state row. ``durable=False``
        leaves the fsync to the caller (see SyncGroup).
        """
        values = self._occ_values(job_id, scheduled_at, "claimed", owner, trigger, now)
        with self._write("claiming an occurrence", durable=durable) as conn:
            if conn.execute(self._OCC_INSERT, values).rowcount != 1:
                return False
            advanced = conn.execute(
                "UPDATE job_state SET next_fire = ?, runs_started = runs_started + ?, "
                "completed = ? WHERE job_id = ?",
                (_wire_opt(next_fire), runs_started_inc, int(completed), job_id),
            ).rowcount
            if advanced != 1:
                raise StateError(
                    f"cannot claim {job_id}@{_wire(scheduled_at)}: the job has no state row "
                    "(removed meanwhile?); nothing was claimed"
                )
        return True

    def claim_advance_and_start(
        self,
        job_id: str,
        scheduled_at: datetime,
        *,
        owner: str,
        trigger: str,
        now: datetime,
        next_fire: datetime | None,
        completed: bool = False,
        attempt: int = 1,
        durable: bool = True,
    ) -> RunRecord | None:
        """claim_and_advance and start_run in one transaction; None when already claimed.

        Either the occurrence is claimed, the next fire planned and the run recorded, or
        nothing is written: a failure can never leave a claim without its run.
        ``durable=False`` leaves the fsync to the caller (see SyncGroup).

        The occurrence is inserted running and owned by this database's owner, who records
        the run (as start_run would leave it); ``owner`` keeps claim_and_advance's shape.
        """
        del owner
        _check_choice("trigger", trigger, TRIGGERS)
        _check_name("job id", job_id)
        values = self._occ_values(job_id, scheduled_at, "running", self.owner, trigger, now)
        scheduled = _wire(scheduled_at)

        def claim_and_advance(conn: sqlite3.Connection) -> bool:
            if conn.execute(self._OCC_INSERT, values).rowcount != 1:
                return False
            advanced = conn.execute(
                "UPDATE job_state SET next_fire = ?, runs_started = runs_started + 1, "
                "completed = ? WHERE job_id = ?",
                (_wire_opt(next_fire), int(completed), job_id),
            ).rowcount
            if advanced != 1:
                raise StateError(
                    f"cannot claim {job_id}@{scheduled}: the job has no state row "
                    "(removed meanwhile?); nothing was claimed"
                )
            return True

        return self._create_run(
            job_id,
            scheduled_at,
            attempt=attempt,
            trigger=trigger,
            now=now,
            action="claiming an occurrence",
            durable=durable,
            first=claim_and_advance,
            inserted_running=True,
        )

    def undo_claim(
        self,
        job_id: str,
        scheduled_at: datetime,
        *,
        run_id: str | None,
        planned: datetime | None,
        next_fire: datetime | None,
        completed: bool,
    ) -> None:
        """Take back a claim whose fsync failed, in one transaction.

        Deletes the occurrence and its run (and the run's log, if any), counts the start back,
        and restores ``next_fire``/``completed`` to what they were before the claim
        (``next_fire``, ``completed``) unless something re-planned the job meanwhile
        (``next_fire`` is no longer ``planned``, the value the claim wrote).
        """
        scheduled = _wire(scheduled_at)
        log_path: str | None = None
        with self._write("undoing a claim") as conn:
            if run_id is not None:
                row = conn.execute(
                    "DELETE FROM runs WHERE run_id = ? RETURNING output_path", (run_id,)
                ).fetchone()
                log_path = None if row is None else str(row[0])
            conn.execute(
                "DELETE FROM occurrences WHERE job_id = ? AND scheduled_at = ?", (job_id, scheduled)
            )
            conn.execute(
                "UPDATE job_state SET runs_started = MAX(runs_started - 1, 0) WHERE job_id = ?",
                (job_id,),
            )
            conn.execute(
                "UPDATE job_state SET next_fire = ?, completed = ? "
                "WHERE job_id = ? AND next_fire IS ?",
                (_wire_opt(next_fire), int(completed), job_id, _wire_opt(planned)),
            )
        if log_path is not None:
            with contextlib.suppress(OSError):
                self._resolve(log_path).unlink()

    def sync_wal(self) -> None:
        """fsync the write-ahead log: every transaction committed before the call is durable
        when it returns, as if it had been committed with ``synchronous=FULL``.

        Touches no SQLite connection, so it may run in a worker thread (SyncGroup does).
        """
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            try:
                fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # No log yet (nothing written since the last connection closed): the commits
                # are in the database file itself.
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
                inode = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            if inode != self._synced_inode:
                # A newly created log is durable only once its directory entry is (SQLite's own
                # FULL commit syncs the directory once for a new log as well).
                dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
                self._synced_inode = inode
        except OSError as exc:
            raise _state_error(self.path, "syncing the write-ahead log", exc) from exc

    def defer_checkpoints(self, pages: int = DEFERRED_CHECKPOINT_PAGES) -> None:
        """Let this connection's commits checkpoint the write-ahead log only once it holds
        *pages* pages (SQLite's default is 1,000), for a caller that runs checkpoint_passive
        off the event loop meanwhile (the daemon, after group-commit rounds)."""
        with self._guard("configuring checkpoints"):
            self._db.execute(f"PRAGMA wal_autocheckpoint = {int(pages)}")

    def checkpoint_passive(self) -> None:
        """Copy committed pages of the write-ahead log into the database (``PRAGMA
        wal_checkpoint(PASSIVE)``: it waits for no reader or writer) on a connection of its
        own, so it may run in a worker thread while this StateDB is used elsewhere; one call
        at a time. Raises StateError."""
        if self.read_only or self._conn is None:
            return
        try:
            conn = self._checkpointer
            if conn is None:
                conn = sqlite3.connect(
                    str(self.path),
                    timeout=self._busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                conn.execute("PRAGMA synchronous = NORMAL")
                self._checkpointer = conn
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            raise _state_error(self.path, "checkpointing the write-ahead log", exc) from exc

    def get_occurrence(self, job_id: str, scheduled_at: datetime) -> Occurrence | None:
        with self._guard("reading an occurrence"):
            row = self._db.execute(
                self._OCC_SELECT + " WHERE job_id = ? AND scheduled_at = ?",
                (job_id, _wire(scheduled_at)),
            ).fetchone()
        return None if row is None else self._occurrence(row)

    def set_occurrence_state(
        self, job_id: str, scheduled_at: datetime, state: str, *, now: datetime
    ) -> None:
        """Move a recorded occurrence to ``state``; StateError when it was never claimed."""
        _check_choice("occurrence state", state, OCCURRENCE_STATES)
        with self._guard("updating an occurrence"):
            changed = self._db.execute(
                "UPDATE occurrences SET state = ?, updated_at = ? "
                "WHERE job_id = ? AND scheduled_at = ?",
                (state, _wire(now), job_id, _wire(scheduled_at)),
            ).rowcount
        if changed != 1:
            raise StateError(
                f"occurrence {job_id}@{_wire(scheduled_at)} was never claimed; claim it first"
            )

    def _listing(
        self, action: str, select: str, order: str, job_id: str | None, limit: int
    ) -> list[Any]:
        """Rows of ``select``, of one job or of all, in ``order``, at most ``limit``."""
        where, params = ("", (limit,)) if job_id is None else (" WHERE job_id = ?", (job_id, limit))
        with self._guard(action):
            return self._db.execute(f"{select}{where} {order} LIMIT ?", params).fetchall()

    def occurrences(self, job_id: str | None = None, limit: int = 100) -> list[Occurrence]:
        """Recorded occurrences, latest scheduled instant first."""
        rows = self._listing(
            "reading occurrences",
            self._OCC_SELECT,
            "ORDER BY scheduled_at DESC" + (", job_id" if job_id is None else ""),
            job_id,
            limit,
        )
        return [self._occurrence(row) for row in rows]

    def prune_occurrences(self, *, before: datetime) -> int:
        """Delete finished occurrences scheduled before ``before``; returns how many.

        Only rows no longer needed to refuse a repeated delivery should go:
        the caller picks ``before`` well behind every job's planned fire.
        """
        with self._guard("pruning occurrences"):
            return self._db.execute(
                "DELETE FROM occurrences WHERE scheduled_at < ? "
                "AND state NOT IN ('claimed', 'running')",
                (_wire(before),),
            ).rowcount

    # ----------------------------------------------------------------- runs

    _RUN_SELECT: Final = (
        'SELECT run_id, job_id, scheduled_at, attempt, "trigger", pid, started_at, ended_at, '
        "exit_code, status, output_path, output_bytes, owner FROM runs"
    )

    def _record(self, row: Sequence[Any]) -> RunRecord:
        return RunRecord(
            run_id=row[0],
            job_id=row[1],
            scheduled_at=_instant(row[2]),
            attempt=int(row[3]),
            trigger=row[4],
            pid=row[5],
            started_at=_instant(row[6]),
            ended_at=_instant_opt(row[7]),
            exit_code=row[8],
            status=row[9],
            output_path=self._resolve(row[10]),
            output_bytes=int(row[11]),
            owner=row[12],
        )

    def start_run(
        self, job_id: str, scheduled_at: datetime, *, attempt: int, trigger: str, now: datetime
    ) -> RunRecord:
        """Record a run as started (status ``running``); its log is created when it starts.

        The occurrence moves to ``running`` and to this process as owner, so
        recovery follows whoever actually runs it (a retry may run elsewhere).
        """
        _check_choice("trigger", trigger, TRIGGERS)
        _check_name("job id", job_id)
        run = self._create_run(
            job_id,
            scheduled_at,
            attempt=attempt,
            trigger=trigger,
            now=now,
            action="recording a run",
            durable=False,
            first=None,
        )
        assert run is not None
        return run

    def _create_run(
        self,
        job_id: str,
        scheduled_at: datetime,
        *,
        attempt: int,
        trigger: str,
        now: datetime,
        action: str,
        durable: bool,
        first: Callable[[sqlite3.Connection], bool] | None,
        inserted_running: bool = False,
    ) -> RunRecord | None:
        """Record the run, in one transaction with ``first`` (which may decline: then nothing
        is written and None is returned). ``inserted_running``: ``first`` inserted the
        occurrence as running, by this owner, at ``now``; else it is marked so here.

        Only the log's path is recorded: the runner creates the file (and its directory) when
        the run starts, so a claim costs no file-system work and a run claimed but not started
        has no log file yet (readers take a missing log as an empty one).
        """
        stamp, scheduled = _wire(now), _wire(scheduled_at)
        started = _instant(stamp)
        prefix = started.strftime("%Y%m%dT%H%M%SZ")
        with self._write(action, durable=durable) as conn:
            if first is not None and not first(conn):
                return None
            for _ in range(8):
                run_id = f"{prefix}-{os.urandom(4).hex()}"
                path, relative = self._run_log(job_id, run_id)
                # A log left behind by a deleted run (a crash between a prune's commit and
                # its unlink) must not be appended to: its name counts as taken.
                if os.path.lexists(path):
                    continue
                inserted = conn.execute(
                    'INSERT INTO runs (run_id, job_id, scheduled_at, attempt, "trigger", '
                    "owner, started_at, status, output_path, output_bytes) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, 0) ON CONFLICT (run_id) DO NOTHING",
                    (run_id, job_id, scheduled, attempt, trigger, self.owner, stamp, relative),
                ).rowcount
                if inserted == 1:
                    break
            else:
                raise StateError(
                    f"could not pick an unused run id under {path.parent}; check the clock"
                )
            if not inserted_running:
                conn.execute(
                    "UPDATE occurrences SET state = 'running', owner = ?, updated_at = ? "
                    "WHERE job_id = ? AND scheduled_at = ?",
                    (self.owner, stamp, job_id, scheduled),
                )
        return RunRecord(
            run_id=run_id,
            job_id=job_id,
            scheduled_at=_instant(scheduled),
            attempt=attempt,
            trigger=trigger,
            pid=None,
            started_at=started,
            ended_at=None,
            exit_code=None,
            status="running",
            output_path=path,
            output_bytes=0,
            owner=self.owner,
        )

    def run_log_path(self, job_id: str, run_id: str) -> Path:
        """Where the log of a run this process recorded is (the ``output_path`` of its
        RunRecord), without reading the database."""
        return self._run_log(job_id, run_id)[0]

    def set_run_pid(self, run_id: str, pid: int, *, started_at: datetime | None = None) -> None:
        """Record the pid of a run's process, and when given, when it really started (a run
        recorded at an early claim starts at its instant, not at the claim).

        With ``started_at`` the run's occurrence is also marked ``running`` as of that instant,
        in the same transaction (the claim already moved it to ``running``; this dates it).
        """
        if started_at is None:
            with self._guard("recording a run's pid"):
                self._db.execute("UPDATE runs SET pid = ? WHERE run_id = ?", (pid, run_id))
            return
        stamp = _wire(started_at)
        with self._write("recording a run's pid") as conn:
            row = conn.execute(
                "UPDATE runs SET pid = ?, started_at = ? WHERE run_id = ? "
                "RETURNING job_id, scheduled_at",
                (pid, stamp, run_id),
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE occurrences SET state = 'running', updated_at = ? "
                    "WHERE job_id = ? AND scheduled_at = ?",
                    (stamp, row[0], row[1]),
                )

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        exit_code: int | None,
        now: datetime,
        output_bytes: int,
    ) -> None:
        """Record the end of a run; also the job's last run and the occurrence's state."""
        _check_choice("run status", status, RUN_STATUSES)
        with self._write("recording the end of a run") as conn:
            row = conn.execute(
                "UPDATE runs SET status = ?, exit_code = ?, ended_at = ?, output_bytes = ? "
                "WHERE run_id = ? RETURNING job_id, scheduled_at",
                (status, exit_code, _wire(now), output_bytes, run_id),
            ).fetchone()
            if row is None:
                raise StateError(f"run {run_id} was never recorded; cannot finish it")
            self._after_run(conn, row[0], row[1], run_id, status, _wire(now))

    @staticmethod
    def _after_run(
        conn: sqlite3.Connection, job_id: str, scheduled: str, run_id: str, status: str, stamp: str
    ) -> None:
        conn.execute(
            "UPDATE job_state SET last_run_id = ?, last_status = ? WHERE job_id = ?",
            (run_id, status, job_id),
        )
        occurrence_state = {"ok": "done", "interrupted": "interrupted"}.get(status, "failed")
        conn.execute(
            "UPDATE occurrences SET state = ?, updated_at = ? "
            "WHERE job_id = ? AND scheduled_at = ?",
            (occurrence_state, stamp, job_id, scheduled),
        )

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._guard("reading a run"):
            row = self._db.execute(self._RUN_SELECT + " WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else self._record(row)

    def runs(self, job_id: str | None = None, limit: int = 20) -> list[RunRecord]:
        """Run history, newest (most recently started) first."""
        rows = self._listing("reading runs", self._RUN_SELECT, "ORDER BY seq DESC", job_id, limit)
        return [self._record(row) for row in rows]

    def running_runs(self) -> list[RunRecord]:
        """Runs not finished yet, oldest first."""
        with self._guard("reading runs"):
            rows = self._db.execute(
                self._RUN_SELECT + " WHERE status = 'running' ORDER BY seq"
            ).fetchall()
        return [self._record(row) for row in rows]

    def prune_runs(self, job_id: str, keep: int) -> int:
        """Delete a job's finished runs beyond the newest ``keep``, rows and logs.

        Running runs are never deleted (they still count among the newest).
        Returns the number of runs deleted.
        """
        _check_name("job id", job_id)
        with self._write("pruning runs") as conn:
            doomed = [
                run_id
                for run_id, status in conn.execute(
                    "SELECT run_id, status FROM runs WHERE job_id = ? ORDER BY seq DESC "
                    "LIMIT -1 OFFSET ?",
                    (job_id, max(keep, 0)),
                )
                if status != "running"
            ]
            conn.executemany("DELETE FROM runs WHERE run_id = ?", [(r,) for r in doomed])
        # Logs go after the commit: a crash in between leaves an orphan file,
        # never a run row pointing at a deleted log.
        for run_id in doomed:
            try:
                path, _ = self._run_log(job_id, run_id)
                path.unlink(missing_ok=True)
            except (OSError, StateError) as exc:
                _log().warning(
                    "run_log.delete_failed", job_id=job_id, run_id=run_id, error=str(exc)
                )
        return len(doomed)

    def recover_interrupted(
        self, *, now: datetime, is_alive: Callable[[str], bool]
    ) -> list[RunRecord]:
        """Mark work left behind by dead owners as ``interrupted``; return those runs.

        Runs still ``running`` and occurrences still ``claimed``/``running``
        whose owner ``is_alive`` says is dead become ``interrupted`` (claimed
        occurrences without a run included). Whether to run them again is the
        caller's decision (only with ``retries``).
        """
        stamp = _wire(now)
        verdicts: dict[str, bool] = {}

        def dead(owner: str) -> bool:
            if owner not in verdicts:
                verdicts[owner] = is_alive(owner)
            return not verdicts[owner]

        with self._write("recovering interrupted runs") as conn:
            runs = conn.execute(
                "SELECT run_id, job_id, scheduled_at, owner FROM runs "
                "WHERE status = 'running' ORDER BY seq"
            ).fetchall()
            rows = []
            for run_id, job_id, scheduled, owner in runs:
                if not dead(owner):
                    continue
                conn.execute(
                    "UPDATE runs SET status = 'interrupted', ended_at = ? WHERE run_id = ?",
                    (stamp, run_id),
                )
                self._after_run(conn, job_id, scheduled, run_id, "interrupted", stamp)
                rows.append(
                    conn.execute(self._RUN_SELECT + " WHERE run_id = ?", (run_id,)).fetchone()
                )
            # Claims whose process died before it recorded a run.
            claims = conn.execute(
                "SELECT job_id, scheduled_at, owner FROM occurrences "
                "WHERE state IN ('claimed', 'running')"
            ).fetchall()
            for job_id, scheduled, owner in claims:
                if dead(owner):
                    conn.execute(
                        "UPDATE occurrences SET state = 'interrupted', updated_at = ? "
                        "WHERE job_id = ? AND scheduled_at = ?",
                        (stamp, job_id, scheduled),
                    )
        records = [self._record(row) for row in rows]
        for record in records:
            _log().warning(
                "run.interrupted", job_id=record.job_id, run_id=record.run_id, owner=record.owner
            )
        return records

    # ----------------------------------------------------------------- meta

    def get_meta(self, key: str) -> str | None:
        with self._guard("reading meta"):
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        """Set a meta value; None deletes the key."""
        with self._guard("writing meta"):
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    # ----------------------------------------------------------------- replay cache

    def remember_nonce(self, nonce: str, *, expires: datetime, now: datetime) -> bool:
        """Record a token id (or a rate-limit slot); False when it is held and not expired.

        One statement (its own transaction): a nonce held only by an expired row takes that
        row over.
        """
        with self._guard("checking the replay cache"):
            recorded = self._db.execute(
                "INSERT INTO nonces (nonce, expires) VALUES (?, ?) "
                "ON CONFLICT (nonce) DO UPDATE SET expires = excluded.expires "
                "WHERE nonces.expires <= ?",
                (nonce, _wire(expires), _wire(now)),
            ).rowcount
            self._purge_replay_cache(now)
        return recorded == 1

    def remember_signature(self, signature: str, *, expires: datetime, now: datetime) -> bool:
        """Record a verified signature; False when it was recorded before (a replay).

        ``expires`` must follow from what the signature covers (its ``t`` plus the tolerance),
        so that a replay presents the same (expires, signature) key and the primary key refuses
        it in one statement.
        """
        with self._guard("checking the replay cache"):
            recorded = self._db.execute(
                "INSERT INTO signatures (expires, signature) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (_wire(expires), signature),
            ).rowcount
            self._purge_replay_cache(now)
        return recorded == 1

    def _purge_replay_cache(self, now: datetime) -> None:
        # Every fire checks the cache, and a delete per check was half its cost: expired rows
        # are deleted at most every NONCE_PURGE_EVERY seconds.
        clock = time.monotonic()
        if clock >= self._nonce_purge_at:
            self._nonce_purge_at = clock + NONCE_PURGE_EVERY
            stamp = _wire(now)
            self._db.execute("DELETE FROM nonces WHERE expires <= ?", (stamp,))
            self._db.execute("DELETE FROM signatures WHERE expires <= ?", (stamp,))


def _job_value(name: str, value: Any) -> Any:
    if name in _JOB_INSTANT_FIELDS:
        if name == "anchor" and value is None:
            raise ValueError("JobState.anchor cannot be None")
        return _wire_opt(value)
    if name == "completed":
        return int(bool(value))
    return value


# --------------------------------------------------------------------------- group commit


class _Round:
    __slots__ = ("done", "error", "waiters")

    def __init__(self, done: Any) -> None:
        self.done = done  # an anyio.Event, set once the round's fsync has returned or failed
        self.error: BaseException | None = None
        self.waiters = 1  # callers served (each committed before it waited: a claim, mostly)


class SyncGroup:
    """Group commit: one ``sync`` (StateDB.sync_wal) in a worker thread serves every caller
    of ``wait`` that arrived before it began.

    ``wait`` returns once a sync that *started after the call* has succeeded, so whatever
    the caller committed before calling is durable. Callers that arrive while a sync runs
    share the next one; at most one sync runs at a time. Raises StateError when the sync
    failed (the caller must then not treat its commits as durable).
    """

    def __init__(
        self,
        sync: Callable[[], None],
        *,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_every: float = CHECKPOINT_EVERY,
        checkpoint_after: int = CHECKPOINT_AFTER,
    ) -> None:
        """``checkpoint`` (StateDB.checkpoint_passive), when given, runs in a worker thread
        after a successful round once ``checkpoint_after`` callers were served since the last
        one, at most every ``checkpoint_every`` seconds, one at a time: in a burst, the pages
        the claims wrote reach the database off the event loop, instead of in the commit
        that crosses SQLite's checkpoint threshold. Only the round's leader waits for it
        (its claim is already durable); a lone fire never does."""
        self._sync = sync
        self._checkpoint = checkpoint
        self._checkpoint_every = checkpoint_every
        self._checkpoint_after = checkpoint_after
        self._checkpoint_at = 0.0  # time.monotonic() before which no checkpoint starts
        self._served = 0  # callers served since the last checkpoint
        self._checkpointing = False
        self._open: _Round | None = None  # gathering callers, not started yet
        self._running: _Round | None = None
        self.rounds = 0  # syncs done, for tests and benchmarks
        self.checkpoints = 0  # checkpoints done, for tests and benchmarks

    async def wait(self) -> None:
        import anyio
        import anyio.to_thread

        round_ = self._open
        if round_ is not None:
            round_.waiters += 1
            await round_.done.wait()
        else:
            round_ = self._open = _Round(anyio.Event())
            # The first caller leads the round; the others wait on it, so it must complete
            # even if the leader's own caller is cancelled. A sync is bounded (one fsync).
            with anyio.CancelScope(shield=True):
                if self._running is not None:
                    await self._running.done.wait()
                self._open = None  # from here on, later commits need the next round
                self._running = round_
                try:
                    await anyio.to_thread.run_sync(self._sync)
                except Exception as exc:
                    round_.error = exc
                finally:
                    self._running = None
                    self.rounds += 1
                    round_.done.set()
                if round_.error is None:
                    self._served += round_.waiters
                    await self._maybe_checkpoint()
        error = round_.error
        if error is not None:
            if isinstance(error, StateError):
                raise StateError(str(error)) from error
            reason = _one_line(str(error)) or type(error).__name__
            raise StateError(
                f"syncing the state database failed: {reason}; check the file system"
            ) from error

    async def _maybe_checkpoint(self) -> None:
        import anyio.to_thread

        checkpoint = self._checkpoint
        if (
            checkpoint is None
            or self._checkpointing
            or self._served < self._checkpoint_after
            or time.monotonic() < self._checkpoint_at
        ):
            return
        self._checkpointing = True
        self._served = 0
        try:
            await anyio.to_thread.run_sync(checkpoint)
            self.checkpoints += 1
        except StateError as exc:
            # Nothing is lost: the commits are durable in the log, and a later checkpoint
            # (or the connection's own, past its threshold) copies them.
            _log().warning("state.checkpoint_failed", error=str(exc))
        finally:
            self._checkpointing = False
            self._checkpoint_at = time.monotonic() + self._checkpoint_every


# --------------------------------------------------------------------------- files


def make_private_dir(path: Path) -> None:
    """Create a directory 0700 (whatever the umask), and its missing parents 0700 too.

    Existing directories are left as they are. Parents matter: whoever can write one could
    rename the state directory away and put their own in its place.
    """
    missing = []
    current = path
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)


def _make_private_file(path: Path) -> None:
    # SQLite gives the -wal and -shm files the mode of the database file, so
    # creating the database 0600 first keeps all three private.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def cap_output_file(path: Path, max_bytes: int) -> int:
    """Keep at most about ``max_bytes`` of a run log, its tail; returns the final size.

    A longer file is rewritten in place as ``[... N bytes truncated ...]\\n``
    followed by its last bytes, the whole at most ``max_bytes`` (unless the
    marker alone is longer). In place, so that a writer holding the file open
    with O_APPEND keeps appending to it.
    """
    try:
        with open(path, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size <= max_bytes:
                return size
            keep = max(max_bytes, 0)
            while True:
                marker = f"[... {size - keep} bytes truncated ...]\n".encode()
                fitted = max(max_bytes - len(marker), 0)
                if fitted >= keep:
                    break
                keep = fitted
            handle.seek(size - keep)
            tail = handle.read(keep)
            # Do not start the tail in the middle of a UTF-8 sequence.
            cut = 0
            while cut < len(tail) and cut < 3 and tail[cut] & 0xC0 == 0x80:
                cut += 1
            tail = tail[cut:]
            marker = f"[... {size - len(tail)} bytes truncated ...]\n".encode()
            handle.seek(0)
            handle.write(marker + tail)
            handle.truncate()
            return handle.tell()
    except OSError as exc:
        raise StateError(f"run log {path}: capping to {max_bytes} bytes failed: {exc}") from exc


# --------------------------------------------------------------------------- owners
#
# An owner is "host:pid:token". On Linux the token starts with the process's
# start time in clock ticks since boot (/proc/<pid>/stat field 22), so a pid
# reused by an unrelated process (common after a reboot or in a container) is
# not mistaken for the owner still being alive.

_owner_cache: tuple[int, str] | None = None


def _host() -> str:
    return os.uname().nodename


def _process_start(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of a process, or None when /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        # The command name (field 2) may contain spaces and parentheses.
        rest = data[data.rindex(b")") + 2 :].split()
        return rest[0].decode(), int(rest[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_token() -> str:
    """This process as an owner: ``host:pid:token``, the same for the process's lifetime."""
    global _owner_cache
    pid = os.getpid()
    if _owner_cache is None or _owner_cache[0] != pid:  # recomputed in a forked child
        start = _process_start(pid)
        token = os.urandom(4).hex()
        if start is not None:
            token = f"{start[1]}-{token}"
        _owner_cache = (pid, f"{_host()}:{pid}:{token}")
    return _owner_cache[1]


def owner_alive(owner: str) -> bool:
    """Whether the process named by ``owner`` may still be running.

    - Our own token: alive. Our pid with another token: a previous process
      that had our pid, so dead.
    - Another host: cannot be checked, assumed alive (its runs stay
      ``running`` until that host recovers them).
    - Same host: the pid must exist, not be a zombie and, when the token
      carries a start time, have started at that time. Without /proc, a
      reused pid makes a dead owner look alive.
    - An owner not in ``host:pid:token`` form was not written by us and cannot
      be checked; it counts as dead, so its work is not stuck forever.
    """
    if owner == owner_token():
        return True
    try:
        host, pid_text, token = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != _host():
        return True
    if pid <= 0 or pid == os.getpid():
        return False
    start = _process_start(pid)
    if start is not None:
        letter, ticks = start
        if letter in ("Z", "X"):
            return False
        head, sep, _ = token.partition("-")
        if sep and head.isdigit():
            return int(head) == ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _log() -> Any:
    from chronosd.log import get_logger

    return get_logger()
