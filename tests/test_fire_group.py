"""Group commit of claims, early claims that start at their instant, pre-wake, cheap repeats.

Real state databases in tmp_path, real subprocesses and the real wall clock where the order
of a start and its instant is the point (instants a second or two ahead; nothing asserts on
durations, only on order: a job's own start time is never before its instant).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from chronosd import planner
from chronosd.config import Config, NasConfig, ProviderConfig, RunnerConfig
from chronosd.daemon.idle import IdleTracker
from chronosd.errors import StateError
from chronosd.fire import Engine, FireResult
from chronosd.jobs.model import Job
from chronosd.providers.local import LEAD, LocalProvider
from chronosd.state import StateDB, SyncGroup
from chronosd.timefmt import to_wire, utc_now
from tests.jobtools import T0, make_job

pytestmark = pytest.mark.anyio
S = timedelta(seconds=1)


class FlakyDB(StateDB):
    """A StateDB whose WAL fsync can be made to fail, as a dying disk's would."""

    fail_sync = 0  # how many syncs fail from now on

    def sync_wal(self) -> None:
        if self.fail_sync:
            self.fail_sync -= 1
            raise StateError(f"state database {self.path}: syncing failed: Input/output error")
        super().sync_wal()


@dataclass
class Rig:
    engine: Engine
    db: FlakyDB
    tmp: Path
    reconciled: list[str] = field(default_factory=list)

    async def fire(self, job_id: str, fire_at: datetime, **kw: Any) -> FireResult:
        result = await self.engine.fire(job_id, fire_at, **kw)
        if result.start is not None:
            result.start()
        return result

    def runs(self, job_id: str) -> list[Any]:
        return self.db.runs(job_id, limit=100)

    async def settle(self) -> None:
        with anyio.fail_after(20):
            await self.engine.wait_runs()


@asynccontextmanager
async def rig(
    tmp_path: Path,
    *jobs: Job,
    clock: Callable[[], datetime] = utc_now,
    idle: IdleTracker | None = None,
    **engine_kw: Any,
) -> AsyncIterator[Rig]:
    db = FlakyDB.open(tmp_path / "state")
    assert isinstance(db, FlakyDB)
    config = Config(
        jobs=tmp_path / "jobs.json", state_dir=tmp_path / "state", runner=RunnerConfig()
    )
    reconciled: list[str] = []
    engine = Engine(
        config=config,
        db=db,
        owner="group:1:x",
        clock=clock,
        idle=idle,
        request_reconcile=reconciled.extend,
        **engine_kw,
    )
    # The database stays open after the block so that tests can inspect it.
    async with anyio.create_task_group() as tg:
        engine.bind(tg)
        engine.apply_jobs(list(jobs))
        r = Rig(engine, db, tmp_path, reconciled)
        yield r
        await r.settle()


def whole_seconds_ahead(seconds: int) -> datetime:
    return utc_now().replace(microsecond=0) + timedelta(seconds=seconds)


def one_shot(job_id: str, at: datetime, command: list[str], **record: Any) -> Job:
    return make_job(
        now=utc_now(), id=job_id, schedule=f"at {to_wire(at)}", command=command, **record
    )


def stamp(path: Path) -> list[str]:
    """A job that appends its own start time (epoch seconds) to ``path``."""
    code = f"import time\nopen({str(path)!r}, 'a').write(repr(time.time()) + '\\n')"
    return [sys.executable, "-c", code]


def stamps(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def claimed_rows(db: StateDB) -> list[tuple[str, str]]:
    raw = sqlite3.connect(db.path)
    try:
        return raw.execute("SELECT job_id, state FROM occurrences ORDER BY job_id").fetchall()
    finally:
        raw.close()


# ---------------------------------------------------------------------- the group itself
async def test_sync_group_serves_every_waiter_that_arrived_before_it_began() -> None:
    began: list[int] = []
    release = anyio.Event()
    calls = 0

    def sync() -> None:
        nonlocal calls
        calls += 1
        began.append(calls)
        anyio.from_thread.run(release.wait)

    group = SyncGroup(sync)
    done: list[str] = []

    async def waiter(name: str) -> None:
        await group.wait()
        done.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "first")
        with anyio.fail_after(10):
            while not began:
                await anyio.sleep(0.01)
        # These arrive while the first sync runs: they share the next one.
        for name in ("second", "third", "fourth"):
            tg.start_soon(waiter, name)
        await anyio.sleep(0.05)
        assert done == [] and began == [1]
        release.set()
    assert sorted(done) == ["first", "fourth", "second", "third"]
    assert group.rounds == 2


