"""The reference NAS's state: agents, arms, delivery attempts and dead letters, in SQLite.

One file, ``nas.db`` in the NAS state directory, in WAL mode so ``chronosd nas armed`` can read
while ``chronosd nas serve`` writes. Instants are Unix seconds (REAL); the ``fire_at`` an agent
sent is also kept verbatim, because it is echoed back in the fire call and the agent matches it
against the occurrence it armed.

Every arm carries a ``generation`` drawn from one counter for the whole database. A delivery
remembers the generation it started with and its outcome is written only while the arm still
has it, so an arm replaced (or cancelled and provisioned again) while its delivery was in flight
is neither deleted nor overwritten by the old delivery's result.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from chronosd.errors import StateError

DB_NAME = "nas.db"
SCHEMA_VERSION = 1
# Generations are taken from the shared counter this many at a time, so that a provision does
# not rewrite the counter's page (one more page in each commit) every time.
_GENERATION_BLOCK = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    callback_url TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS arms (
    agent TEXT NOT NULL,
    job_id TEXT NOT NULL,
    fire_at TEXT NOT NULL,
    fire_epoch REAL NOT NULL,
    callback_url TEXT NOT NULL,
    dedup_key TEXT,
    schedule_id TEXT NOT NULL,
    generation INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (agent, job_id)
);
CREATE INDEX IF NOT EXISTS arms_by_next_attempt ON arms (next_attempt_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    job_id TEXT NOT NULL,
    fire_at TEXT NOT NULL,
    schedule_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    attempted_at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries (attempted_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    job_id TEXT NOT NULL,
    fire_at TEXT NOT NULL,
    schedule_id TEXT NOT NULL,
    callback_url TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    dead_at REAL NOT NULL
);
"""

_ARM_COLUMNS = (
    "agent, job_id, fire_at, fire_epoch, callback_url, dedup_key, schedule_id, generation, "
    "attempts, next_attempt_at, last_status, last_error"
)


@dataclass(frozen=True)
class Agent:
    """An agent registered with the reference NAS."""

    name: str
    callback_url: str
    created_at: float


@dataclass(frozen=True)
class Arm:
    """One armed one-shot: at most one per (agent, job_id)."""

    agent: str
    job_id: str
    fire_at: str  # as the agent sent it
    fire_epoch: float
    callback_url: str
    dedup_key: str | None
    schedule_id: str
    generation: int
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None

    @property
    def key(self) -> tuple[str, str]:
        return self.agent, self.job_id


@dataclass(frozen=True)
class Delivery:
    """One attempt to deliver an arm; ``outcome`` is delivered, retry, dead or superseded."""

    agent: str
    job_id: str
    fire_at: str
    schedule_id: str
    attempt: int
    attempted_at: float
    status_code: int | None
    error: str | None
    outcome: str


