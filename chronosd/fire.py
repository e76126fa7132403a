"""The fire flow and the job set: apply edits, decide fires, claim, run, retry.

The Engine owns the in-memory job set (the last good jobs.json) and talks to
the state database; it never touches the network. Arming is the reconciler's
business: the Engine records the next planned fire and asks for a reconcile.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc

from chronosd import planner
from chronosd.config import Config
from chronosd.daemon.idle import IdleTracker
from chronosd.errors import StateError
from chronosd.faults import crash_point
from chronosd.jobs.diff import JobsDiff, diff_jobs
from chronosd.jobs.model import Job
from chronosd.jobs.validate import schedule_key
from chronosd.log import get_logger
from chronosd.runner import RunControl, RunOutcome, RunSpec, job_environment, resolve_argv, run_job
from chronosd.state import JobState, StateDB
from chronosd.timefmt import to_wire, utc_now

log = get_logger("chronosd.fire")

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class FireResult:
    """The answer to one delivered fire, in the terms of CONTRACT.md."""

    status: (
        str  # accepted, duplicate, gone, stale, rearmed, too-early, skipped, missed, unavailable
    )
    http_status: int
    job_id: str
    run_id: str | None = None
    expected: datetime | None = None  # too-early: the occurrence; rearmed: the next arm
    error: str | None = None
    start: Callable[[], None] | None = field(default=None, compare=False)

    def payload(self) -> dict[str, Any]:
        if self.status == "too-early":
            return {"error": "too early", "expected": to_wire(self.expected or utc_now())}
        if self.status == "unavailable":
            return {"error": self.error or "state database unavailable"}
        body: dict[str, Any] = {"status": self.status, "job_id": self.job_id}
        if self.run_id:
            body["run_id"] = self.run_id
        if self.status == "rearmed" and self.expected is not None:
            body["next"] = to_wire(self.expected)
        return body


def _whole(instant: datetime) -> datetime:
    return instant.replace(microsecond=0)


class Engine:
    def __init__(
        self,
        *,
        config: Config,
        db: StateDB,
        owner: str,
        clock: Clock = utc_now,
        idle: IdleTracker | None = None,
        request_reconcile: Callable[[Sequence[str]], None] = lambda ids: None,
        max_horizon: float | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.owner = owner
        self.clock = clock
        self.idle = idle
        self.request_reconcile = request_reconcile
        self.max_horizon = max_horizon
        self.jobs: dict[str, Job] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._limiter = anyio.CapacityLimiter(config.runner.max_concurrent)
        self._running: dict[str, list[RunControl]] = {}
        self._queued: dict[str, tuple[datetime, str]] = {}
        self._active_tasks = 0
        self._all_done = anyio.Event()
        self._all_done.set()
        self.pending_retries: list[tuple[Job, datetime, int]] = []

    # ------------------------------------------------------------------ set-up
    def bind(self, tg: anyio.abc.TaskGroup) -> None:
        """Runs are started in this task group (the supervisor's)."""
        self._tg = tg

    # ------------------------------------------------------------------ edit flow
    def apply_jobs(self, jobs: Sequence[Job], *, now: datetime | None = None) -> JobsDiff:
        """Make ``jobs`` the current set and bring job_state in line; return what changed.

        Added jobs are anchored at ``now``; a schedule change re-anchors at ``now``
        (missed occurrences of the old schedule are not caught up); a paused or
        disabled job has no planned fire, and on resume plans from ``now``.
        """
        now = _whole(now or self.clock())
        states = self.db.all_jobs()
        diff = diff_jobs({job_id: js.spec_hash for job_id, js in states.items()}, jobs)
        for job in jobs:
            js = states.get(job.id)
            key = schedule_key(job)
            if js is not None and not js.schedule_key:
                # Migrated from a schema that did not record the schedule: adopt, don't re-anchor.
                js = replace(js, schedule_key=key)
                self.db.update_job(job.id, schedule_key=key)
            if js is None or js.schedule_key != key:
                js = JobState(
                    job_id=job.id,
                    spec_hash=job.spec_hash,
                    schedule_key=key,
                    anchor=now,
                    next_fire=None,
                    armed_fire=js.armed_fire if js else None,
                    armed_confirmed_at=js.armed_confirmed_at if js else None,
                    runs_started=0,
                    last_run_id=js.last_run_id if js else None,
                    last_status=js.last_status if js else None,
                    completed=False,
                )
                js = self._replan(job, js, now)
                self.db.put_job(js)
            elif js.spec_hash != job.spec_hash or (js.next_fire is None) != (
                not job.active or js.completed
            ):
                js = self._replan(job, js, now, keep_next=True)
                self.db.put_job(js)
        self.jobs = {job.id: job for job in jobs}
        self.request_reconcile(sorted(set(states) | set(self.jobs)))
        return diff

    def _replan(
        self, job: Job, js: JobState, now: datetime, *, keep_next: bool = False
    ) -> JobState:
        completed = planner.repeat_exhausted(job, js.runs_started)
        next_fire: datetime | None
        if not job.active or completed:
            next_fire = None
        elif keep_next and js.next_fire is not None:
            next_fire = js.next_fire
        else:
            next_fire = planner.next_occurrence(
                job, now, anchor=js.anchor, runs_started=js.runs_started
            )
            completed = next_fire is None and job.schedule.one_shot and js.runs_started > 0
        return JobState(
            job_id=js.job_id,
            spec_hash=job.spec_hash,
            schedule_key=js.schedule_key,
            anchor=js.anchor,
            next_fire=next_fire,
            armed_fire=js.armed_fire,
            armed_confirmed_at=js.armed_confirmed_at,
            runs_started=js.runs_started,
            last_run_id=js.last_run_id,
            last_status=js.last_status,
            completed=completed,
        )

    def desired_arm(
        self,
        job_id: str,
        *,
        now: datetime | None = None,
        use_horizon: bool = True,
        state: JobState | None = None,
    ) -> datetime | None:
        """The instant the provider should hold for ``job_id`` (None: nothing armed).

        With ``use_horizon`` an instant beyond the provider's horizon becomes a waypoint.
        """
        job = self.jobs.get(job_id)
        if job is None or not job.active:
            return None
        js = state if state is not None else self.db.get_job(job_id)
        if js is None or js.next_fire is None:
            return None
        fire_at = planner.arm_instant(job, js.next_fire)
        if not use_horizon:
            return fire_at
        return planner.waypoint(fire_at, _whole(now or self.clock()), self.max_horizon)

    # ------------------------------------------------------------------ start-up catch-up
    def catch_up(self, *, now: datetime | None = None) -> list[str]:
        """Decide every overdue occurrence (DESIGN.md 4, start-up after downtime).

        Occurrences still within their grace are left to the normal trigger (the
        provider fires an arm in the past at once); later ones run once now as a
        catch-up or are recorded as missed. Returns the job ids whose plan changed.
        """
        now = _whole(now or self.clock())
        touched: list[str] = []
        states = self.db.all_jobs()
        for job in self.jobs.values():
            if not job.active:
                continue
            js = states.get(job.id)
            if js is None or js.next_fire is None:
                continue
            if planner.misfire_action(job, js.next_fire, now, anchor=js.anchor) == "run":
                continue
            result = self._decide_overdue(job, js, now, trigger="catch-up")
            if result.start is not None:
                result.start()
            touched.append(job.id)
        if touched:
            self.request_reconcile(touched)
        return touched

    def _decide_overdue(self, job: Job, js: JobState, now: datetime, *, trigger: str) -> FireResult:
        assert js.next_fire is not None
        plan = planner.plan_overdue(
            job, js.next_fire, now, anchor=js.anchor, runs_started=js.runs_started
        )
        if plan.action == "missed":
            self.db.claim(
                job.id, plan.occurrence, owner=self.owner, trigger=trigger, now=now, state="missed"
            )
            self.db.update_job(job.id, next_fire=plan.next_fire, completed=plan.next_fire is None)
            log.warning(
                "fire.missed",
                job_id=job.id,
                occurrence=to_wire(plan.occurrence),
                coalesced=plan.coalesced,
            )
            return FireResult("missed", 200, job.id)
        return self._claim_and_start(
            job,
            js,
            plan.occurrence,
            plan.next_fire,
            now,
            trigger="catch-up",
            coalesced=plan.coalesced,
        )

    # ------------------------------------------------------------------ fire flow
    def handle_fire(
        self, job_id: str, fire_at: datetime, *, trigger: str = "schedule"
    ) -> FireResult:
        """Validate a delivered fire, claim its occurrence and plan the next one.

        The run is not started here: the caller calls ``result.start()`` once the
        answer is out (after the 202), so a long job never delays the reply.
        """
        try:
            return self._handle_fire(job_id, _whole(fire_at), trigger)
        except StateError as exc:
            log.error("fire.state_failed", job_id=job_id, error=str(exc))
            return FireResult("unavailable", 503, job_id, error=str(exc))

    def _handle_fire(self, job_id: str, fire_at: datetime, trigger: str) -> FireResult:
        now = _whole(self.clock())
        job = self.jobs.get(job_id)
        js = self.db.get_job(job_id) if job is not None else None
        if job is None or js is None:
            log.info("fire.gone", job_id=job_id, fire_at=to_wire(fire_at))
            return FireResult("gone", 200, job_id)
        if not job.active:
            log.info("fire.stale", job_id=job_id, fire_at=to_wire(fire_at), reason="paused")
            self.request_reconcile([job_id])
            return FireResult("stale", 200, job_id)
        planned = planner.arm_instant(job, js.next_fire) if js.next_fire else None
        if planned is not None and fire_at < planned and js.armed_fire == fire_at:
            # A waypoint: the real occurrence lies beyond the provider's horizon.
            if planner.too_early(fire_at, now):
                return FireResult("too-early", 409, job_id, expected=fire_at)
            self.db.update_job(job_id, armed_fire=None, armed_confirmed_at=None)
            self.request_reconcile([job_id])
            nxt = planner.waypoint(planned, now, self.max_horizon)
            log.info("fire.rearmed", job_id=job_id, fire_at=to_wire(fire_at), next=to_wire(nxt))
            return FireResult("rearmed", 200, job_id, expected=nxt)
        occurrence = planner.occurrence_for_fire(
            job, fire_at, anchor=js.anchor, planned=js.next_fire
        )
        if occurrence is None:
            log.info(
                "fire.stale", job_id=job_id, fire_at=to_wire(fire_at), reason="not-in-schedule"
            )
            self.request_reconcile([job_id])
            return FireResult("stale", 200, job_id)
        if planner.too_early(planner.arm_instant(job, occurrence), now):
            log.info("fire.too_early", job_id=job_id, fire_at=to_wire(fire_at))
            return FireResult("too-early", 409, job_id, expected=occurrence)
        if self.db.get_occurrence(job_id, occurrence) is not None:
            self._plan_past_claimed(job, js, occurrence, now)
            log.info("fire.duplicate", job_id=job_id, occurrence=to_wire(occurrence))
            return FireResult("duplicate", 200, job_id)
        if js.next_fire is None or occurrence < js.next_fire:
            log.info(
                "fire.stale", job_id=job_id, occurrence=to_wire(occurrence), reason="superseded"
            )
            self.request_reconcile([job_id])
            return FireResult("stale", 200, job_id)
        if occurrence > js.next_fire:
            # Delivered for a later occurrence than planned (state restored from
            # an older copy, say): plan as if this one had been next.
            js = replace(js, next_fire=occurrence)
        if planner.misfire_action(job, occurrence, now, anchor=js.anchor) != "run":
            return self._decide_overdue(job, js, now, trigger=trigger)
        next_fire, coalesced = planner.next_after_claim(
            job, occurrence, now, anchor=js.anchor, runs_started=js.runs_started + 1
        )
        return self._claim_and_start(
            job, js, occurrence, next_fire, now, trigger=trigger, coalesced=coalesced
        )

    def _plan_past_claimed(
        self, job: Job, js: JobState, occurrence: datetime, now: datetime
    ) -> None:
        """The planned occurrence was claimed elsewhere (a manual fire in the same second, a
        resume or re-anchor while the clock was behind): plan past it, or the job is stuck."""
        if js.next_fire is None or occurrence < js.next_fire:
            return  # an ordinary repeated delivery: the plan is already past it
        nxt, _ = planner.next_after_claim(
            job, occurrence, now, anchor=js.anchor, runs_started=js.runs_started
        )
        self.db.update_job(job.id, next_fire=nxt, completed=nxt is None)
        self.request_reconcile([job.id])

    def _claim_and_start(
        self,
        job: Job,
        js: JobState,
        occurrence: datetime,
        next_fire: datetime | None,
        now: datetime,
        *,
        trigger: str,
        coalesced: int = 0,
    ) -> FireResult:
        action = planner.overlap_action(
            job, running=len(self._running.get(job.id, ())), queued=int(job.id in self._queued)
        )
        crash_point("before-claim")
        run = None
        if action in ("start", "replace"):
            # Claim, plan and record the run in one transaction: nothing half-way.
            run = self.db.claim_advance_and_start(
                job.id,
                occurrence,
                owner=self.owner,
                trigger=trigger,
                now=now,
                next_fire=next_fire,
                completed=next_fire is None,
            )
            won = run is not None
        else:
            won = self.db.claim_and_advance(
                job.id,
                occurrence,
                owner=self.owner,
                trigger=trigger,
                now=now,
                next_fire=next_fire,
                completed=next_fire is None,
            )
        if not won:
            self._plan_past_claimed(job, js, occurrence, now)
            log.info("fire.duplicate", job_id=job.id, occurrence=to_wire(occurrence))
            return FireResult("duplicate", 200, job.id)
        crash_point("after-claim")
        # Re-arm before the job runs: the next fire is recorded; the reconciler arms it.
        self.request_reconcile([job.id])
        log.info(
            "fire.claimed",
            job_id=job.id,
            occurrence=to_wire(occurrence),
            trigger=trigger,
            next_fire=to_wire(next_fire) if next_fire else None,
            coalesced=coalesced,
        )
        if action == "skip":
            self.db.set_occurrence_state(job.id, occurrence, "skipped", now=now)
            log.info(
                "fire.skipped", job_id=job.id, occurrence=to_wire(occurrence), reason="overlap"
            )
            return FireResult("skipped", 200, job.id)
        if action == "queue":
            self._queued[job.id] = (occurrence, trigger)
            log.info("fire.queued", job_id=job.id, occurrence=to_wire(occurrence))
            return FireResult("accepted", 202, job.id)
        assert run is not None
        run_id = run.run_id

        def start() -> None:
            crash_point("after-reply")
            if action == "replace":
                for control in self._running.get(job.id, ()):
                    control.stop()
            self._spawn(job, occurrence, trigger, 1, run_id)

        return FireResult("accepted", 202, job.id, run_id=run_id, start=start)

    def fire_manual(self, job_id: str) -> FireResult:
        """``chronosd fire JOB``: claim an occurrence at now (trigger manual) and start it."""
        job = self.jobs.get(job_id)
        if job is None:
            return FireResult("gone", 200, job_id)
        now = _whole(self.clock())
        occurrence = now
        while not self.db.claim(job.id, occurrence, owner=self.owner, trigger="manual", now=now):
            occurrence += timedelta(seconds=1)  # two manual fires within one second
        run = self.db.start_run(job.id, occurrence, attempt=1, trigger="manual", now=now)
        log.info("fire.claimed", job_id=job.id, occurrence=to_wire(occurrence), trigger="manual")
        return FireResult(
            "accepted",
            202,
            job.id,
            run_id=run.run_id,
            start=lambda: self._spawn(job, occurrence, "manual", 1, run.run_id),
        )

    # ------------------------------------------------------------------ runs
    @property
    def active_runs(self) -> int:
        return self._active_tasks

    def running_jobs(self) -> dict[str, int]:
        return {job_id: len(controls) for job_id, controls in self._running.items() if controls}

    def _spawn(
        self, job: Job, occurrence: datetime, trigger: str, attempt: int, run_id: str | None
    ) -> None:
        if self._tg is None:
            raise RuntimeError("Engine.bind() was not called")
        self._active_tasks += 1
        self._all_done = anyio.Event() if self._all_done.is_set() else self._all_done
        if self.idle is not None:
            self.idle.acquire("run")
        self._tg.start_soon(
            self._run_task, job, occurrence, trigger, attempt, run_id, name=f"run:{job.id}"
        )

    async def _run_task(
        self, job: Job, occurrence: datetime, trigger: str, attempt: int, run_id: str | None
    ) -> None:
        try:
            while True:
                try:
                    outcome, run_id = await self._run_once(
                        job, occurrence, trigger, attempt, run_id
                    )
                except StateError as exc:
                    # Not recorded: the run stays "running" and the next start's recovery
                    # marks it interrupted. The daemon itself must carry on.
                    log.error(
                        "run.state_failed",
                        job_id=job.id,
                        occurrence=to_wire(occurrence),
                        error=str(exc),
                    )
                    break
                if not planner.should_retry(job, attempt, outcome.status):
                    break
                delay = planner.retry_delay(attempt)
                log.info(
                    "run.retry_scheduled",
                    job_id=job.id,
                    occurrence=to_wire(occurrence),
                    attempt=attempt + 1,
                    delay=delay,
                )
                await anyio.sleep(delay)
                attempt += 1
                trigger = "retry"
                run_id = None
        finally:
            self._active_tasks -= 1
            if self.idle is not None:
                self.idle.release("run")
            if self._active_tasks == 0:
                self._all_done.set()
            queued = self._queued.pop(job.id, None)
            if queued is not None and self._tg is not None:
                with suppress(StateError):
                    run = self.db.start_run(
                        job.id, queued[0], attempt=1, trigger=queued[1], now=_whole(self.clock())
                    )
                    self._spawn(job, queued[0], queued[1], 1, run.run_id)

    async def _run_once(
        self, job: Job, occurrence: datetime, trigger: str, attempt: int, run_id: str | None
    ) -> tuple[RunOutcome, str]:
        async with self._limiter:
            now = _whole(self.clock())
            if run_id is None:
                run_id = self.db.start_run(
                    job.id, occurrence, attempt=attempt, trigger=trigger, now=now
                ).run_id
            record = self.db.get_run(run_id)
            assert record is not None
            self.db.set_occurrence_state(job.id, occurrence, "running", now=now)
            runner_cfg = self.config.runner
            spec = RunSpec(
                argv=resolve_argv(
                    job.command, job_id=job.id, default_command=runner_cfg.default_command
                ),
                env=job_environment(
                    job_id=job.id,
                    run_id=run_id,
                    scheduled_at=occurrence,
                    trigger=trigger,
                    attempt=attempt,
                    job_env=job.env,
                    pass_env=runner_cfg.pass_env,
                ),
                stdin=json.dumps(dict(job.record)).encode(),
                cwd=job.cwd,
                timeout=job.timeout,
                output_path=record.output_path,
                output_max_bytes=runner_cfg.output_max_bytes,
            )
            control = RunControl()
            self._running.setdefault(job.id, []).append(control)
            log.info(
                "run.started",
                job_id=job.id,
                run_id=run_id,
                occurrence=to_wire(occurrence),
                trigger=trigger,
                attempt=attempt,
            )
            try:
                outcome = await run_job(
                    spec, control, on_started=lambda pid: self.db.set_run_pid(run_id, pid)
                )
            finally:
                self._running[job.id].remove(control)
            crash_point("after-run")
            with anyio.CancelScope(shield=True):
                self.db.finish_run(
                    run_id,
                    status=outcome.status,
                    exit_code=outcome.exit_code,
                    now=_whole(self.clock()),
                    output_bytes=outcome.output_bytes,
                )
                self.db.prune_runs(job.id, keep=runner_cfg.keep_runs)
            log.info(
                "run.finished",
                job_id=job.id,
                run_id=run_id,
                status=outcome.status,
                exit_code=outcome.exit_code,
                error=outcome.error,
            )
            return outcome, run_id

    def stop_runs(self) -> None:
        for controls in self._running.values():
            for control in controls:
                control.stop()
        self._queued.clear()

    async def wait_runs(self) -> None:
        await self._all_done.wait()

    def recover(self, *, now: datetime | None = None) -> None:
        """Mark runs whose owner died as interrupted; retry those whose job has retries."""
        from chronosd.state import owner_alive

        now = _whole(now or self.clock())
        for run in self.db.recover_interrupted(now=now, is_alive=owner_alive):
            log.warning(
                "run.interrupted",
                job_id=run.job_id,
                run_id=run.run_id,
                occurrence=to_wire(run.scheduled_at),
            )
            job = self.jobs.get(run.job_id)
            if job is not None and planner.should_retry(job, run.attempt, "interrupted"):
                self.pending_retries.append((job, run.scheduled_at, run.attempt + 1))

    def start_pending_retries(self) -> None:
        pending, self.pending_retries = self.pending_retries, []
        for job, occurrence, attempt in pending:
            self._spawn(job, occurrence, "retry", attempt, None)