async def test_a_failed_sync_fails_its_waiters_and_the_next_round_starts_afresh() -> None:
    failures = [OSError(5, "Input/output error")]

    def sync() -> None:
        if failures:
            raise failures.pop()

    group = SyncGroup(sync)
    with pytest.raises(StateError, match="Input/output error"):
        await group.wait()
    await group.wait()
    assert group.rounds == 2


async def test_rounds_checkpoint_in_a_worker_thread_at_most_every_interval() -> None:
    threads: list[bool] = []
    group = SyncGroup(
        lambda: None,
        checkpoint=lambda: threads.append(threading.current_thread() is threading.main_thread()),
        checkpoint_every=3600,
        checkpoint_after=2,
    )
    await group.wait()
    assert (group.rounds, group.checkpoints) == (1, 0)  # a lone caller waits for no checkpoint
    for _ in range(3):
        await group.wait()
    assert (group.rounds, group.checkpoints, threads) == (4, 1, [False])
    group._checkpoint_at = 0.0  # as if the interval had passed: two callers were served since
    await group.wait()
    assert group.checkpoints == 2
    await group.wait()
    assert group.checkpoints == 2  # one caller since, and the interval starts again


async def test_a_failed_checkpoint_is_logged_and_the_round_still_succeeds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def checkpoint() -> None:
        raise StateError("state database x: checkpointing the write-ahead log failed: disk I/O")

    group = SyncGroup(lambda: None, checkpoint=checkpoint, checkpoint_every=0, checkpoint_after=1)
    await group.wait()
    await group.wait()
    assert (group.rounds, group.checkpoints) == (2, 0)
    assert capsys.readouterr().out.count("state.checkpoint_failed") == 2