@dataclass(frozen=True)
class DeadLetter:
    """An arm given up after max_delivery_age."""

    agent: str
    job_id: str
    fire_at: str
    schedule_id: str
    callback_url: str
    attempts: int
    last_status: int | None
    last_error: str | None
    dead_at: float


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt of *arm* came to, to be written by `NASStore.record`.

    ``kind`` is delivered (the arm goes), retry (tried again at ``next_attempt_at``) or dead
    (the arm moves to the dead letters).
    """

    arm: Arm
    kind: Literal["delivered", "retry", "dead"]
    attempt: int
    at: float
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None


@dataclass(frozen=True)
class Provisioned:
    """What a provision did: ``changed`` is False for a repeated dedup_key."""

    arm: Arm
    changed: bool
    replaced: bool


class AgentExistsError(StateError):
    """``agent add`` named an agent that is already registered."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class NASStore:
    """The NAS database. Not thread-safe: one instance per process, used from one thread."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        # Agents by token hash, valid while the database's data_version is _agents_version:
        # `chronosd nas agent ...` changes agents from another process.
        self._agents: dict[str, Agent] = {}
        self._agents_version: int | None = None
        self._next_generation = 0
        self._generation_limit = 0  # exclusive; a new block is reserved when reached
        self._reserving = False  # this transaction reserved a block; a rollback undoes it
        self._pending: list[Outcome] = []  # see defer()
        self._written: list[tuple[Outcome, bool]] = []

    @classmethod
    def open(cls, state_dir: Path) -> NASStore:
        path = state_dir / DB_NAME
        try:
            # Autocommit: every multi-statement change opens its own BEGIN IMMEDIATE.
            conn = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise StateError(
                f"NAS state database {path}: cannot open ({exc}); "
                "check the state directory and its permissions"
            ) from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL with synchronous=NORMAL stays consistent on power loss; it may lose the last
            # commits, which an agent's reconcile re-provisions.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0')")
            version = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            raise StateError(
                f"NAS state database {path}: cannot initialise ({exc}); "
                "move the file aside if it is not a chronosd NAS database"
            ) from exc
        if int(version) != SCHEMA_VERSION:
            conn.close()
            raise StateError(
                f"NAS state database {path}: schema version {version}, expected "
                f"{SCHEMA_VERSION}; use the chronosd version that created it"
            )
        return cls(conn, path)

    def close(self) -> None:
        try:
            self.flush()
        except sqlite3.Error:
            pass  # deliveries not recorded are made again by the next start: agents dedup
        finally:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that begins with the deferred outcomes (see `defer`)."""
        pending, self._pending = self._pending, []
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            applied = self._apply(self._conn, pending) if pending else []
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._pending[:0] = pending  # not written: kept for the next transaction
            if self._reserving:
                # The counter went back with the rollback: the block may be handed out again.
                self._next_generation = self._generation_limit = 0
            raise
        finally:
            self._reserving = False
        self._written += zip(pending, applied, strict=True)

    def _new_generation(self, conn: sqlite3.Connection) -> int:
        if self._next_generation >= self._generation_limit:
            last = int(
                conn.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + ? "
                    "WHERE key = 'generation' RETURNING value",
                    (_GENERATION_BLOCK,),
                ).fetchall()[0][0]
            )
            self._reserving = True
            self._next_generation, self._generation_limit = last - _GENERATION_BLOCK + 1, last + 1
        generation = self._next_generation
        self._next_generation += 1
        return generation

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the database."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    # -- agents ------------------------------------------------------------------------------

    def add_agent(
        self, name: str, callback_url: str, *, now: float, rotate_token: bool = False
    ) -> str:
        """Register *name* (or give it a new token); return the token, which is not stored."""
        token = new_token()
        with self._write() as conn:
            exists = conn.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone()
            if exists and not rotate_token:
                raise AgentExistsError(
                    f"agent {name!r} already exists; pass --rotate-token to issue a new token"
                )
            conn.execute(
                "INSERT INTO agents (name, token_sha256, callback_url, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "token_sha256 = excluded.token_sha256, callback_url = excluded.callback_url",
                (name, hash_token(token), callback_url, now),
            )
        self._agents_version = None
        return token

    def remove_agent(self, name: str) -> bool:
        self._agents_version = None
        with self._write() as conn:
            conn.execute("DELETE FROM arms WHERE agent = ?", (name,))
            return conn.execute("DELETE FROM agents WHERE name = ?", (name,)).rowcount > 0

    def agents(self) -> list[Agent]:
        rows = self._conn.execute(
            "SELECT name, callback_url, created_at FROM agents ORDER BY name"
        ).fetchall()
        return [Agent(row["name"], row["callback_url"], row["created_at"]) for row in rows]

    def agent_for_token(self, token: str) -> Agent | None:
        """The agent *token* belongs to; answered from memory while no other process wrote."""
        version = self.data_version()
        if version != self._agents_version:
            rows = self._conn.execute(
                "SELECT name, token_sha256, callback_url, created_at FROM agents"
            ).fetchall()
            self._agents = {
                row["token_sha256"]: Agent(row["name"], row["callback_url"], row["created_at"])
                for row in rows
            }
            self._agents_version = version
        return self._agents.get(hash_token(token))

    # -- arms --------------------------------------------------------------------------------

    def provision(
        self,
        agent: str,
        job_id: str,
        *,
        fire_at: str,
        fire_epoch: float,
        callback_url: str,
        dedup_key: str | None,
        now: float,
    ) -> Provisioned:
        """Arm (agent, job_id) at *fire_epoch*, replacing its arm; a known dedup_key is a no-op."""
        with self._write() as conn:
            row = conn.execute(
                f"SELECT {_ARM_COLUMNS} FROM arms WHERE agent = ? AND job_id = ?",
                (agent, job_id),
            ).fetchone()
            current = _arm(row) if row else None
            if current is not None and dedup_key is not None and current.dedup_key == dedup_key:
                return Provisioned(current, changed=False, replaced=False)
            arm = Arm(
                agent=agent,
                job_id=job_id,
                fire_at=fire_at,
                fire_epoch=fire_epoch,
                callback_url=callback_url,
                dedup_key=dedup_key,
                schedule_id=uuid.uuid4().hex,
                generation=self._new_generation(conn),
                attempts=0,
                next_attempt_at=fire_epoch,
                last_status=None,
                last_error=None,
            )
            conn.execute(
                "INSERT OR REPLACE INTO arms (agent, job_id, fire_at, fire_epoch, callback_url, "
                "dedup_key, schedule_id, generation, attempts, next_attempt_at, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (
                    arm.agent,
                    arm.job_id,
                    arm.fire_at,
                    arm.fire_epoch,
                    arm.callback_url,
                    arm.dedup_key,
                    arm.schedule_id,
                    arm.generation,
                    arm.next_attempt_at,
                    now,
                ),
            )
        return Provisioned(arm, changed=True, replaced=current is not None)

    def cancel(self, agent: str, job_id: str) -> bool:
        with self._write() as conn:
            deleted = conn.execute(
                "DELETE FROM arms WHERE agent = ? AND job_id = ?", (agent, job_id)
            ).rowcount
        return deleted > 0

    def armed(self, agent: str | None = None) -> list[Arm]:
        """Every arm (of *agent*), earliest fire first."""
        self.flush()
        where, params = ("WHERE agent = ?", (agent,)) if agent is not None else ("", ())
        rows = self._conn.execute(
            f"SELECT {_ARM_COLUMNS} FROM arms {where} ORDER BY fire_epoch, agent, job_id",
            params,
        ).fetchall()
        return [_arm(row) for row in rows]

    def count_armed(self) -> int:
        self.flush()
        return int(self._conn.execute("SELECT COUNT(*) FROM arms").fetchone()[0])

    def due(self, now: float, *, limit: int, skip_agents: Collection[str] = ()) -> list[Arm]:
        """Arms whose next attempt is at or before *now*, earliest first."""
        self.flush()
        where, params = _not_in("agent", skip_agents)
        rows = self._conn.execute(
            f"SELECT {_ARM_COLUMNS} FROM arms WHERE next_attempt_at <= ? {where} "
            "ORDER BY next_attempt_at LIMIT ?",
            (now, *params, limit),
        ).fetchall()
        return [_arm(row) for row in rows]

    def earliest_attempt_after(self, after: float) -> float | None:
        """The earliest next attempt later than *after*, or None."""
        self.flush()
        row = self._conn.execute(
            "SELECT MIN(next_attempt_at) FROM arms WHERE next_attempt_at > ?", (after,)
        ).fetchone()
        return None if row[0] is None else float(row[0])

    # -- delivery outcomes ----------------------------------------------------------------------

    def mark_delivered(self, arm: Arm, *, attempt: int, status_code: int, now: float) -> bool:
        """Remove the delivered arm unless it was replaced meanwhile; True when removed."""
        return self.record([Outcome(arm, "delivered", attempt, now, status_code)])[0]

    def schedule_retry(
        self,
        arm: Arm,
        *,
        attempt: int,
        next_attempt_at: float,
        status_code: int | None,
        error: str,
        now: float,
    ) -> bool:
        """Record a failed attempt and when to try again; False when the arm was replaced."""
        outcome = Outcome(arm, "retry", attempt, now, status_code, error, next_attempt_at)
        return self.record([outcome])[0]

    def dead_letter(
        self, arm: Arm, *, attempt: int, status_code: int | None, error: str, now: float
    ) -> bool:
        """Move the arm to the dead letters; False when it was replaced meanwhile."""
        return self.record([Outcome(arm, "dead", attempt, now, status_code, error)])[0]

    def record(self, outcomes: Sequence[Outcome]) -> list[bool]:
        """Write delivery outcomes now; per outcome, False when it was superseded.

        An outcome applies only while its arm still has the generation the delivery started
        with; otherwise the attempt is recorded as superseded and the arm left alone.
        """
        with self._write() as conn:
            return self._apply(conn, outcomes)

    def defer(self, outcome: Outcome) -> None:
        """Write *outcome* with the next transaction: the next `flush` or change, whichever first.

        Outcomes that come in together are written in one commit. Every change and every read
        of arms, deliveries or dead letters writes them first, so nothing ever sees (or
        changes) an arm whose delivery has finished as if it had not, and an agent that
        re-arms the moment it has answered finds its delivery recorded as delivered.
        `take_written` says what became of them.
        """
        self._pending.append(outcome)

    def flush(self) -> None:
        """Write the deferred outcomes now (when there are any)."""
        if self._pending:
            with self._write():
                pass

    def take_written(self) -> list[tuple[Outcome, bool]]:
        """Deferred outcomes written since the last call, each with `record`'s answer."""
        written, self._written = self._written, []
        return written

    def _apply(self, conn: sqlite3.Connection, outcomes: Sequence[Outcome]) -> list[bool]:
        applied: list[bool] = []
        attempts: list[tuple[object, ...]] = []
        for outcome in outcomes:
            arm = outcome.arm
            key = (arm.agent, arm.job_id, arm.generation)
            if outcome.kind == "retry":
                changed = conn.execute(
                    "UPDATE arms SET attempts = ?, next_attempt_at = ?, last_status = ?, "
                    "last_error = ? WHERE agent = ? AND job_id = ? AND generation = ?",
                    (
                        outcome.attempt,
                        outcome.next_attempt_at,
                        outcome.status_code,
                        outcome.error,
                        *key,
                    ),
                ).rowcount
            else:
                changed = conn.execute(
                    "DELETE FROM arms WHERE agent = ? AND job_id = ? AND generation = ?", key
                ).rowcount
            if changed and outcome.kind == "dead":
                conn.execute(
                    "INSERT INTO dead_letters (agent, job_id, fire_at, schedule_id, "
                    "callback_url, attempts, last_status, last_error, dead_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        arm.agent,
                        arm.job_id,
                        arm.fire_at,
                        arm.schedule_id,
                        arm.callback_url,
                        outcome.attempt,
                        outcome.status_code,
                        outcome.error,
                        outcome.at,
                    ),
                )
            applied.append(changed > 0)
            attempts.append(
                (
                    arm.agent,
                    arm.job_id,
                    arm.fire_at,
                    arm.schedule_id,
                    outcome.attempt,
                    outcome.at,
                    outcome.status_code,
                    outcome.error,
                    outcome.kind if changed else "superseded",
                )
            )
        conn.executemany(
            "INSERT INTO deliveries (agent, job_id, fire_at, schedule_id, attempt, "
            "attempted_at, status_code, error, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            attempts,
        )
        return applied

    def deliveries(self, agent: str | None = None, job_id: str | None = None) -> list[Delivery]:
        """Recorded attempts, oldest first."""
        self.flush()
        clauses, params = [], []
        if agent is not None:
            clauses.append("agent = ?")
            params.append(agent)
        if job_id is not None:
            clauses.append("job_id = ?")
            params.append(job_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._conn.execute(
            "SELECT agent, job_id, fire_at, schedule_id, attempt, attempted_at, status_code, "
            f"error, outcome FROM deliveries {where} ORDER BY id",
            params,
        ).fetchall()
        return [Delivery(*row) for row in rows]

    def prune_deliveries(self, before: float) -> int:
        with self._write() as conn:
            return conn.execute("DELETE FROM deliveries WHERE attempted_at < ?", (before,)).rowcount

    def dead_letters(self, agent: str | None = None) -> list[DeadLetter]:
        self.flush()
        where, params = ("WHERE agent = ?", (agent,)) if agent is not None else ("", ())
        rows = self._conn.execute(
            "SELECT agent, job_id, fire_at, schedule_id, callback_url, attempts, last_status, "
            f"last_error, dead_at FROM dead_letters {where} ORDER BY id",
            params,
        ).fetchall()
        return [DeadLetter(*row) for row in rows]


def _not_in(column: str, values: Collection[str]) -> tuple[str, tuple[str, ...]]:
    if not values:
        return "", ()
    return f"AND {column} NOT IN ({', '.join('?' * len(values))})", tuple(values)


def _arm(row: sqlite3.Row) -> Arm:
    return Arm(
        agent=row["agent"],
        job_id=row["job_id"],
        fire_at=row["fire_at"],
        fire_epoch=float(row["fire_epoch"]),
        callback_url=row["callback_url"],
        dedup_key=row["dedup_key"],
        schedule_id=row["schedule_id"],
        generation=int(row["generation"]),
        attempts=int(row["attempts"]),
        next_attempt_at=float(row["next_attempt_at"]),
        last_status=row["last_status"],
        last_error=row["last_error"],
    )
