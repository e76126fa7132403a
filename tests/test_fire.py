"""The fire flow with a real state database, real subprocesses and an injected clock."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from chronosd import planner
from chronosd.config import Config, RunnerConfig
from chronosd.fire import Engine, FireResult
from chronosd.jobs.model import Job
from chronosd.state import StateDB
from tests.jobtools import T0, make_job

pytestmark = pytest.mark.anyio
S = timedelta(seconds=1)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Rig:
    engine: Engine
    db: StateDB
    clock: Clock
    tmp: Path
    reconciled: list[str] = field(default_factory=list)

    def fire(self, job_id: str, fire_at: datetime) -> FireResult:
        result = self.engine.handle_fire(job_id, fire_at)
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
    tmp_path: Path, *jobs: Job, clock: Clock | None = None, max_horizon: float | None = None
) -> AsyncIterator[Rig]:
    clock = clock or Clock()
    db = StateDB.open(tmp_path / "state")
    config = Config(
        jobs=tmp_path / "jobs.json",
        state_dir=tmp_path / "state",
        runner=RunnerConfig(max_concurrent=4),
    )
    reconciled: list[str] = []
    engine = Engine(
        config=config,
        db=db,
        owner="test:1:x",
        clock=clock,
        request_reconcile=reconciled.extend,
        max_horizon=max_horizon,
    )
    # The database stays open after the block so that tests can inspect it.
    async with anyio.create_task_group() as tg:
        engine.bind(tg)
        engine.apply_jobs(list(jobs))
        r = Rig(engine, db, clock, tmp_path, reconciled)
        yield r
        await r.settle()


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def gate(tmp: Path, name: str = "gate") -> tuple[list[str], Callable[[], None]]:
    """A command that runs until the test opens the gate."""
    path = tmp / name
    cmd = py(f"import os,time\nwhile not os.path.exists({str(path)!r}): time.sleep(0.02)")
    return cmd, lambda: path.touch()


async def test_accepted_fire_claims_plans_next_then_runs(tmp_path: Path) -> None:
    job = make_job(
        id="hello",
        schedule="every 60s",
        command=py("import os; print('hi', os.environ['CHRONOS_TRIGGER'])"),
    )
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 60 * S
        result = r.engine.handle_fire("hello", T0 + 60 * S)
        assert (result.status, result.http_status) == ("accepted", 202)
        # Claimed and the next fire planned before anything runs.
        js = r.db.get_job("hello")
        assert js is not None and js.next_fire == T0 + 120 * S and js.runs_started == 1
        assert r.db.get_occurrence("hello", T0 + 60 * S) is not None
        assert "hello" in r.reconciled
        assert result.start is not None
        result.start()
        await r.settle()
        (run,) = r.runs("hello")
        assert run.status == "ok" and run.exit_code == 0 and run.trigger == "schedule"
        assert run.output_path.read_text() == "hi schedule\n"
        assert result.payload() == {"status": "accepted", "job_id": "hello", "run_id": run.run_id}


async def test_duplicate_fire_is_acknowledged_without_running(tmp_path: Path) -> None:
    job = make_job(id="once", schedule="every 60s", command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 60 * S
        assert r.fire("once", T0 + 60 * S).status == "accepted"
        second = r.fire("once", T0 + 60 * S)
        assert (second.status, second.http_status, second.start) == ("duplicate", 200, None)
        await r.settle()
        assert len(r.runs("once")) == 1


async def test_unknown_job_is_gone_and_paused_job_is_stale(tmp_path: Path) -> None:
    paused = make_job(id="p", paused=True, command=py("print(1)"))
    async with rig(tmp_path, paused) as r:
        assert r.fire("nope", T0).payload() == {"status": "gone", "job_id": "nope"}
        assert r.fire("p", T0 + 60 * S).payload() == {"status": "stale", "job_id": "p"}
        await r.settle()
        assert r.runs("p") == []


async def test_too_early_fire_is_refused_and_keeps_the_slot(tmp_path: Path) -> None:
    job = make_job(id="e", schedule="every 300s", command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 200 * S
        early = r.fire("e", T0 + 300 * S)
        assert early.http_status == 409
        assert early.payload() == {"error": "too early", "expected": "2026-03-02T12:05:00+00:00"}
        r.clock.now = T0 + 299 * S
        assert r.fire("e", T0 + 300 * S).status == "accepted"


async def test_fire_for_an_old_schedule_is_stale_after_a_change(tmp_path: Path) -> None:
    job = make_job(id="c", schedule="every 60s", command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 30 * S
        r.engine.apply_jobs([make_job(id="c", schedule="every 45s", command=py("print(1)"))])
        js = r.db.get_job("c")
        assert js is not None and js.anchor == T0 + 30 * S and js.next_fire == T0 + 75 * S
        r.clock.now = T0 + 60 * S
        assert r.fire("c", T0 + 60 * S).status == "stale"
        r.clock.now = T0 + 75 * S
        assert r.fire("c", T0 + 75 * S).status == "accepted"


async def test_overlap_skip_records_the_occurrence_as_skipped(tmp_path: Path) -> None:
    cmd, release = gate(tmp_path)
    job = make_job(id="s", schedule="every 10s", command=cmd, overlap="skip")
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 10 * S
        assert r.fire("s", T0 + 10 * S).status == "accepted"
        await _until(lambda: r.engine.running_jobs().get("s") == 1)
        r.clock.now = T0 + 20 * S
        assert r.fire("s", T0 + 20 * S).status == "skipped"
        occurrence = r.db.get_occurrence("s", T0 + 20 * S)
        assert occurrence is not None and occurrence.state == "skipped"
        release()
    assert len(r.runs("s")) == 1


async def test_overlap_queue_runs_one_waiting_occurrence_afterwards(tmp_path: Path) -> None:
    cmd, release = gate(tmp_path)
    job = make_job(id="q", schedule="every 10s", command=cmd, overlap="queue")
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 10 * S
        assert r.fire("q", T0 + 10 * S).status == "accepted"
        await _until(lambda: r.engine.running_jobs().get("q") == 1)
        r.clock.now = T0 + 20 * S
        assert r.fire("q", T0 + 20 * S).status == "accepted"  # queued
        r.clock.now = T0 + 30 * S
        assert r.fire("q", T0 + 30 * S).status == "skipped"  # at most one waits
        release()
    occurrences = sorted(run.scheduled_at for run in r.runs("q"))
    assert occurrences == [T0 + 10 * S, T0 + 20 * S]


async def test_overlap_replace_stops_the_running_one(tmp_path: Path) -> None:
    cmd, _release = gate(tmp_path)
    job = make_job(id="r", schedule="every 10s", command=cmd, overlap="replace")
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 10 * S
        assert r.fire("r", T0 + 10 * S).status == "accepted"
        await _until(lambda: r.engine.running_jobs().get("r") == 1)
        r.clock.now = T0 + 20 * S
        assert r.fire("r", T0 + 20 * S).status == "accepted"
        await _until(lambda: any(run.status == "killed" for run in r.runs("r")))
        _release()
    statuses = {run.scheduled_at: run.status for run in r.runs("r")}
    assert statuses == {T0 + 10 * S: "killed", T0 + 20 * S: "ok"}


async def test_overlap_allow_runs_side_by_side(tmp_path: Path) -> None:
    cmd, release = gate(tmp_path)
    job = make_job(id="a", schedule="every 10s", command=cmd, overlap="allow")
    async with rig(tmp_path, job) as r:
        for k in (1, 2):
            r.clock.now = T0 + 10 * k * S
            assert r.fire("a", T0 + 10 * k * S).status == "accepted"
        await _until(lambda: r.engine.running_jobs().get("a") == 2)
        release()
    assert [run.status for run in r.runs("a")] == ["ok", "ok"]


async def test_startup_after_downtime_catches_up_once(tmp_path: Path) -> None:
    job = make_job(id="cu", schedule="every 60s", command=py("print(1)"))
    clock = Clock()
    async with rig(tmp_path, job, clock=clock) as r:
        pass
    # Down for three hours: 180 occurrences passed.
    clock.advance(3 * 3600 + 5)
    async with rig(tmp_path, job, clock=clock) as r:
        touched = r.engine.catch_up()
        assert touched == ["cu"]
        await r.settle()
        runs = r.runs("cu")
        assert [(run.trigger, run.scheduled_at) for run in runs] == [("catch-up", T0 + 60 * S)]
        js = r.db.get_job("cu")
        assert js is not None and js.next_fire is not None and js.next_fire > clock.now


async def test_startup_after_downtime_without_catch_up_records_missed(tmp_path: Path) -> None:
    job = make_job(id="nc", schedule="every 60s", catch_up=False, command=py("print(1)"))
    clock = Clock()
    async with rig(tmp_path, job, clock=clock):
        pass
    clock.advance(3600)
    async with rig(tmp_path, job, clock=clock) as r:
        r.engine.catch_up()
        await r.settle()
        assert r.runs("nc") == []
        occurrence = r.db.get_occurrence("nc", T0 + 60 * S)
        assert occurrence is not None and occurrence.state == "missed"


async def test_slightly_late_fire_within_grace_runs_as_scheduled(tmp_path: Path) -> None:
    job = make_job(id="late", schedule="every 1h", command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 3600 * S + 600 * S  # ten minutes late, grace is 30 min
        assert r.engine.catch_up() == []
        assert r.fire("late", T0 + 3600 * S).status == "accepted"
    assert [run.trigger for run in r.runs("late")] == ["schedule"]


async def test_repeat_stops_arming_after_n_starts(tmp_path: Path) -> None:
    job = make_job(id="rep", schedule="every 10s", repeat=2, command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        for k in (1, 2):
            r.clock.now = T0 + 10 * k * S
            assert r.fire("rep", T0 + 10 * k * S).status == "accepted"
        js = r.db.get_job("rep")
        assert js is not None and js.completed and js.next_fire is None
        assert r.engine.desired_arm("rep") is None
        r.clock.now = T0 + 30 * S
        assert r.fire("rep", T0 + 30 * S).status == "stale"


async def test_failed_run_is_retried_with_backoff(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(planner, "RETRY_BASE", 0.05)
    marker = tmp_path / "attempts"
    code = (
        f"import os\np={str(marker)!r}\nopen(p,'a').write(os.environ['CHRONOS_ATTEMPT'])\n"
        "raise SystemExit(0 if len(open(p).read()) >= 3 else 3)"
    )
    job = make_job(id="flaky", schedule="every 60s", retries=5, command=py(code))
    async with rig(tmp_path, job) as r:
        r.clock.now = T0 + 60 * S
        assert r.fire("flaky", T0 + 60 * S).status == "accepted"
    runs = sorted(r.runs("flaky"), key=lambda run: run.attempt)
    assert [(run.attempt, run.trigger, run.status) for run in runs] == [
        (1, "schedule", "failed"),
        (2, "retry", "failed"),
        (3, "retry", "ok"),
    ]
    assert marker.read_text() == "123"


async def test_jitter_delays_the_arm_and_the_fire_maps_back(tmp_path: Path) -> None:
    job = make_job(id="j", schedule="every 600s", jitter="120s", command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        occurrence = T0 + 600 * S
        armed = r.engine.desired_arm("j")
        assert armed == planner.arm_instant(job, occurrence)
        assert occurrence <= armed <= occurrence + 120 * S
        r.clock.now = armed
        result = r.fire("j", armed)
        assert result.status == "accepted"
    (run,) = r.runs("j")
    assert run.scheduled_at == occurrence


async def test_waypoint_beyond_the_horizon_rearms_without_running(tmp_path: Path) -> None:
    job = make_job(id="far", schedule="every 30d", command=py("print(1)"))
    async with rig(tmp_path, job, max_horizon=7 * 86400) as r:
        waypoint = r.engine.desired_arm("far")
        assert waypoint == T0 + timedelta(days=7)
        r.db.update_job("far", armed_fire=waypoint, armed_confirmed_at=T0)
        r.clock.now = waypoint
        result = r.fire("far", waypoint)
        assert result.payload() == {
            "status": "rearmed",
            "job_id": "far",
            "next": "2026-03-16T12:00:00+00:00",
        }
        assert r.engine.desired_arm("far") == T0 + timedelta(days=14)
    assert r.runs("far") == []


async def test_manual_fire_goes_through_the_claim_path(tmp_path: Path) -> None:
    job = make_job(id="m", schedule="every 1h", command=py("print('manual')"))
    async with rig(tmp_path, job) as r:
        first = r.engine.fire_manual("m")
        second = r.engine.fire_manual("m")
        for result in (first, second):
            assert result.start is not None
            result.start()
    runs = r.runs("m")
    assert sorted(run.trigger for run in runs) == ["manual", "manual"]
    assert len({run.scheduled_at for run in runs}) == 2
    js = r.db.get_job("m")
    assert js is not None and js.next_fire == T0 + 3600 * S  # the plan is untouched


async def _until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not predicate():
            await anyio.sleep(0.02)


async def test_late_delivery_leaves_occurrences_within_grace_due(tmp_path: Path) -> None:
    job = make_job(id="late15", schedule="every 15s", command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        # Delivered a minute late: within the 2 min grace, so the later ones still run.
        r.clock.now = T0 + 75 * S
        assert r.fire("late15", T0 + 15 * S).status == "accepted"
        js = r.db.get_job("late15")
        assert js is not None and js.next_fire == T0 + 30 * S
        assert r.fire("late15", T0 + 30 * S).status == "accepted"


async def test_delivery_beyond_grace_runs_once_as_catch_up(tmp_path: Path) -> None:
    job = make_job(id="burst", schedule="every 15s", misfire_grace="20s", command=py("print(1)"))
    async with rig(tmp_path, job) as r:
        # 12:00:15 delivered at 12:01:15: beyond its 20 s grace. It runs once as a
        # catch-up, and the occurrences that passed meanwhile coalesce into it.
        r.clock.now = T0 + 75 * S
        assert r.fire("burst", T0 + 15 * S).status == "accepted"
        js = r.db.get_job("burst")
        assert js is not None and js.next_fire == T0 + 90 * S
        for passed in (30, 45, 60, 75):
            assert r.fire("burst", T0 + passed * S).status == "stale"
    assert [(run.scheduled_at, run.trigger) for run in r.runs("burst")] == [
        (T0 + 15 * S, "catch-up")
    ]