async def test_the_engine_copies_claimed_pages_into_the_database_off_the_event_loop(
    tmp_path: Path,
) -> None:
    at = whole_seconds_ahead(50)
    jobs = [one_shot(f"c{n}", at, ["true"]) for n in range(4)]
    async with rig(tmp_path, *jobs) as r:
        r.engine._sync._checkpoint_every = 0
        r.engine._sync._checkpoint_after = 2
        # The daemon's own commits checkpoint only far past SQLite's 1,000 pages.
        assert r.db._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4096
        for job in jobs:
            assert (await r.engine.fire(job.id, at)).status == "accepted"
        assert r.engine._sync.checkpoints >= 1
        # The database file itself holds the claims: read with the log ignored (immutable),
        # which four claims would never reach through SQLite's own 1,000-page checkpoint.
        raw = sqlite3.connect(f"{r.db.path.as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            (claimed,) = raw.execute("SELECT count(*) FROM occurrences").fetchone()
        finally:
            raw.close()
        assert claimed == 4


# ---------------------------------------------------------------------- group commit
async def test_concurrent_fires_share_fsyncs_and_each_answer_follows_a_sync_of_its_claim(
    tmp_path: Path,
) -> None:
    at = whole_seconds_ahead(50)
    jobs = [one_shot(f"g{n}", at, ["true"]) for n in range(8)]
    async with rig(tmp_path, *jobs) as r:
        syncs: list[set[str]] = []  # the claims committed when each sync began
        real_sync = r.db.sync_wal

        def recording_sync() -> None:
            raw = sqlite3.connect(r.db.path)
            try:
                syncs.append({row[0] for row in raw.execute("SELECT job_id FROM occurrences")})
            finally:
                raw.close()
            real_sync()

        r.db.sync_wal = recording_sync  # type: ignore[method-assign]
        answered: dict[str, int] = {}

        async def deliver(job_id: str) -> None:
            result = await r.engine.fire(job_id, at)  # not started: claims are the point
            assert result.status == "accepted", result
            answered[job_id] = len(syncs)  # syncs begun (and, the group being serial, done)

        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(deliver, job.id)
    assert len(syncs) < len(jobs)
    for job_id, synced in answered.items():
        assert any(job_id in claims for claims in syncs[:synced]), (job_id, syncs)
    assert [job_id for job_id, _ in claimed_rows(r.db)] == sorted(answered)


async def test_a_failed_fsync_takes_the_claim_back_and_the_retry_claims_and_runs(
    tmp_path: Path,
) -> None:
    at = whole_seconds_ahead(50)
    marker = tmp_path / "ran"
    job = one_shot("disk", at, stamp(marker))
    async with rig(tmp_path, job) as r:
        before = r.db.get_job("disk")
        r.db.fail_sync = 1
        first = await r.fire("disk", at)
        assert (first.status, first.http_status, first.start) == ("unavailable", 503, None)
        # Nothing of the claim stands: no occurrence, no run, no log, the plan as it was.
        assert claimed_rows(r.db) == []
        assert r.runs("disk") == []
        assert not list((r.tmp / "state").glob("runs/disk/*.log"))
        assert r.db.get_job("disk") == before
        # The NAS retries: now it is claimed, acknowledged once, and runs once.
        retried = await r.fire("disk", at)
        assert (retried.status, retried.http_status) == ("accepted", 202)
        again = await r.fire("disk", at)
        assert again.status == "duplicate"
    assert len(stamps(marker)) == 1
    assert [run.status for run in r.runs("disk")] == ["ok"]


async def test_a_repeat_during_a_failing_fsync_is_not_acknowledged_as_a_duplicate(
    tmp_path: Path,
) -> None:
    at = whole_seconds_ahead(50)
    job = one_shot("twice", at, ["true"])
    async with rig(tmp_path, job) as r:
        r.db.fail_sync = 3
        answers: list[FireResult] = []

        async def deliver() -> None:
            answers.append(await r.fire("twice", at))

        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver)
            tg.start_soon(deliver)
        # A "duplicate" would stop the NAS's retries of an occurrence that is not claimed.
        assert sorted(a.http_status for a in answers) == [503, 503]
        assert claimed_rows(r.db) == []
        r.db.fail_sync = 0
        assert (await r.fire("twice", at)).status == "accepted"
    assert len(r.runs("twice")) == 1


