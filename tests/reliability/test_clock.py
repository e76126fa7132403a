"""Clock trouble: the Engine's wall clock steps back an hour or forward a day.

The Engine runs with an injected clock and a real state database. A small
event-driven loop stands in for the local provider and the reconciler exactly as the daemon
wires them: a job is (re-)armed at ``Engine.desired_arm`` whenever the Engine asks for a
reconcile of it; an arm fires (and is consumed) once the clock reaches it; the clock jumps to
the earliest arm, as a timer would wait for it. An accepted fire is a start (its run is
recorded at the claim); the process itself is not spawned, so simulated hours take
milliseconds.

"Stops firing" means: after the clock passes the instant a job had planned, the job does not
fire again within one period (plus its grace). An hour of silence after the clock stepped back
an hour is expected (the next fire is planned from the previous scheduled instant, never from
"now"); a job that never fires again is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import pytest

from chronosd.config import Config, RunnerConfig
from chronosd.fire import Engine
from chronosd.jobs.model import Job
from chronosd.state import StateDB
from tests.jobtools import T0, make_job
from tests.reliability.conftest import Report

pytestmark = pytest.mark.anyio
S = timedelta(seconds=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Sim:
    engine: Engine
    db: StateDB
    clock: Clock
    pending: set[str] = field(default_factory=set)
    armed: dict[str, datetime] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)
    deliveries: int = 0

    def reconcile(self) -> None:
        for job_id in sorted(self.pending):
            desired = self.engine.desired_arm(job_id)
            if desired is None:
                self.armed.pop(job_id, None)
            else:
                self.armed[job_id] = desired
        self.pending.clear()

    async def run_until(self, end: datetime) -> None:
        """Fire what comes due while the clock moves to *end*, jumping from arm to arm."""
        self.reconcile()
        while True:
            due = [(at, job_id) for job_id, at in self.armed.items() if at <= self.clock.now]
            if not due:
                upcoming = [at for at in self.armed.values() if at <= end]
                if not upcoming:
                    self.clock.now = max(self.clock.now, end)
                    return
                self.clock.now = max(self.clock.now, min(upcoming))
                continue
            for at, job_id in sorted(due):
                del self.armed[job_id]
                self.deliveries += 1
                result = self.engine.handle_fire(job_id, at)
                self.answers[result.status] += 1
                if result.status == "too-early":
                    self.armed[job_id] = at  # a timer would simply fire it again later
                # The run is recorded at the claim; spawning it would only make the
                # simulated hours last real seconds.
            self.reconcile()
            await anyio.sleep(0)

    def starts(self, job_id: str) -> list[datetime]:
        return sorted(run.scheduled_at for run in self.db.runs(job_id, limit=100_000))


@contextlib.contextmanager
def _no_fsync(durable: bool) -> Iterator[None]:
    yield


@asynccontextmanager
async def simulation(tmp_path: Path, jobs: list[Job]) -> AsyncIterator[Sim]:
    clock = Clock()
    db = StateDB.open(tmp_path / "state")
    # Power-loss durability is not what this is about, and an fsync per claim would make the
    # simulated hours last a real quarter of a minute; the claims and their locking are the same.
    db._db.execute("PRAGMA synchronous = OFF")
    db._synchronous = _no_fsync  # type: ignore[method-assign]
    config = Config(
        jobs=tmp_path / "jobs.json",
        state_dir=tmp_path / "state",
        runner=RunnerConfig(max_concurrent=8, keep_runs=100_000),
    )
    pending: set[str] = set()
    engine = Engine(
        config=config, db=db, owner="clock-test:1:x", clock=clock, request_reconcile=pending.update
    )
    try:
        async with anyio.create_task_group() as tg:
            engine.bind(tg)
            sim = Sim(engine, db, clock, pending)
            engine.apply_jobs(jobs)
            yield sim
            with anyio.fail_after(60):
                await engine.wait_runs()
    finally:
        db.close()


def jobs_under_test() -> list[Job]:
    return [
        make_job(id="minute", schedule="* * * * *"),
        make_job(id="quarter", schedule="*/15 * * * *"),
        make_job(id="interval", schedule="every 90s"),
        make_job(id="hourly", schedule="0 * * * *"),
        make_job(id="seconds", schedule="*/20 * * * * *"),
    ]


PERIOD = {
    "minute": 60 * S,
    "quarter": 900 * S,
    "interval": 90 * S,
    "hourly": 3600 * S,
    "seconds": 20 * S,
}


def check_no_doubles(sim: Sim, job_ids: list[str]) -> int:
    doubles = 0
    for job_id in job_ids:
        counts = Counter(sim.starts(job_id))
        doubles += sum(n - 1 for n in counts.values() if n > 1)
    return doubles


def check_fires_again(sim: Sim, job_id: str, after: datetime, grace: timedelta) -> bool:
    """True when *job_id* started an occurrence after *after* and no later than *grace* past."""
    return any(after < at <= after + grace for at in sim.starts(job_id))


async def test_clock_stepping_back_an_hour_or_forward_a_day_fires_nothing_twice_nor_stops_a_job(
    tmp_path: Path, report: Report
) -> None:
    jobs = jobs_under_test()
    ids = [job.id for job in jobs]
    async with simulation(tmp_path, jobs) as sim:
        await sim.run_until(T0 + 2 * HOUR)
        first = {job_id: len(sim.starts(job_id)) for job_id in ids}
        assert all(first.values()), first

        # Back an hour: the planned fires stay where they were.
        planned: dict[str, datetime] = {}
        for job_id in ids:
            js = sim.db.get_job(job_id)
            assert js is not None and js.next_fire is not None
            planned[job_id] = js.next_fire
        before_back = {job_id: set(sim.starts(job_id)) for job_id in ids}
        sim.clock.now -= HOUR
        await sim.run_until(sim.clock.now + 3 * HOUR)
        stopped_after_back = [
            job_id
            for job_id in ids
            if not check_fires_again(sim, job_id, planned[job_id] - S, PERIOD[job_id] + 2 * S)
        ]
        # Nothing of the replayed hour fired again: every start after the step lies beyond
        # the last one started before it.
        replayed = sum(
            1
            for job_id in ids
            for at in set(sim.starts(job_id)) - before_back[job_id]
            if at <= max(before_back[job_id])
        )

        # Forward a day: each job catches up once, then fires on schedule again.
        before_jump = {job_id: len(sim.starts(job_id)) for job_id in ids}
        sim.clock.now += DAY
        jump_at = sim.clock.now
        await sim.run_until(jump_at + 2 * HOUR)
        catch_ups = Counter(
            run.job_id
            for job_id in ids
            for run in sim.db.runs(job_id, limit=100_000)
            if run.trigger == "catch-up"
        )
        stopped_after_jump = [
            job_id
            for job_id in ids
            if not check_fires_again(sim, job_id, jump_at + HOUR, PERIOD[job_id] + 2 * S)
        ]
        doubles = check_no_doubles(sim, ids)
        after_jump = {job_id: len(sim.starts(job_id)) - before_jump[job_id] for job_id in ids}
        report(
            jobs=len(ids),
            deliveries=sim.deliveries,
            runs=sum(len(sim.starts(job_id)) for job_id in ids),
            doubled=doubles,
            replayed_in_back_step=replayed,
            stopped_after_back=len(stopped_after_back),
            stopped_after_jump=len(stopped_after_jump),
            catch_up_runs=sum(catch_ups.values()),
            **{f"answers_{k.replace('-', '_')}": v for k, v in sorted(sim.answers.items())},
        )
    assert doubles == 0
    assert replayed == 0
    assert stopped_after_back == []
    assert stopped_after_jump == []
    # A day of missed occurrences coalesces into one catch-up run per job.
    assert catch_ups == Counter(ids)
    assert all(after_jump.values()), after_jump


# Regression test for a fixed bug: chronosd/fire.py Engine._handle_fire: a fire whose occurrence
# is already claimed is answered 'duplicate' without moving job_state.next_fire past it; when that
# occurrence is the job's planned one (resume or re-anchor while the clock is behind, a manual
# fire in the same second) the job never plans another fire (stranded)


async def test_job_paused_and_resumed_while_the_clock_is_an_hour_behind_keeps_firing(
    tmp_path: Path,
) -> None:
    jobs = jobs_under_test()
    async with simulation(tmp_path, jobs) as sim:
        await sim.run_until(T0 + 2 * HOUR)
        sim.clock.now -= HOUR
        # `chronosd pause minute` then `chronosd resume minute` while the clock is behind:
        # resuming plans from "now", an instant that was already claimed an hour ago.
        paused = [dataclasses.replace(j, paused=True) if j.id == "minute" else j for j in jobs]
        sim.engine.apply_jobs(paused)
        sim.engine.apply_jobs(jobs)
        resumed_at = sim.clock.now
        await sim.run_until(resumed_at + 3 * HOUR)
        last_before = T0 + 2 * HOUR
        assert check_fires_again(sim, "minute", last_before, PERIOD["minute"] + 2 * S), (
            sim.db.get_job("minute"),
            sim.answers,
        )
        assert check_no_doubles(sim, ["minute"]) == 0


async def test_manual_fire_in_the_second_of_the_planned_occurrence_does_not_strand_the_job(
    tmp_path: Path,
) -> None:
    job = make_job(id="every-second", schedule="* * * * * *")
    async with simulation(tmp_path, [job]) as sim:
        await sim.run_until(T0 + 10 * S)
        planned = sim.db.get_job("every-second").next_fire  # type: ignore[union-attr]
        assert planned is not None
        # `chronosd fire every-second` in the very second its next occurrence is due.
        sim.clock.now = planned
        manual = sim.engine.fire_manual("every-second")
        assert manual.status == "accepted"
        await sim.run_until(planned + 10 * S)
        assert check_fires_again(sim, "every-second", planned, 3 * S), (
            sim.db.get_job("every-second"),
            sim.answers,
        )
