"""A burst of deliveries: runs and far re-arms wait until the deliveries have been answered.

Real state databases in tmp_path, real subprocesses, an injected clock. The WAL fsync of the
group commit is held by the test, so which deliveries are in flight is decided here, not by
timing; nothing asserts on durations.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from chronosd import fire as fire_module
from chronosd.config import Config, RunnerConfig
from chronosd.daemon.idle import IdleTracker
from chronosd.errors import StateError
from chronosd.fire import Engine, FireResult
from chronosd.jobs.model import Job
from chronosd.state import StateDB
from tests.jobtools import T0, make_job

pytestmark = pytest.mark.anyio
DAY = timedelta(days=1)
# Every wait in this file is bounded by this.
LIMIT = 20.0


class HeldDB(StateDB):
    """A StateDB whose group-commit fsync waits until the test lets one round through."""

    rounds: threading.Semaphore
    started: int

    def sync_wal(self) -> None:
        self.started += 1
        if not self.rounds.acquire(timeout=LIMIT):
            raise StateError("the test never let this sync through")
        super().sync_wal()


@dataclass
class Clock:
    now: datetime = T0 + DAY

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Rig:
    engine: Engine
    db: HeldDB
    idle: IdleTracker
    reconciled: list[str] = field(default_factory=list)
    results: dict[str, FireResult] = field(default_factory=dict)

    async def fire(self, job_id: str) -> None:
        result = await self.engine.fire(job_id, T0 + DAY)
        self.results[job_id] = result
        if result.start is not None:
            result.start()

    async def until(self, condition: Any) -> None:
        with anyio.fail_after(LIMIT):
            while not condition():
                await anyio.sleep(0.01)


def held_engine(tmp_path: Path) -> tuple[Engine, HeldDB, IdleTracker, list[str]]:
    """An Engine on a HeldDB (its fsyncs wait for the test), and the job ids it re-arms."""
    db = HeldDB.open(tmp_path / "state")
    assert isinstance(db, HeldDB)
    db.rounds = threading.Semaphore(0)
    db.started = 0
    config = Config(
        jobs=tmp_path / "jobs.json",
        state_dir=tmp_path / "state",
        runner=RunnerConfig(max_concurrent=4),
    )
    reconciled: list[str] = []
    idle = IdleTracker(idle_exit=None)
    engine = Engine(
        config=config,
        db=db,
        owner="burst:1:x",
        clock=Clock(),
        idle=idle,
        request_reconcile=reconciled.extend,
    )
    return engine, db, idle, reconciled


@asynccontextmanager
async def rig(tmp_path: Path, *jobs: Job) -> AsyncIterator[Rig]:
    engine, db, idle, reconciled = held_engine(tmp_path)
    async with anyio.create_task_group() as tg:
        engine.bind(tg)
        engine.apply_jobs(list(jobs), now=T0)
        reconciled.clear()  # what apply_jobs asked for is not the point here
        r = Rig(engine, db, idle, reconciled)
        try:
            yield r
        finally:
            db.rounds.release(100)  # whatever still waits may go now
        with anyio.fail_after(LIMIT):
            await engine.wait_runs()


def daily(job_id: str) -> Job:
    return make_job(id=job_id, schedule="every 1d", command=["true"])


def pid_of(r: Rig, job_id: str) -> int | None:
    run_id = r.results[job_id].run_id
    assert run_id is not None
    record = r.db.get_run(run_id)
    assert record is not None
    return record.pid


async def test_runs_and_far_rearms_wait_until_the_burst_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their bounds out of reach: what ends the wait here is the last answer, nothing else.
    monkeypatch.setattr(fire_module, "_RUN_DEFER", 60.0)
    monkeypatch.setattr(fire_module, "_REARM_DEFER", 60.0)
    burst = [f"b{i}" for i in range(5)]
    async with rig(tmp_path, *(daily(job_id) for job_id in [*burst, "last"])) as r:
        async with anyio.create_task_group() as tg:
            for job_id in burst:
                tg.start_soon(r.fire, job_id)
            # The first claim leads a round of its own, the others share the next one.
            await r.until(lambda: len(r.engine._unsettled) == len(burst))
            r.db.rounds.release()
            await r.until(lambda: r.db.started == 2)
            tg.start_soon(r.fire, "last")  # claimed after that round began: the third
            await r.until(lambda: ("last", T0 + DAY) in r.engine._unsettled)
            r.db.rounds.release()
            await r.until(lambda: len(r.results) == len(burst))
            # "last" is still being answered: the burst's runs have not started their
            # processes and their re-arms (next fire a day away) are held, the daemon kept up.
            await anyio.sleep(0.2)
            assert [r.results[job_id].http_status for job_id in burst] == [202] * len(burst)
            assert all(pid_of(r, job_id) is None for job_id in burst)
            assert r.reconciled == []
            assert r.idle.busy_reasons.get("rearm") == 1
            r.db.rounds.release()
        assert r.results["last"].http_status == 202
        # The last delivery of the burst was answered alone: its re-arm goes at once.
        assert r.reconciled[0] == "last"
        await r.until(lambda: sorted(r.reconciled) == sorted([*burst, "last"]))
        assert "rearm" not in r.idle.busy_reasons
        with anyio.fail_after(LIMIT):
            await r.engine.wait_runs()
        for job_id in [*burst, "last"]:
            (run,) = r.db.runs(job_id)
            assert (run.status, run.pid) == ("ok", pid_of(r, job_id))
            assert run.pid is not None


async def test_rearm_of_a_next_fire_close_ahead_is_never_held(tmp_path: Path) -> None:
    # Every 30 s: the next fire is 30 s after the claim, too close to arm late.
    soon = make_job(id="soon", schedule="every 30s", command=["true"])
    async with rig(tmp_path, soon, daily("other")) as r:
        async with anyio.create_task_group() as tg:
            tg.start_soon(r.fire, "other")
            tg.start_soon(r.fire, "soon")
            await r.until(lambda: len(r.engine._unsettled) == 2)
            r.db.rounds.release(2)
        # "soon" was claimed while "other" was in flight, yet re-armed at once; "other" (the
        # first claim, next fire a day away) was held until the deliveries were answered.
        assert r.reconciled[0] == "soon"
        await r.until(lambda: sorted(r.reconciled) == ["other", "soon"])


async def test_lone_fire_rearms_and_runs_at_once(tmp_path: Path) -> None:
    async with rig(tmp_path, daily("alone")) as r:
        r.db.rounds.release()
        await r.fire("alone")
        assert r.results["alone"].http_status == 202
        assert r.reconciled == ["alone"]
        assert "rearm" not in r.idle.busy_reasons
        with anyio.fail_after(LIMIT):
            await r.engine.wait_runs()
        (run,) = r.db.runs("alone")
        assert run.status == "ok" and run.pid is not None


async def test_held_rearms_are_requested_when_the_engine_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fire_module, "_REARM_DEFER", 60.0)
    burst = [f"c{i}" for i in range(3)]
    engine, db, idle, reconciled = held_engine(tmp_path)
    results: list[FireResult] = []

    async def fire(job_id: str) -> None:
        results.append(await engine.fire(job_id, T0 + DAY))

    with anyio.fail_after(LIMIT):
        async with anyio.create_task_group() as outer:
            engine.bind(outer)
            engine.apply_jobs([daily(job_id) for job_id in [*burst, "held"]], now=T0)
            reconciled.clear()
            async with anyio.create_task_group() as tg:
                for job_id in burst:
                    tg.start_soon(fire, job_id)
                while len(engine._unsettled) < len(burst):
                    await anyio.sleep(0.01)
                db.rounds.release()
                while db.started < 2:
                    await anyio.sleep(0.01)
                tg.start_soon(fire, "held")
                while ("held", T0 + DAY) not in engine._unsettled:
                    await anyio.sleep(0.01)
                db.rounds.release()
                while len(results) < len(burst):
                    await anyio.sleep(0.01)
                assert reconciled == []
                # Shutdown while "held" is still being answered: the held re-arms are handed
                # to the reconciler on the way out, not dropped. ("held" itself settles
                # shielded, alone by then, and asks at once.)
                outer.cancel_scope.cancel()
                db.rounds.release(10)
    assert sorted(reconciled) == sorted([*burst, "held"])
    assert "rearm" not in idle.busy_reasons
