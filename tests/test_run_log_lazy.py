"""A claim records a run's log path only; the runner creates the log when the run starts.

Real SQLite files, real subprocesses: what moved out of the claim's transaction (the run's
directory and empty log) must still be made, private, when the run starts, and every reader
must take a run without a log as one with empty output.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from chronosd import planner
from chronosd.errors import StateError
from chronosd.runner import RunSpec, run_job
from chronosd.state import JobState, RunRecord, StateDB
from tests.jobtools import T0, make_job
from tests.test_fire import gate, py, rig

S = timedelta(seconds=1)
OWNER = "host:1:me"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[StateDB]:
    with StateDB.open(tmp_path / "state", owner=OWNER) as opened:
        opened.put_job(
            JobState(
                job_id="backup",
                spec_hash="h",
                schedule_key="",
                anchor=T0,
                next_fire=T0,
                armed_fire=None,
                armed_confirmed_at=None,
                runs_started=0,
                last_run_id=None,
                last_status=None,
                completed=False,
            )
        )
        yield opened


def _claim(db: StateDB) -> RunRecord | None:
    return db.claim_advance_and_start(
        "backup", T0, owner=OWNER, trigger="schedule", now=T0, next_fire=T0 + S, durable=False
    )


def _stored_paths(db: StateDB) -> list[str]:
    with sqlite3.connect(db.path) as conn:
        return [row[0] for row in conn.execute("SELECT output_path FROM runs")]


def test_a_claim_records_the_relative_log_path_and_touches_no_file(db: StateDB) -> None:
    run = _claim(db)
    assert run is not None
    assert db.get_run(run.run_id) == run
    assert _stored_paths(db) == [f"runs/backup/{run.run_id}.log"]
    assert run.output_path == db.run_log_path("backup", run.run_id)
    assert not (db.state_dir / "runs").exists()
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None and (occurrence.state, occurrence.owner) == ("running", OWNER)


def test_a_name_taken_by_a_left_over_log_or_a_recorded_run_is_not_reused(
    db: StateDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    draws = iter([b"\x00" * 4, b"\x00" * 4, b"\x01" * 4, b"\x02" * 4])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    first = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
    assert first.run_id == "20260302T120000Z-00000000"
    # The same draw again: taken by the recorded run (whose log does not exist yet).
    second = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
    assert second.run_id.endswith("-01010101")
    # A log left behind by a deleted run (a crash between a prune's commit and its unlink).
    orphan = db.run_log_path("backup", second.run_id.replace("01010101", "02020202"))
    orphan.parent.mkdir(parents=True)
    orphan.write_text("someone else's output\n")
    draws = iter([b"\x02" * 4, b"\x03" * 4])
    third = db.start_run("backup", T0, attempt=1, trigger="schedule", now=T0)
    assert third.run_id.endswith("-03030303")
    assert orphan.read_text() == "someone else's output\n"


def test_a_claim_that_cannot_pick_a_run_id_writes_nothing(
    db: StateDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.start_run("backup", T0 - S, attempt=1, trigger="manual", now=T0)
    taken = db.runs("backup")[0].run_id.rsplit("-", 1)[1]
    monkeypatch.setattr(os, "urandom", lambda n: bytes.fromhex(taken))
    with pytest.raises(StateError, match="could not pick an unused run id"):
        _claim(db)
    js = db.get_job("backup")
    assert js is not None and (js.next_fire, js.runs_started) == (T0, 0)
    assert db.get_occurrence("backup", T0) is None
    assert len(db.runs("backup")) == 1


def test_recovery_and_undo_of_runs_without_a_log(db: StateDB) -> None:
    run = _claim(db)
    assert run is not None
    db.undo_claim("backup", T0, run_id=run.run_id, planned=T0 + S, next_fire=T0, completed=False)
    assert db.runs() == [] and db.get_occurrence("backup", T0) is None
    again = _claim(db)
    assert again is not None
    (interrupted,) = db.recover_interrupted(now=T0 + S, is_alive=lambda owner: False)
    assert interrupted.run_id == again.run_id
    assert interrupted.status == "interrupted" and not interrupted.output_path.exists()
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None and occurrence.state == "interrupted"
    assert db.prune_runs("backup", keep=0) == 1


def test_set_run_pid_with_a_start_dates_the_occurrences_running_state(db: StateDB) -> None:
    run = _claim(db)
    assert run is not None
    db.set_run_pid(run.run_id, 4242)
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None and occurrence.updated_at == T0
    db.set_run_pid(run.run_id, 4243, started_at=T0 + 5 * S)
    occurrence = db.get_occurrence("backup", T0)
    assert occurrence is not None
    assert (occurrence.state, occurrence.updated_at, occurrence.claimed_at) == (
        "running",
        T0 + 5 * S,
        T0,
    )
    started = db.get_run(run.run_id)
    assert started is not None and (started.pid, started.started_at) == (4243, T0 + 5 * S)


@pytest.mark.anyio
async def test_the_runner_creates_missing_log_directories_0700_and_the_log_0600(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    log = state / "runs" / "job" / "r.log"
    old = os.umask(0)
    try:
        spec = RunSpec(
            argv=("/bin/sh", "-c", "echo hello"),
            env={"PATH": "/usr/bin:/bin"},
            stdin=b"{}",
            cwd=None,
            timeout=15,
            output_path=log,
        )
        with anyio.fail_after(30):
            outcome = await run_job(spec)
    finally:
        os.umask(old)
    assert outcome.status == "ok"
    assert log.read_text() == "hello\n"
    assert (_mode(log), _mode(log.parent), _mode(log.parent.parent)) == (0o600, 0o700, 0o700)
    assert _mode(state) == 0o755  # existing directories are left as they are


@pytest.mark.anyio
async def test_a_fired_run_creates_its_log_and_dates_running_at_its_start(
    tmp_path: Path,
) -> None:
    command, open_gate = gate(tmp_path)
    async with rig(tmp_path, make_job(id="hello", command=command)) as r:
        r.clock.now = T0 + 60 * S
        result = r.engine.handle_fire("hello", T0 + 60 * S)
        assert result.status == "accepted" and result.start is not None
        (run,) = r.runs("hello")
        assert not run.output_path.exists()
        r.clock.advance(5)  # the run starts later than its claim
        result.start()
        with anyio.fail_after(20):
            while (started := r.db.get_run(run.run_id)) is None or started.pid is None:
                await anyio.sleep(0.02)
        occurrence = r.db.get_occurrence("hello", T0 + 60 * S)
        assert occurrence is not None
        assert (occurrence.state, occurrence.owner) == ("running", r.db.owner)
        assert (occurrence.claimed_at, occurrence.updated_at) == (T0 + 60 * S, T0 + 65 * S)
        assert started.started_at == T0 + 65 * S and started.status == "running"
        assert run.output_path.exists()
        assert _mode(run.output_path) == 0o600 and _mode(run.output_path.parent) == 0o700
        open_gate()
    (done,) = r.runs("hello")
    assert done.status == "ok" and done.output_path == run.output_path
    occurrence = r.db.get_occurrence("hello", T0 + 60 * S)
    assert occurrence is not None and occurrence.state == "done"


@pytest.mark.anyio
async def test_a_retry_records_a_new_run_with_its_own_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planner, "RETRY_BASE", 0.05)
    job = make_job(
        id="hello",
        schedule="every 60s",
        command=py("import os, sys; print(os.environ['CHRONOS_ATTEMPT']); sys.exit(1)"),
        retries=1,
    )
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 60 * S
        r.fire("hello", T0 + 60 * S)
    retry, first = r.runs("hello")
    assert (first.attempt, retry.attempt, retry.trigger) == (1, 2, "retry")
    assert first.output_path.read_text() == "1\n" and retry.output_path.read_text() == "2\n"
    assert retry.output_path.parent == first.output_path.parent