# ---------------------------------------------------------------------- early claims
async def test_a_local_timer_fire_claims_ahead_and_starts_the_job_at_its_instant(
    tmp_path: Path,
) -> None:
    instant = whole_seconds_ahead(2)
    marker = tmp_path / "started"
    job = one_shot("local", instant, stamp(marker))
    provider = LocalProvider()
    calls: list[datetime] = []
    async with rig(tmp_path, job) as r:

        async def on_due(job_id: str, fire_at: datetime) -> None:
            calls.append(fire_at)
            await r.fire(job_id, fire_at, at_instant=True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(provider.run, on_due)
            await provider.arm("local", instant)
            with anyio.fail_after(15):
                while not stamps(marker):
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    assert calls == [instant]
    (started,) = stamps(marker)
    assert started >= instant.timestamp()
    (run,) = r.runs("local")
    assert run.status == "ok" and run.started_at >= instant


async def test_an_early_claim_holds_the_daemon_busy_until_its_run_ends(tmp_path: Path) -> None:
    instant = whole_seconds_ahead(2)
    marker = tmp_path / "started"
    idle = IdleTracker(0)
    async with rig(tmp_path, one_shot("busy", instant, stamp(marker)), idle=idle) as r:
        result = await r.fire("busy", instant, at_instant=True)
        assert result.status == "accepted"
        # Waiting for the instant counts as a run: no idle exit meanwhile.
        assert r.engine.active_runs == 1 and idle.busy_reasons == {"run": 1}
        assert not idle.is_idle
        await r.settle()
        assert idle.busy_reasons == {}
    assert stamps(marker)[0] >= instant.timestamp()


async def test_stopping_runs_before_the_instant_never_starts_the_early_claim(
    tmp_path: Path,
) -> None:
    instant = whole_seconds_ahead(30)
    marker = tmp_path / "started"
    async with rig(tmp_path, one_shot("halt", instant, stamp(marker))) as r:
        assert (await r.fire("halt", instant, at_instant=True)).status == "accepted"
        r.engine.stop_runs()
        await r.settle()
    assert stamps(marker) == []
    # Left as running for the next start's recovery, as after a crash.
    assert [run.status for run in r.runs("halt")] == ["running"]


async def test_an_early_delivery_of_the_instant_itself_still_starts_at_once(
    tmp_path: Path,
) -> None:
    # The NAS's clock may run ahead of ours: a fire up to 60 s early is its idea of the instant.
    at = whole_seconds_ahead(40)
    marker = tmp_path / "started"
    async with rig(tmp_path, one_shot("skew", at, stamp(marker))) as r:
        assert (await r.fire("skew", at)).status == "accepted"
    assert stamps(marker)[0] < at.timestamp()


async def test_an_early_claim_while_a_run_is_alive_decides_the_overlap_at_its_instant(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    command = [
        sys.executable,
        "-c",
        f"import os,time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.02)",
    ]
    job = make_job(now=utc_now(), id="ovl", schedule="every 1s", command=command, overlap="skip")
    async with rig(tmp_path, job) as r:
        js = r.db.get_job("ovl")
        assert js is not None and js.next_fire is not None
        first = js.next_fire
        assert (await r.fire("ovl", first)).status == "accepted"
        with anyio.fail_after(10):
            while not r.engine.running_jobs():
                await anyio.sleep(0.02)
        second = first + S
        answer = await r.fire("ovl", second, at_instant=True)
        assert (answer.status, answer.http_status) == ("accepted", 202)
        with anyio.fail_after(10):
            while (occ := r.db.get_occurrence("ovl", second)) is None or occ.state != "skipped":
                await anyio.sleep(0.02)
        gate.touch()
    assert [run.scheduled_at for run in r.runs("ovl")] == [first]


# ---------------------------------------------------------------------- pre-wake
def nas_config(tmp_path: Path, prewake: float) -> Config:
    return Config(
        jobs=tmp_path / "jobs.json",
        state_dir=tmp_path / "state",
        provider=ProviderConfig(kind="nas", nas=NasConfig(prewake=prewake)),
    )


def test_the_engine_takes_its_prewake_from_the_nas_configuration(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path / "state")
    try:
        assert Engine(config=nas_config(tmp_path, 7), db=db, owner="o:1:x").prewake == 7
        local = Config(jobs=tmp_path / "jobs.json", state_dir=tmp_path / "state")
        assert Engine(config=local, db=db, owner="o:1:x").prewake == 0
        assert Engine(config=local, db=db, owner="o:1:x", prewake=3).prewake == 3
    finally:
        db.close()


async def test_prewake_arms_early_and_a_waypoint_stays_earlier_than_the_prewake(
    tmp_path: Path,
) -> None:
    job = make_job(id="pw", schedule="every 1h", jitter="10m", command=["true"])
    async with rig(tmp_path, job, clock=lambda: T0, prewake=20) as r:
        js = r.db.get_job("pw")
        assert js is not None and js.next_fire is not None
        instant = planner.arm_instant(job, js.next_fire)
        assert r.engine.desired_arm("pw") == instant - 20 * S
        assert r.engine.desired_arm("pw", use_horizon=False) == instant  # local fallback
        r.engine.max_horizon = 600
        assert r.engine.desired_arm("pw") == T0 + 600 * S < instant - 20 * S


async def test_a_prewake_fire_answers_at_once_and_the_job_starts_at_its_instant(
    tmp_path: Path,
) -> None:
    instant = whole_seconds_ahead(3)
    marker = tmp_path / "started"
    job = one_shot("nas", instant, stamp(marker))
    async with rig(tmp_path, job, prewake=2) as r:
        armed = r.engine.desired_arm("nas")
        assert armed == instant - 2 * S
        r.db.update_job("nas", armed_fire=armed, armed_confirmed_at=utc_now())
        answers = [await r.fire("nas", armed), await r.fire("nas", armed)]
        assert [(a.status, a.http_status) for a in answers] == [
            ("accepted", 202),
            ("duplicate", 200),
        ]
        assert answers[0].run_id is not None
        occurrence = r.db.get_occurrence("nas", instant)
        assert occurrence is not None and occurrence.trigger == "schedule"
    (started,) = stamps(marker)
    assert started >= instant.timestamp()
    (run,) = r.runs("nas")
    assert run.scheduled_at == instant and run.status == "ok"


async def test_repeated_prewake_fires_of_a_recurring_job_run_it_once(tmp_path: Path) -> None:
    job = make_job(id="rep", schedule="every 1h", command=["true"])
    async with rig(tmp_path, job, clock=lambda: T0, prewake=30) as r:
        js = r.db.get_job("rep")
        assert js is not None and js.next_fire == T0 + 3600 * S
        armed = js.next_fire - 30 * S
        r.db.update_job("rep", armed_fire=armed, armed_confirmed_at=T0)
        r.engine.clock = lambda: armed
        first = r.engine.handle_fire("rep", armed)
        assert first.status == "accepted"
        # Before the reconciler re-arms, the state still records the old pre-wake as armed:
        # a repeat is a duplicate (not a waypoint), in this life and in the next one.
        assert r.engine.handle_fire("rep", armed).status == "duplicate"
        r.engine._known.clear()
        assert r.engine.handle_fire("rep", armed).status == "duplicate"
        js = r.db.get_job("rep")
        assert js is not None and js.next_fire == T0 + 7200 * S and js.runs_started == 1
    assert len(r.runs("rep")) == 1  # recorded at the claim; never started here


async def test_an_armed_fire_before_the_prewake_window_is_still_a_waypoint(
    tmp_path: Path,
) -> None:
    job = make_job(id="far", schedule="every 30d", command=["true"])
    async with rig(tmp_path, job, clock=lambda: T0, prewake=10, max_horizon=7 * 86400) as r:
        waypoint = r.engine.desired_arm("far")
        assert waypoint == T0 + timedelta(days=7)
        r.db.update_job("far", armed_fire=waypoint, armed_confirmed_at=T0)
        r.engine.clock = lambda: waypoint
        result = r.engine.handle_fire("far", waypoint)
        assert result.status == "rearmed" and result.expected == T0 + timedelta(days=14)
    assert r.runs("far") == []


_CRASHER = """
import asyncio, os, signal, sys
from datetime import datetime
from pathlib import Path
import anyio
from chronosd.config import Config
from chronosd.fire import Engine
from chronosd.state import StateDB
from tests.jobtools import make_job
from chronosd.timefmt import parse_instant, utc_now

state, instant, marker = Path(sys.argv[1]), parse_instant(sys.argv[2]), sys.argv[3]
job = make_job(now=utc_now(), id="doomed", schedule="at " + sys.argv[2],
               command=["sh", "-c", "touch " + marker])

async def main():
    db = StateDB.open(state)
    engine = Engine(config=Config(jobs=state / "jobs.json", state_dir=state), db=db,
                    owner=db.owner)
    async with anyio.create_task_group() as tg:
        engine.bind(tg)
        engine.apply_jobs([job])
        result = await engine.fire("doomed", instant, at_instant=True)
        assert result.status == "accepted", result
        result.start()
        print("claimed", flush=True)
        await anyio.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main)
"""


def test_a_crash_between_an_early_claim_and_its_instant_is_recovered_as_interrupted(
    tmp_path: Path,
) -> None:
    instant = whole_seconds_ahead(20)
    marker = tmp_path / "ran"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_CRASHER),
            str(tmp_path / "state"),
            to_wire(instant),
            str(marker),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "claimed" in child.stdout.splitlines()
    with StateDB.open(tmp_path / "state") as db:
        config = Config(jobs=tmp_path / "jobs.json", state_dir=tmp_path / "state")
        engine = Engine(config=config, db=db, owner=db.owner)
        engine.jobs = {
            "doomed": make_job(
                now=utc_now(), id="doomed", schedule=f"at {to_wire(instant)}", command=["true"]
            )
        }
        engine.recover()
        (run,) = db.runs("doomed")
        assert run.status == "interrupted"
        occurrence = db.get_occurrence("doomed", instant)
        assert occurrence is not None and occurrence.state == "interrupted"
        assert engine.pending_retries == []  # no `retries`: not run again
    assert not marker.exists()


# ---------------------------------------------------------------------- cheap repeats
async def test_a_repeated_delivery_is_answered_without_touching_the_database(
    tmp_path: Path,
) -> None:
    job = make_job(id="dup", schedule="*/5 * * * *", command=["true"])
    async with rig(tmp_path, job, clock=lambda: T0) as r:
        js = r.db.get_job("dup")
        assert js is not None and js.next_fire is not None
        at = js.next_fire
        r.engine.clock = lambda: at
        assert (await r.engine.fire("dup", at)).status == "accepted"
        statements: list[str] = []
        r.db._db.set_trace_callback(statements.append)
        try:
            for _ in range(3):
                assert (await r.engine.fire("dup", at)).payload() == {
                    "status": "duplicate",
                    "job_id": "dup",
                }
        finally:
            r.db._db.set_trace_callback(None)
        assert statements == []


async def test_a_repeat_after_a_schedule_change_is_judged_afresh(tmp_path: Path) -> None:
    job = make_job(id="chg", schedule="every 60s", command=["true"])
    async with rig(tmp_path, job, clock=lambda: T0) as r:
        r.engine.clock = lambda: T0 + 60 * S
        assert r.engine.handle_fire("chg", T0 + 60 * S).status == "accepted"
        assert r.engine.handle_fire("chg", T0 + 60 * S).status == "duplicate"
        r.engine.apply_jobs([make_job(id="chg", schedule="every 7s", command=["true"])])
        paused = make_job(id="chg", schedule="every 7s", paused=True, command=["true"])
        r.engine.apply_jobs([paused])
        assert r.engine.handle_fire("chg", T0 + 60 * S).status == "stale"
        r.engine.apply_jobs([])
        assert r.engine.handle_fire("chg", T0 + 60 * S).status == "gone"


async def test_a_duplicate_of_another_process_claim_waits_for_a_sync(tmp_path: Path) -> None:
    at = whole_seconds_ahead(50)
    job = one_shot("foreign", at, ["true"])
    async with rig(tmp_path, job) as r:
        other = StateDB.open(tmp_path / "state", owner="elsewhere:1:y")
        try:
            assert other.claim_advance_and_start(
                "foreign",
                at,
                owner="elsewhere:1:y",
                trigger="schedule",
                now=utc_now(),
                next_fire=None,
                completed=True,
                durable=False,
            )
        finally:
            other.close()
        rounds = r.engine._sync.rounds
        assert (await r.engine.fire("foreign", at)).status == "duplicate"
        assert r.engine._sync.rounds == rounds + 1
        assert (await r.engine.fire("foreign", at)).status == "duplicate"
        assert r.engine._sync.rounds == rounds + 1  # known durable now


# ---------------------------------------------------------------------- local timers
def test_local_timers_hand_an_arm_over_lead_seconds_before_its_instant() -> None:
    provider = LocalProvider(clock=lambda: T0)
    anyio.run(provider.arm, "a", T0 + 10 * S)
    assert provider._next_delay(T0) == pytest.approx(10 - LEAD)
    lead = timedelta(seconds=LEAD)
    assert provider._pop_due(T0 + 10 * S - 2 * lead) == []
    assert provider._pop_due(T0 + 10 * S - lead) == [("a", T0 + 10 * S)]


async def test_local_timers_due_together_are_handed_over_concurrently() -> None:
    provider = LocalProvider()
    at = utc_now() + timedelta(milliseconds=200)
    await provider.arm("a", at)
    await provider.arm("b", at)
    both = anyio.Event()
    seen: list[str] = []

    async def on_due(job_id: str, fire_at: datetime) -> None:
        seen.append(job_id)
        if len(seen) == 2:
            both.set()
        await both.wait()  # would never return if the calls ran one after the other

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(provider.run, on_due)
            await both.wait()
            tg.cancel_scope.cancel()
    assert sorted(seen) == ["a", "b"]


def test_at_is_whole_seconds_for_the_fixtures() -> None:
    assert whole_seconds_ahead(1).microsecond == 0 and whole_seconds_ahead(1).tzinfo is UTC
