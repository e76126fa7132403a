"""chronosd.state against real SQLite files in tmp_path."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronosd.errors import StateError
from chronosd.state import (
    META_ARMS_SETTLED,
    SCHEMA_VERSION,
    JobState,
    StateDB,
    cap_output_file,
    owner_alive,
    owner_token,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
OTHER = "elsewhere:1:feed"  # another host: always assumed alive


def _job(job_id: str = "backup", **changes: object) -> JobState:
    values: dict[str, object] = {
        "job_id": job_id,
        "spec_hash": "h1",
        "schedule_key": "cron:0 * * * *@UTC",
        "anchor": T0,
        "next_fire": T0 + MINUTE,
        "armed_fire": None,
        "armed_confirmed_at": None,
        "runs_started": 0,
        "last_run_id": None,
        "last_status": None,
        "completed": False,
    }
    values.update(changes)
    return JobState(**values)  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StateDB]:
    state = StateDB.open(tmp_path / "state")
    yield state
    state.close()


def _raw(db: StateDB) -> sqlite3.Connection:
    """A second, plain connection to the same file (as another process would have)."""
    return sqlite3.connect(db.path, isolation_level=None)


# --------------------------------------------------------------------------- files and schema


def test_open_creates_private_state_dir_and_database_in_wal_mode(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # modes must not depend on the caller's umask
    try:
        state = StateDB.open(tmp_path / "deep" / "state")
    finally:
        os.umask(old_umask)
    try:
        assert state.path == tmp_path / "deep" / "state" / "state.db"
        assert _mode(state.state_dir) == 0o700
        assert _mode(state.path) == 0o600
        for suffix in ("-wal", "-shm"):
            side = state.path.with_name(state.path.name + suffix)
            assert not side.exists() or _mode(side) == 0o600
        raw = _raw(state)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"job_state", "occurrences", "runs", "meta", "nonces"} <= tables
        raw.close()
        connection = state._db
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 0
        assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    finally:
        state.close()


def test_any_write_to_job_state_removes_the_settled_mark(tmp_path: Path) -> None:
    with StateDB.open(tmp_path) as db:
        writes = [
            lambda: db.put_job(_job("a")),
            lambda: db.update_job("a", armed_fire=T0 + MINUTE, armed_confirmed_at=T0),
            lambda: db.delete_job("a"),
        ]
        for write in writes:
            db.set_meta(META_ARMS_SETTLED, "{}")
            db.set_meta("other", "kept")  # writes elsewhere leave it alone
            assert db.get_meta(META_ARMS_SETTLED) == "{}"
            write()
            assert db.get_meta(META_ARMS_SETTLED) is None
        # Whoever writes: another process's plain connection too.
        db.put_job(_job("b"))
        db.set_meta(META_ARMS_SETTLED, "{}")
        raw = _raw(db)
        raw.execute("UPDATE job_state SET last_status = 'ok' WHERE job_id = 'b'")
        raw.close()
        assert db.get_meta(META_ARMS_SETTLED) is None
        assert db.get_meta("other") == "kept"


def test_existing_database_with_loose_mode_is_tightened(tmp_path: Path) -> None:
    StateDB.open(tmp_path).close()
    os.chmod(tmp_path / "state.db", 0o644)
    StateDB.open(tmp_path).close()
    assert _mode(tmp_path / "state.db") == 0o600


def test_reopening_keeps_data(tmp_path: Path) -> None:
    with StateDB.open(tmp_path) as first:
        first.put_job(_job())
        first.set_meta("last_reconcile", "ok")
    with StateDB.open(tmp_path) as second:
        assert second.get_job("backup") == _job()
        assert second.get_meta("last_reconcile") == "ok"


def test_run_log_path_is_recorded_under_runs_job_dir_and_created_only_when_the_run_starts(
    db: StateDB,
) -> None:
    run = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
    assert run.output_path == db.state_dir / "runs" / "backup" / f"{run.run_id}.log"
    assert db.get_run(run.run_id) == run
    assert db.run_log_path("backup", run.run_id) == run.output_path
    # The claim's transaction does no file-system work: the runner creates the log.
    assert not (db.state_dir / "runs").exists()


@pytest.mark.parametrize(
    "job_id", ["../escape", "a/b", ".hidden", "", "-dash", "x" * 65, "sp ace", "nul\0"]
)
def test_unsafe_job_id_is_refused_before_any_path_is_built(db: StateDB, job_id: str) -> None:
    with pytest.raises(StateError, match="refusing job id"):
        db.start_run(job_id, T0, attempt=1, trigger="schedule", now=T0)
    with pytest.raises(StateError, match="refusing job id"):
        db.prune_runs(job_id, keep=0)
    assert not (db.state_dir / "runs").exists()
    assert db.runs() == []


def test_longest_allowed_job_id_gets_a_run_log(db: StateDB) -> None:
    job_id = "a" + "b.c_d-" * 10 + "xyz"
    assert len(job_id) == 64
    run = db.start_run(job_id, T0, attempt=1, trigger="manual", now=T0)
    assert run.output_path.name == f"{run.run_id}.log"
    assert run.output_path.parent.name == job_id


# --------------------------------------------------------------------------- job state


def test_job_state_round_trips_and_upserts(db: StateDB) -> None:
    assert db.get_job("backup") is None
    db.put_job(_job())
    db.put_job(_job("report", completed=True, runs_started=3, last_status="ok"))
    assert db.get_job("backup") == _job()
    changed = _job(spec_hash="h2", armed_fire=T0 + MINUTE, armed_confirmed_at=T0)
    db.put_job(changed)
    assert db.get_job("backup") == changed
    assert db.all_jobs() == {
        "backup": changed,
        "report": _job("report", completed=True, runs_started=3, last_status="ok"),
    }


def test_instants_come_back_in_utc_whole_seconds(db: StateDB) -> None:
    paris = timezone(timedelta(hours=1))
    db.put_job(_job(anchor=datetime(2025, 3, 1, 13, 0, 5, 999_999, tzinfo=paris)))
    stored = db.get_job("backup")
    assert stored is not None
    assert stored.anchor == datetime(2025, 3, 1, 12, 0, 5, tzinfo=UTC)
    assert stored.anchor.tzinfo == UTC


def test_update_job_changes_only_the_named_fields(db: StateDB) -> None:
    db.put_job(_job())
    db.update_job("backup", armed_fire=T0 + MINUTE, armed_confirmed_at=T0, completed=True)
    assert db.get_job("backup") == _job(
        armed_fire=T0 + MINUTE, armed_confirmed_at=T0, completed=True
    )
    db.update_job("backup", next_fire=None)
    job = db.get_job("backup")
    assert job is not None and job.next_fire is None


def test_update_job_rejects_unknown_fields(db: StateDB) -> None:
    db.put_job(_job())
    with pytest.raises(ValueError, match="nonsense"):
        db.update_job("backup", nonsense=1)
    with pytest.raises(ValueError):
        db.update_job("backup", job_id="other")


def test_update_of_a_deleted_job_does_not_resurrect_it(db: StateDB) -> None:
    db.put_job(_job())
    db.delete_job("backup")
    db.update_job("backup", next_fire=T0)
    assert db.get_job("backup") is None
    assert db.all_jobs() == {}


# --------------------------------------------------------------------------- claims


def test_second_claim_of_the_same_occurrence_loses(db: StateDB) -> None:
    assert db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0)
    assert not db.claim("backup", T0, owner="you:2:b", trigger="manual", now=T0 + MINUTE)
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None
    assert (occurrence.state, occurrence.owner, occurrence.trigger) == (
        "claimed",
        "me:1:a",
        "schedule",
    )
    assert occurrence.claimed_at == T0


def test_same_instant_written_with_another_offset_is_the_same_occurrence(db: StateDB) -> None:
    assert db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0)
    shifted = T0.astimezone(timezone(timedelta(hours=-5)))
    assert not db.claim("backup", shifted, owner="me:1:a", trigger="schedule", now=T0)


def test_claims_of_other_instants_and_other_jobs_are_independent(db: StateDB) -> None:
    assert db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0)
    assert db.claim("backup", T0 + MINUTE, owner="me:1:a", trigger="schedule", now=T0)
    assert db.claim("report", T0, owner="me:1:a", trigger="schedule", now=T0)
    assert len(db.occurrences()) == 3


def test_skipped_occurrence_is_recorded_and_blocks_a_later_claim(db: StateDB) -> None:
    assert db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0, state="skipped")
    assert not db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0)
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None and occurrence.state == "skipped"


def test_claim_rejects_unknown_state_and_trigger(db: StateDB) -> None:
    with pytest.raises(ValueError, match="trigger"):
        db.claim("backup", T0, owner="me:1:a", trigger="cron", now=T0)
    with pytest.raises(ValueError, match="state"):
        db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0, state="won")
    assert db.occurrences() == []


def test_set_occurrence_state_moves_a_claim_and_refuses_an_unclaimed_one(db: StateDB) -> None:
    db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0)
    db.set_occurrence_state("backup", T0, "missed", now=T0 + MINUTE)
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None
    assert (occurrence.state, occurrence.updated_at, occurrence.claimed_at) == (
        "missed",
        T0 + MINUTE,
        T0,
    )
    with pytest.raises(StateError, match="never claimed"):
        db.set_occurrence_state("backup", T0 + MINUTE, "done", now=T0)


def test_occurrences_are_listed_latest_first_with_filter_and_limit(db: StateDB) -> None:
    for i in range(5):
        db.claim("backup", T0 + i * MINUTE, owner="me:1:a", trigger="schedule", now=T0)
    db.claim("report", T0 + 10 * MINUTE, owner="me:1:a", trigger="schedule", now=T0)
    assert [o.job_id for o in db.occurrences(limit=2)] == ["report", "backup"]
    listed = db.occurrences("backup", limit=3)
    assert [o.scheduled_at for o in listed] == [T0 + 4 * MINUTE, T0 + 3 * MINUTE, T0 + 2 * MINUTE]


def test_prune_occurrences_spares_recent_and_unfinished_ones(db: StateDB) -> None:
    db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0, state="skipped")
    db.claim("backup", T0 + MINUTE, owner="me:1:a", trigger="schedule", now=T0)
    db.claim("backup", T0 + 5 * MINUTE, owner="me:1:a", trigger="schedule", now=T0, state="missed")
    assert db.prune_occurrences(before=T0 + 2 * MINUTE) == 1
    assert [o.scheduled_at for o in db.occurrences()] == [T0 + 5 * MINUTE, T0 + MINUTE]


def test_claims_are_committed_with_full_sync_and_other_writes_are_not(db: StateDB) -> None:
    db.put_job(_job())
    statements: list[str] = []
    db._db.set_trace_callback(statements.append)

    def sync_levels_while(action: object) -> list[str]:
        statements.clear()
        assert callable(action)
        action()
        return [s for s in statements if "synchronous" in s or "INSERT" in s]

    levels = sync_levels_while(
        lambda: db.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0)
    )
    assert levels[0] == "PRAGMA synchronous = FULL" and "INSERT" in levels[1]
    assert levels[-1] == "PRAGMA synchronous = NORMAL"
    levels = sync_levels_while(
        lambda: db.claim_and_advance(
            "backup", T0 + MINUTE, owner="me:1:a", trigger="schedule", now=T0, next_fire=None
        )
    )
    assert levels[0] == "PRAGMA synchronous = FULL" and "INSERT" in levels[1]
    assert levels[-1] == "PRAGMA synchronous = NORMAL"
    assert sync_levels_while(lambda: db.set_meta("k", "v"))[0].startswith("INSERT")
    db._db.set_trace_callback(None)
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == 1


# --------------------------------------------------------------------------- claim_and_advance


def test_claim_and_advance_plans_the_next_fire_and_counts_the_start(db: StateDB) -> None:
    db.put_job(_job(runs_started=4))
    won = db.claim_and_advance(
        "backup", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=T0 + MINUTE
    )
    assert won
    assert db.get_job("backup") == _job(runs_started=5, next_fire=T0 + MINUTE)
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None and occurrence.state == "claimed"


def test_claim_and_advance_can_complete_a_job(db: StateDB) -> None:
    db.put_job(_job())
    assert db.claim_and_advance(
        "backup", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=None, completed=True
    )
    assert db.get_job("backup") == _job(runs_started=1, next_fire=None, completed=True)


def test_lost_claim_and_advance_leaves_the_job_state_alone(db: StateDB) -> None:
    db.put_job(_job())
    assert db.claim("backup", T0, owner="you:2:b", trigger="schedule", now=T0)
    lost = db.claim_and_advance(
        "backup", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=T0 + 9 * MINUTE
    )
    assert not lost
    assert db.get_job("backup") == _job()


def test_failed_advance_rolls_back_the_claim(db: StateDB) -> None:
    db.put_job(_job())
    raw = _raw(db)
    raw.execute(
        "CREATE TRIGGER fail_advance BEFORE UPDATE ON job_state "
        "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    with pytest.raises(StateError, match="injected failure"):
        db.claim_and_advance(
            "backup", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=T0 + MINUTE
        )
    assert db.get_occurrence("backup", T0) is None
    assert db.get_job("backup") == _job()
    raw.execute("DROP TRIGGER fail_advance")
    raw.close()
    assert db.claim_and_advance(
        "backup", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=T0 + MINUTE
    )


def test_claim_and_advance_without_job_state_claims_nothing(db: StateDB) -> None:
    with pytest.raises(StateError, match="no state row"):
        db.claim_and_advance(
            "gone", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=T0 + MINUTE
        )
    assert db.get_occurrence("gone", T0) is None


# --------------------------------------------------------------------------- runs


def test_run_lifecycle_updates_occurrence_and_job_state(db: StateDB) -> None:
    db.put_job(_job())
    assert db.claim_and_advance(
        "backup", T0, owner="someone:9:x", trigger="schedule", now=T0, next_fire=T0 + MINUTE
    )
    run = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0 + timedelta(seconds=1))
    assert run.status == "running" and run.pid is None and run.owner == db.owner
    assert db.running_runs() == [run]
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None
    assert (occurrence.state, occurrence.owner) == ("running", db.owner)

    db.set_run_pid(run.run_id, 4242)
    db.finish_run(run.run_id, status="ok", exit_code=0, now=T0 + MINUTE, output_bytes=12)
    finished = db.get_run(run.run_id)
    assert finished is not None
    assert (finished.pid, finished.status, finished.exit_code, finished.output_bytes) == (
        4242,
        "ok",
        0,
        12,
    )
    assert finished.ended_at == T0 + MINUTE
    assert db.running_runs() == []
    job = db.get_job("backup")
    assert job is not None
    assert (job.last_run_id, job.last_status) == (run.run_id, "ok")
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None and occurrence.state == "done"


@pytest.mark.parametrize("status", ["failed", "timeout", "killed", "spawn-error"])
def test_unsuccessful_run_marks_occurrence_failed(db: StateDB, status: str) -> None:
    db.put_job(_job())
    db.claim("backup", T0, owner=db.owner, trigger="schedule", now=T0)
    run = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
    db.finish_run(run.run_id, status=status, exit_code=None, now=T0, output_bytes=0)
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None and occurrence.state == "failed"
    job = db.get_job("backup")
    assert job is not None and job.last_status == status


def test_finishing_an_unknown_run_or_with_unknown_status_fails(db: StateDB) -> None:
    with pytest.raises(StateError, match="never recorded"):
        db.finish_run("20250101T000000Z-00000000", status="ok", exit_code=0, now=T0, output_bytes=0)
    run = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
    with pytest.raises(ValueError, match="status"):
        db.finish_run(run.run_id, status="great", exit_code=0, now=T0, output_bytes=0)
    assert db.get_run(run.run_id) == run


def test_runs_are_listed_newest_first_even_within_one_second(db: StateDB) -> None:
    started = [
        db.start_run(job, T0, attempt=1, trigger="schedule", now=T0) for job in ("a", "b", "a", "a")
    ]
    assert len({run.run_id for run in started}) == 4
    assert [r.run_id for r in db.runs()] == [r.run_id for r in reversed(started)]
    assert [r.run_id for r in db.runs("a", limit=2)] == [started[3].run_id, started[2].run_id]
    assert db.get_run("nope") is None


def test_run_ids_sort_by_start_time_in_utc(db: StateDB) -> None:
    later = db.start_run("a", T0, attempt=1, trigger="schedule", now=T0 + timedelta(hours=1))
    east = timezone(timedelta(hours=9))
    earlier = db.start_run("a", T0, attempt=1, trigger="schedule", now=T0.astimezone(east))
    assert earlier.run_id.startswith("20250301T120000Z-")
    assert earlier.run_id < later.run_id


def test_prune_runs_keeps_the_newest_and_deletes_older_rows_and_logs(db: StateDB) -> None:
    runs = []
    for i in range(6):
        run = db.start_run("backup", T0 + i * MINUTE, attempt=1, trigger="schedule", now=T0)
        run.output_path.parent.mkdir(parents=True, exist_ok=True)  # as the runner does
        run.output_path.write_text(f"output {i}\n")
        db.finish_run(run.run_id, status="ok", exit_code=0, now=T0, output_bytes=9)
        runs.append(run)
    other = db.start_run("report", T0, attempt=1, trigger="schedule", now=T0)

    assert db.prune_runs("backup", keep=2) == 4
    kept = db.runs("backup", limit=100)
    assert [r.run_id for r in kept] == [runs[5].run_id, runs[4].run_id]
    for run in runs[:4]:
        assert not run.output_path.exists()
        assert db.get_run(run.run_id) is None
    for run in runs[4:]:
        assert run.output_path.read_text().startswith("output")
    assert db.get_run(other.run_id) is not None
    assert db.prune_runs("backup", keep=2) == 0


def test_prune_runs_never_deletes_a_running_run(db: StateDB) -> None:
    oldest = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
    oldest.output_path.parent.mkdir(parents=True)  # started: the runner made its log
    oldest.output_path.write_text("still running\n")
    for _ in range(3):
        run = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
        db.finish_run(run.run_id, status="ok", exit_code=0, now=T0, output_bytes=0)
    assert db.prune_runs("backup", keep=1) == 2
    assert db.get_run(oldest.run_id) is not None
    assert oldest.output_path.exists()


# --------------------------------------------------------------------------- output cap


def test_cap_output_file_leaves_a_small_file_alone(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_bytes(b"hello\n")
    assert cap_output_file(log, 6) == 6
    assert log.read_bytes() == b"hello\n"


def test_cap_output_file_keeps_the_tail_behind_a_marker(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    body = b"".join(b"line %04d\n" % i for i in range(1000))  # 10,000 bytes
    log.write_bytes(body)
    size = cap_output_file(log, 1000)
    capped = log.read_bytes()
    assert size == len(capped) <= 1000
    marker, _, tail = capped.partition(b"\n")
    assert body.endswith(tail)
    assert tail.endswith(b"line 0999\n")
    assert marker == b"[... %d bytes truncated ...]" % (len(body) - len(tail))


def test_cap_output_file_keeps_the_inode_for_a_writer_that_appends(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with open(log, "ab") as writer:
        writer.write(b"x" * 5000)
        writer.flush()
        inode = os.stat(log).st_ino
        cap_output_file(log, 100)
        writer.write(b"END\n")
    assert os.stat(log).st_ino == inode
    assert log.read_bytes().endswith(b"x" * 10 + b"END\n")
    assert len(log.read_bytes()) <= 104


def test_cap_output_file_does_not_start_inside_a_utf8_character(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_bytes("é".encode() * 500)
    for limit in (101, 100, 99):
        log.write_bytes("é".encode() * 500)
        cap_output_file(log, limit)
        log.read_bytes().decode("utf-8")  # raises if the tail was cut inside a character


def test_cap_output_file_of_a_missing_file_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="capping"):
        cap_output_file(tmp_path / "missing.log", 10)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=3000), limit=st.integers(min_value=40, max_value=2000))
def test_capped_file_is_marker_plus_suffix_within_the_limit(
    tmp_path: Path, body: bytes, limit: int
) -> None:
    log = tmp_path / "prop.log"
    log.write_bytes(body)
    size = cap_output_file(log, limit)
    capped = log.read_bytes()
    assert size == len(capped)
    if len(body) <= limit:
        assert capped == body
        return
    assert size <= limit
    marker, _, tail = capped.partition(b"\n")
    assert body.endswith(tail)
    assert marker == b"[... %d bytes truncated ...]" % (len(body) - len(tail))


# --------------------------------------------------------------------------- owners and recovery


_TOKEN_CHILD = (
    "import sys; from chronosd.state import owner_token; "
    "print(owner_token(), flush=True); sys.stdin.read()"
)


def _child_owner() -> tuple[subprocess.Popen[str], str]:
    """A real process that reports its owner token and lives until its stdin closes."""
    child = subprocess.Popen(
        [sys.executable, "-c", _TOKEN_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert child.stdout is not None
    token = child.stdout.readline().strip()
    assert token.count(":") == 2, token
    return child, token


def _end(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=10)


def test_owner_token_names_this_host_and_process_and_is_stable() -> None:
    token = owner_token()
    host, pid, rest = token.split(":")
    assert host == os.uname().nodename and int(pid) == os.getpid() and rest
    assert owner_token() == token
    assert owner_alive(token)


def test_owner_alive_tells_a_dead_process_from_a_live_one() -> None:
    live, live_token = _child_owner()
    dead, dead_token = _child_owner()
    _end(dead)
    try:
        assert owner_alive(live_token)
        assert not owner_alive(dead_token)
    finally:
        _end(live)


def test_owner_alive_is_not_fooled_by_a_reused_pid() -> None:
    live, live_token = _child_owner()
    try:
        host, pid, _ = live_token.split(":")
        # Same host and pid, but a process that started at another time.
        assert not owner_alive(f"{host}:{pid}:1-cafe")
    finally:
        _end(live)


def test_owner_alive_edge_cases() -> None:
    host = os.uname().nodename
    assert not owner_alive(f"{host}:{os.getpid()}:0-deadbeef")  # our pid, earlier process
    assert owner_alive(OTHER)  # cannot check another host
    assert not owner_alive("garbage")
    assert not owner_alive(f"{host}:0:x")  # pid 0 would mean our process group


def test_recover_interrupted_marks_dead_owners_work_and_leaves_live_owners_alone(
    tmp_path: Path,
) -> None:
    live, live_token = _child_owner()
    dead, dead_token = _child_owner()
    _end(dead)
    try:
        with StateDB.open(tmp_path, owner=dead_token) as crashed:
            crashed.put_job(_job("a"))
            crashed.claim("a", T0, owner=dead_token, trigger="schedule", now=T0)
            lost = crashed.start_run("a", T0, attempt=1, trigger="schedule", now=T0)
            crashed.claim("a", T0 + MINUTE, owner=dead_token, trigger="schedule", now=T0)
            crashed.claim(
                "a", T0 + 2 * MINUTE, owner=dead_token, trigger="schedule", now=T0, state="skipped"
            )
        with StateDB.open(tmp_path, owner=live_token) as running:
            running.claim("b", T0, owner=live_token, trigger="schedule", now=T0)
            kept = running.start_run("b", T0, attempt=1, trigger="schedule", now=T0)
            running.claim("b", T0 + MINUTE, owner=live_token, trigger="schedule", now=T0)

        with StateDB.open(tmp_path) as restarted:
            later = T0 + 10 * MINUTE
            recovered = restarted.recover_interrupted(now=later, is_alive=owner_alive)
            assert [r.run_id for r in recovered] == [lost.run_id]
            assert recovered[0].status == "interrupted" and recovered[0].ended_at == later

            states = {(o.job_id, o.scheduled_at): o.state for o in restarted.occurrences()}
            assert states == {
                ("a", T0): "interrupted",
                ("a", T0 + MINUTE): "interrupted",  # claimed, never started
                ("a", T0 + 2 * MINUTE): "skipped",
                ("b", T0): "running",
                ("b", T0 + MINUTE): "claimed",
            }
            job = restarted.get_job("a")
            assert job is not None
            assert (job.last_run_id, job.last_status) == (lost.run_id, "interrupted")
            assert restarted.running_runs() == [kept]
            assert restarted.recover_interrupted(now=later, is_alive=owner_alive) == []
    finally:
        _end(live)


def test_recover_interrupted_asks_once_per_owner(db: StateDB) -> None:
    for i in range(3):
        db.claim("a", T0 + i * MINUTE, owner="h:1:x", trigger="schedule", now=T0)
        db.start_run("a", T0 + i * MINUTE, attempt=1, trigger="schedule", now=T0)
    asked: list[str] = []

    def is_alive(owner: str) -> bool:
        asked.append(owner)
        return False

    assert len(db.recover_interrupted(now=T0, is_alive=is_alive)) == 3
    assert asked == [db.owner]  # start_run made this process the owner of all three


# --------------------------------------------------------------------------- migrations


_V1_SCHEMA = """
CREATE TABLE job_state (
    job_id TEXT PRIMARY KEY, spec_hash TEXT NOT NULL, anchor TEXT NOT NULL, next_fire TEXT,
    armed_fire TEXT, runs_started INTEGER NOT NULL DEFAULT 0, last_run_id TEXT,
    last_status TEXT, completed INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE occurrences (
    job_id TEXT NOT NULL, scheduled_at TEXT NOT NULL, state TEXT NOT NULL, owner TEXT NOT NULL,
    claimed_at TEXT NOT NULL, updated_at TEXT NOT NULL, PRIMARY KEY (job_id, scheduled_at)
) WITHOUT ROWID;
CREATE TABLE runs (
    seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    scheduled_at TEXT NOT NULL, attempt INTEGER NOT NULL, pid INTEGER, started_at TEXT NOT NULL,
    ended_at TEXT, exit_code INTEGER, status TEXT, output_path TEXT NOT NULL,
    output_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_job ON runs (job_id, seq);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO job_state VALUES ('backup', 'h1', '2025-03-01T12:00:00+00:00',
    '2025-03-01T13:00:00+00:00', '2025-03-01T13:00:00+00:00', 7, 'r2', 'ok', 0);
INSERT INTO occurrences VALUES
    ('backup', '2025-03-01T11:00:00+00:00', 'done', 'old:11:aa',
     '2025-03-01T11:00:00+00:00', '2025-03-01T11:00:09+00:00'),
    ('backup', '2025-03-01T12:00:00+00:00', 'running', 'old:12:bb',
     '2025-03-01T12:00:00+00:00', '2025-03-01T12:00:00+00:00');
INSERT INTO runs VALUES
    (1, 'r1', 'backup', '2025-03-01T11:00:00+00:00', 1, 99, '2025-03-01T11:00:01+00:00',
     '2025-03-01T11:00:09+00:00', 0, 'ok', 'runs/backup/r1.log', 42),
    (2, 'r2', 'backup', '2025-03-01T12:00:00+00:00', 1, 100, '2025-03-01T12:00:01+00:00',
     NULL, NULL, NULL, 'runs/backup/r2.log', 0);
INSERT INTO meta VALUES ('last_reconcile', '2025-03-01T12:00:02+00:00');
PRAGMA user_version = 1;
"""


def test_version_1_database_migrates_to_current_keeping_its_rows(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "state.db")
    old.executescript(_V1_SCHEMA)
    old.close()

    with StateDB.open(tmp_path) as db:
        raw = _raw(db)
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        raw.close()
        job = db.get_job("backup")
        assert job == JobState(
            job_id="backup",
            spec_hash="h1",
            schedule_key="",  # unknown to version 1
            anchor=T0,
            next_fire=T0 + 60 * MINUTE,
            armed_fire=T0 + 60 * MINUTE,
            armed_confirmed_at=None,
            runs_started=7,
            last_run_id="r2",
            last_status="ok",
            completed=False,
        )
        occurrence = db.get_occurrence("backup", T0)
        assert occurrence is not None
        assert (occurrence.state, occurrence.owner, occurrence.trigger) == (
            "running",
            "old:12:bb",
            "schedule",
        )
        done, running = db.get_run("r1"), db.get_run("r2")
        assert done is not None and running is not None
        assert (done.status, done.exit_code, done.output_bytes, done.owner) == (
            "ok",
            0,
            42,
            "old:11:aa",
        )
        assert done.output_path == tmp_path / "runs" / "backup" / "r1.log"
        assert (running.status, running.owner, running.trigger) == (
            "running",
            "old:12:bb",
            "schedule",
        )
        assert db.running_runs() == [running]
        assert db.get_meta("last_reconcile") == "2025-03-01T12:00:02+00:00"
        # The tables added by version 2 work.
        assert db.remember_nonce("jti-1", expires=T0 + MINUTE, now=T0)
        assert not db.claim("backup", T0, owner="new:1:x", trigger="schedule", now=T0)

    with StateDB.open(tmp_path) as again:  # a second open finds nothing to do
        assert again.get_job("backup") == job


def test_failed_migration_step_leaves_the_database_at_its_old_version(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "state.db")
    old.executescript(_V1_SCHEMA)
    old.execute("CREATE TABLE nonces (clash TEXT)")  # makes the step to version 2 fail late
    old.close()
    with pytest.raises(StateError, match="migrating the schema failed"):
        StateDB.open(tmp_path)
    raw = sqlite3.connect(tmp_path / "state.db")
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    columns = {row[1] for row in raw.execute("PRAGMA table_info(job_state)")}
    assert "schedule_key" not in columns  # the step's earlier ALTERs were rolled back
    assert raw.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    raw.close()


def test_database_from_a_newer_chronosd_is_refused(tmp_path: Path) -> None:
    StateDB.open(tmp_path).close()
    raw = sqlite3.connect(tmp_path / "state.db")
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StateError, match="newer than this chronosd"):
        StateDB.open(tmp_path)


# --------------------------------------------------------------------------- StateError


def _assert_one_line(error: pytest.ExceptionInfo[StateError]) -> str:
    message = str(error.value)
    assert "\n" not in message and str(error.value.__cause__)
    return message


def test_writing_through_a_read_only_connection_is_a_state_error(tmp_path: Path) -> None:
    # Tests run as root, which ignores file modes; SQLite's mode=ro is enforced for root too.
    with StateDB.open(tmp_path) as writer:
        writer.put_job(_job())
    with StateDB.open(tmp_path, read_only=True) as reader:
        assert reader.get_job("backup") == _job()
        with pytest.raises(StateError) as error:
            reader.claim("backup", T0, owner="me:1:a", trigger="schedule", now=T0)
        assert "readonly" in _assert_one_line(error)
        with pytest.raises(StateError):
            reader.claim_and_advance(
                "backup", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=None
            )
    with StateDB.open(tmp_path) as writer:
        assert writer.get_occurrence("backup", T0) is None


def test_read_only_open_of_a_missing_database_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError) as error:
        StateDB.open(tmp_path / "nothing", read_only=True)
    assert "opening failed" in _assert_one_line(error)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_unwritable_state_directory_is_a_state_error(tmp_path: Path) -> None:
    StateDB.open(tmp_path / "s").close()
    os.chmod(tmp_path / "s" / "state.db", 0o400)
    os.chmod(tmp_path / "s", 0o500)
    try:
        with pytest.raises(StateError):
            db = StateDB.open(tmp_path / "s")
            db.claim("a", T0, owner="me:1:a", trigger="schedule", now=T0)
    finally:
        os.chmod(tmp_path / "s", 0o700)


def test_database_locked_by_another_process_is_a_state_error(tmp_path: Path) -> None:
    with StateDB.open(tmp_path, busy_timeout=0.05) as db:
        holder = _raw(db)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StateError) as error:
                db.claim("a", T0, owner="me:1:a", trigger="schedule", now=T0)
            assert "locked" in _assert_one_line(error)
            with pytest.raises(StateError):
                db.claim_and_advance(
                    "a", T0, owner="me:1:a", trigger="schedule", now=T0, next_fire=None
                )
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert db.claim("a", T0, owner="me:1:a", trigger="schedule", now=T0)


def test_full_disk_is_a_state_error_and_leaves_no_half_transaction(tmp_path: Path) -> None:
    with StateDB.open(tmp_path) as db:
        db.put_job(_job())
        connection = db._db
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        connection.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full"
        with pytest.raises(StateError) as error:
            for i in range(2000):
                db.claim_and_advance(
                    "backup",
                    T0 + i * MINUTE,
                    owner="me:1:" + "x" * 200,
                    trigger="schedule",
                    now=T0,
                    next_fire=T0 + (i + 1) * MINUTE,
                )
        assert "full" in _assert_one_line(error)
        assert not connection.in_transaction
        job = db.get_job("backup")
        assert job is not None
        # Every claim that got in was advanced, and none beyond.
        assert job.runs_started == len(db.occurrences(limit=10_000))


def test_garbage_state_file_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateError) as error:
        StateDB.open(tmp_path)
    assert "not a database" in _assert_one_line(error)


def test_closed_database_is_a_state_error(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path)
    db.close()
    db.close()
    with pytest.raises(StateError, match="closed"):
        db.get_job("a")


# --------------------------------------------------------------------------- meta and nonces


def test_meta_values_are_set_replaced_and_deleted(db: StateDB) -> None:
    assert db.get_meta("jwks") is None
    db.set_meta("jwks", '{"keys": []}')
    db.set_meta("jwks", '{"keys": [1]}')
    assert db.get_meta("jwks") == '{"keys": [1]}'
    db.set_meta("jwks", None)
    assert db.get_meta("jwks") is None


def test_nonce_is_accepted_once_until_it_expires(db: StateDB) -> None:
    expires = T0 + 5 * MINUTE
    assert db.remember_nonce("jti-1", expires=expires, now=T0)
    assert not db.remember_nonce("jti-1", expires=expires, now=T0 + MINUTE)
    # A token id is refused whatever expiry its new token carries, until the row expires.
    assert not db.remember_nonce("jti-1", expires=T0 + 9 * MINUTE, now=T0 + MINUTE)
    assert db.remember_nonce("jti-2", expires=expires, now=T0 + MINUTE)
    assert db.remember_nonce("jti-1", expires=T0 + 20 * MINUTE, now=expires)


def test_signature_is_accepted_once_per_expiry(db: StateDB, tmp_path: Path) -> None:
    expires = T0 + 5 * MINUTE
    assert db.remember_signature("hmac:aa", expires=expires, now=T0)
    assert not db.remember_signature("hmac:aa", expires=expires, now=T0 + MINUTE)
    with StateDB.open(tmp_path / "state") as other:  # every process shares the cache
        assert not other.remember_signature("hmac:aa", expires=expires, now=T0 + MINUTE)
    assert db.remember_signature("hmac:bb", expires=expires, now=T0 + MINUTE)
    # Token ids and signatures are kept apart.
    assert db.remember_nonce("hmac:aa", expires=expires, now=T0 + MINUTE)


def test_expired_nonces_are_pruned_at_most_every_purge_interval(db: StateDB) -> None:
    def left(table: str) -> int:
        raw = _raw(db)
        (count,) = raw.execute(f"SELECT count(*) FROM {table}").fetchone()
        raw.close()
        return int(count)

    for i in range(10):
        db.remember_nonce(f"n{i}", expires=T0 + i * MINUTE, now=T0)
        db.remember_signature(f"s{i}", expires=T0 + i * MINUTE, now=T0)
    assert db.remember_nonce("fresh", expires=T0 + 60 * MINUTE, now=T0 + 5 * MINUTE)
    # The first check purged (n0, expired at once; s0 came after it); the next ones wait.
    assert (left("nonces"), left("signatures")) == (10, 10)
    # An expired token id does not block its nonce meanwhile: it is taken over.
    assert db.remember_nonce("n2", expires=T0 + 60 * MINUTE, now=T0 + 5 * MINUTE)
    assert not db.remember_nonce("n7", expires=T0 + 60 * MINUTE, now=T0 + 5 * MINUTE)
    assert not db.remember_signature("s7", expires=T0 + 7 * MINUTE, now=T0 + 5 * MINUTE)
    db._nonce_purge_at = 0.0  # as if NONCE_PURGE_EVERY had passed
    assert db.remember_signature("later", expires=T0 + 60 * MINUTE, now=T0 + 5 * MINUTE)
    assert left("nonces") == 6  # n2 (taken over), n6..n9, fresh
    assert left("signatures") == 5  # s6..s9, later


def test_version_3_hmac_signatures_move_to_their_own_table(tmp_path: Path) -> None:
    with StateDB.open(tmp_path):
        pass
    raw = sqlite3.connect(tmp_path / "state.db")
    raw.executescript(
        """
        DROP TABLE signatures;
        INSERT INTO nonces VALUES ('hmac:aa', '2025-03-01T12:05:00+00:00');
        INSERT INTO nonces VALUES ('jwt:t1', '2025-03-01T12:06:00+00:00');
        PRAGMA user_version = 3;
        """
    )
    raw.close()
    with StateDB.open(tmp_path) as db:
        assert not db.remember_signature("hmac:aa", expires=T0 + 5 * MINUTE, now=T0)
        assert not db.remember_nonce("jwt:t1", expires=T0 + 6 * MINUTE, now=T0)
        assert db.remember_nonce("hmac:aa", expires=T0 + 5 * MINUTE, now=T0)
        raw = _raw(db)
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        raw.close()


def test_version_4_meta_becomes_a_rowid_table_keeping_rows_and_triggers(tmp_path: Path) -> None:
    with StateDB.open(tmp_path):
        pass
    raw = sqlite3.connect(tmp_path / "state.db")
    big = "x" * 3_000_000  # a memo of a large jobs.json
    raw.executescript(
        """
        DROP TRIGGER job_state_insert_unsettles;
        DROP TRIGGER job_state_update_unsettles;
        DROP TRIGGER job_state_delete_unsettles;
        DROP TABLE meta;
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        CREATE TRIGGER job_state_insert_unsettles AFTER INSERT ON job_state
            BEGIN DELETE FROM meta WHERE key = 'arms_settled'; END;
        CREATE TRIGGER job_state_update_unsettles AFTER UPDATE ON job_state
            BEGIN DELETE FROM meta WHERE key = 'arms_settled'; END;
        CREATE TRIGGER job_state_delete_unsettles AFTER DELETE ON job_state
            BEGIN DELETE FROM meta WHERE key = 'arms_settled'; END;
        INSERT INTO meta VALUES ('arms_settled', '{"file": "abc"}');
        INSERT INTO meta VALUES ('last_list_at', '2025-03-01T12:00:00+00:00');
        PRAGMA user_version = 4;
        """
    )
    raw.execute("INSERT INTO meta VALUES ('jobs_memo', ?)", (big,))
    raw.commit()
    raw.close()
    with StateDB.open(tmp_path) as db:
        raw = _raw(db)
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        (sql,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'meta'").fetchone()
        assert "WITHOUT ROWID" not in sql.upper()
        triggers = raw.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'")
        assert triggers.fetchone()[0] == 3
        raw.close()
        assert db.get_meta("jobs_memo") == big
        assert db.get_meta("last_list_at") == "2025-03-01T12:00:00+00:00"
        assert db.get_meta(META_ARMS_SETTLED) == '{"file": "abc"}'
        db.put_job(_job("a"))  # any write to job_state still removes the settled mark
        assert db.get_meta(META_ARMS_SETTLED) is None
        db.set_meta("last_list_at", "later")
        assert db.get_meta("last_list_at") == "later"


def test_job_summaries_report_what_applying_jobs_compares(db: StateDB) -> None:
    db.put_job(_job("a"))
    db.put_job(_job("b", spec_hash="h2", next_fire=None, completed=True))
    summaries = db.job_summaries()
    assert summaries["a"] == ("h1", "cron:0 * * * *@UTC", True, False)
    assert summaries["b"] == ("h2", "cron:0 * * * *@UTC", False, True)
    assert set(summaries) == {"a", "b"}


def test_jobs_due_are_those_planned_at_or_before_now(db: StateDB) -> None:
    now = T0 + timedelta(hours=30)  # across a day boundary: text order must be time order
    db.put_job(_job("past", next_fire=now - timedelta(days=2)))
    db.put_job(_job("exact", next_fire=now))
    db.put_job(_job("second-later", next_fire=now + timedelta(seconds=1)))
    db.put_job(_job("next-year", next_fire=now + timedelta(days=400)))
    db.put_job(_job("unplanned", next_fire=None))
    due = db.jobs_due(now)
    assert sorted(due) == ["exact", "past"]
    assert due["past"] == _job("past", next_fire=now - timedelta(days=2))


def test_arm_states_hold_each_jobs_planned_and_armed_fire(db: StateDB) -> None:
    db.put_job(_job("armed", armed_fire=T0 + MINUTE, armed_confirmed_at=T0))
    db.put_job(_job("idle", next_fire=None))
    arms = db.arm_states()
    assert arms["armed"] == (T0 + MINUTE, T0 + MINUTE, T0)
    assert arms["idle"] == (None, None, None)
    assert set(arms) == {"armed", "idle"}


def test_put_jobs_writes_all_states_in_one_transaction_or_none(db: StateDB) -> None:
    db.put_jobs([_job("a"), _job("b", spec_hash="h2")])
    assert db.get_job("b") == _job("b", spec_hash="h2")
    raw = _raw(db)
    raw.execute(
        "CREATE TRIGGER refuse_d BEFORE INSERT ON job_state WHEN NEW.job_id = 'd' "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    raw.close()
    with pytest.raises(StateError, match="refused"):
        db.put_jobs([_job("a", spec_hash="h3"), _job("c"), _job("d")])
    assert db.get_job("a") == _job("a")  # the batch's earlier rows were rolled back
    assert db.get_job("c") is None
    db.put_jobs([])  # nothing to write: no transaction


def test_a_new_database_another_process_is_creating_is_waited_for(tmp_path: Path) -> None:
    import threading
    import time

    path = tmp_path / "state.db"
    path.touch(mode=0o600)
    creator = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    creator.execute("BEGIN IMMEDIATE")  # still in rollback mode: turning it to WAL must wait
    creator.execute("CREATE TABLE elsewhere (a)")
    timer = threading.Timer(0.3, lambda: creator.execute("COMMIT"))
    started = time.monotonic()
    timer.start()
    try:
        with StateDB.open(tmp_path) as db:
            assert db.get_meta("x") is None
        assert time.monotonic() - started >= 0.2
    finally:
        timer.join()
        creator.close()
    # A lock that outlasts busy_timeout still fails, as one line.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    (other / "state.db").touch(mode=0o600)
    holder = sqlite3.connect(other / "state.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE elsewhere (a)")
    try:
        with pytest.raises(StateError, match="configuring failed: database is locked"):
            StateDB.open(other, busy_timeout=0.2)
    finally:
        holder.close()
