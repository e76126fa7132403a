"""The fire flow and the job set: apply edits, decide fires, claim, run, retry.

The Engine owns the in-memory job set (the last good jobs.json) and talks to
the state database; it never touches the network. Arming is the reconciler's
business: the Engine records the next planned fire and asks for a reconcile.

Two ways in for a fire. ``handle_fire`` commits the claim with an fsync of its own
before it returns (start-up catch-up, tests). ``fire`` is the daemon's: it commits the
claim without an fsync and waits for a group-commit round (state.SyncGroup) shared with
every claim committed meanwhile, so a burst of fires costs a few fsyncs, not one each,
and the event loop never blocks on the disk. Either way the answer (and the job's
start) comes only once the claim is durable; when the fsync fails the claim is taken
back and the answer is 503, so the caller's retry finds it unclaimed.

Some fires come early by design: the local timers wake a little ahead
(providers/local.py LEAD, ``at_instant=True``), and with ``provider.nas.prewake`` the
NAS is armed that many seconds ahead. Those are claimed at once and their run starts
at the occurrence's instant itself, never before. A delivery of the instant itself
that arrives early (the NAS's clock runs ahead; up to 60 s is accepted) starts at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

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
from chronosd.state import ArmState, JobState, JobSummary, RunRecord, StateDB, SyncGroup
from chronosd.timefmt import to_wire, utc_now

if TYPE_CHECKING:
    # The runner is imported when the first run starts, after the reply to the fire.
    from chronosd.runner import RunControl, RunOutcome

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


# A wait for an instant re-checks the wall clock this often at most, and only when it woke
# less than _WAKE_SLACK before it (the event loop's timers run on the monotonic clock).
_WAKE_CHECKS = 3
_WAKE_SLACK = 0.05
# Delivered fires already known to be claimed and durable, kept to answer repeats cheaply.
_KNOWN_MAX = 4096
# Up to this many new or changed jobs an edit reads their stored state one by one (see
# apply_jobs); more, and the whole table is read at once.
SMALL_APPLY = 256
# A delivery that finds its occurrence's claim taken back (fsync failed) tries again.
_FIRE_ATTEMPTS = 3
# While deliveries are being answered, a run waits (at most _RUN_DEFER) before it starts its
# process; the re-arm of a delivered fire whose next fire is at least _REARM_LEAD away waits
# until no delivery has come for _REARM_QUIET (at most _REARM_DEFER). In a burst (a thousand
# jobs due in the same second) the NAS waits for every answer, while each process start
# stalls the event loop for 0.3-3 ms (on Python 3.11, fork_exec holds the GIL until the child
# has exec'd, which on a busy machine means until it got a CPU) and each re-arm costs a round
# trip's worth of loop time here and a provision at the NAS, whose deliveries it slows: done
# after the answers, they cost the same but delay none of them. A run or re-arm after a lone
# fire finds nothing in flight and goes at once.
_RUN_DEFER = 2.0
_REARM_LEAD = 60.0
_REARM_QUIET = 0.2
_REARM_DEFER = 5.0


@dataclass(eq=False)
class _Claim:
    """An occurrence this process claimed, and what to take back if the claim cannot stand."""

    job_id: str
    occurrence: datetime
    fire_at: datetime | None  # as delivered; None for a catch-up at start-up
    trigger: str
    action: str  # start, replace, skip, queue or defer (see _claim_and_start)
    run_id: str | None
    next_fire: datetime | None  # what the claim planned
    next_fire_before: datetime | None  # what was planned before it
    completed_before: bool
    coalesced: int
    settled: anyio.Event = field(default_factory=anyio.Event)
    durable: bool = False
    failed: bool = False  # its fsync failed and taking it back failed too


@dataclass
class _Pending:
    """What a non-durable fire left for ``Engine.fire`` to settle before it answers."""

    claim: _Claim | None = None  # claimed now: wait for the fsync
    wait_for: _Claim | None = None  # another delivery's claim of the same occurrence
    confirm: tuple[datetime, datetime] | None = None  # (fire_at, occurrence) claimed elsewhere


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
        prewake: float | None = None,
    ) -> None:
        """``prewake``: seconds the NAS is armed before each instant; None takes
        ``provider.nas.prewake`` when the provider is the NAS, else 0."""
        if prewake is None:
            prewake = config.provider.nas.prewake if config.provider.kind == "nas" else 0.0
        self.prewake = float(prewake)
        self.config = config
        self.db = db
        self.owner = owner
        self.clock = clock
        self.idle = idle
        self.request_reconcile = request_reconcile
        self.max_horizon = max_horizon
        self.jobs: Mapping[str, Job] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._limiter = anyio.CapacityLimiter(config.runner.max_concurrent)
        self._running: dict[str, list[RunControl]] = {}
        self._queued: dict[str, tuple[datetime, str]] = {}
        self._active_tasks = 0
        self._all_done = anyio.Event()
        self._all_done.set()
        self.pending_retries: list[tuple[Job, datetime, int]] = []
        # Claims' pages reach the database in checkpoints run in a worker thread after
        # group-commit rounds, not in whichever claim's commit crosses SQLite's threshold.
        db.defer_checkpoints()
        self._sync = SyncGroup(self._sync_wal, checkpoint=self._checkpoint)
        self._unsettled: dict[tuple[str, datetime], _Claim] = {}
        # (job id, delivered fire_at) -> its occurrence (wire text), claimed and durable.
        self._known: dict[tuple[str, datetime], str] = {}
        self._waiting: dict[str, list[datetime]] = {}  # instants of runs waiting to start
        self._deferred: dict[str, int] = {}  # claims whose overlap is decided at the instant
        self._halt = anyio.Event()  # stop_runs(): what waits for its instant never starts
        self._in_flight = 0  # deliveries being handled by ``fire``
        self._quiet: anyio.Event | None = None  # set when _in_flight drops to 0
        self._last_delivery = 0.0  # anyio clock: when ``fire`` was last called
        self._rearms: set[str] = set()  # re-arms held back until the deliveries are answered

    # ------------------------------------------------------------------ set-up
    def bind(self, tg: anyio.abc.TaskGroup) -> None:
        """Runs are started in this task group (the supervisor's)."""
        self._tg = tg

    # ------------------------------------------------------------------ edit flow
    def apply_jobs(
        self, jobs: Sequence[Job], *, now: datetime | None = None, reconcile_all: bool = False
    ) -> JobsDiff:
        """Make ``jobs`` the current set and bring job_state in line; return what changed.

        Added jobs are anchored at ``now``; a schedule change re-anchors at ``now``
        (missed occurrences of the old schedule are not caught up); a paused or
        disabled job has no planned fire, and on resume plans from ``now``.

        The reconciler is asked about the jobs this changed; ``reconcile_all`` (start-up)
        asks about every job, so arms left unconfirmed by a previous process are found.
        """
        now = _whole(now or self.clock())
        previous = self.jobs
        fresh: Sequence[Job] = jobs
        if not reconcile_all and isinstance(previous, dict) and previous:
            # A job object this Engine applied before (the validation memo hands back the same
            # object for an unchanged record) has its state in line already: the engine's own
            # writes keep it so. Only the others need their state read, for an edit of a few
            # jobs in a big file.
            fresh = [job for job in jobs if previous.get(job.id) is not job]
            if len(fresh) <= SMALL_APPLY:
                current = {job.id for job in jobs}
                gone = [job_id for job_id in previous if job_id not in current]
                if len(gone) <= SMALL_APPLY:
                    known = self.db.job_summaries([*(job.id for job in fresh), *gone])
                    return self._apply(jobs, fresh, known, now, reconcile_all=False)
            fresh = jobs
        return self._apply(jobs, fresh, self.db.job_summaries(), now, reconcile_all=reconcile_all)

    def apply_changes(
        self,
        changed: Sequence[Job],
        removed: Sequence[str],
        table: Mapping[str, Job],
        *,
        now: datetime | None = None,
    ) -> JobsDiff:
        """apply_jobs for an edit known to differ from the applied set only in ``changed``
        (new or edited jobs) and ``removed`` (ids that left it); ``table`` becomes the job
        table. For a start-up that compared jobs.json with the file it last applied."""
        now = _whole(now or self.clock())
        known = self.db.job_summaries([*(job.id for job in changed), *removed])
        return self._apply(changed, changed, known, now, reconcile_all=False, table=table)

    def _apply(
        self,
        jobs: Sequence[Job],
        fresh: Sequence[Job],
        known: Mapping[str, JobSummary],
        now: datetime,
        *,
        reconcile_all: bool,
        table: Mapping[str, Job] | None = None,
    ) -> JobsDiff:
        """apply_jobs for the jobs of ``fresh`` (the others are unchanged); ``known`` holds the
        stored summaries of those jobs and of any job that left the set. The job table becomes
        ``table``, or ``jobs`` by id."""
        diff = diff_jobs({job_id: summary.spec_hash for job_id, summary in known.items()}, fresh)
        touched = set(diff.job_ids())
        planned: list[JobState] = []  # written together below: one transaction, not one each
        for job in fresh:
            summary = known.get(job.id)
            key = schedule_key(job)
            if summary is not None and (
                summary.schedule_key == key
                and summary.spec_hash == job.spec_hash
                and summary.planned == (job.active and not summary.completed)
            ):
                continue  # unchanged: the common case, decided without reading the whole row
            js = self.db.get_job(job.id) if summary is not None else None
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
                planned.append(self._replan(job, js, now))
                touched.add(job.id)
            elif js.spec_hash != job.spec_hash or (js.next_fire is None) != (
                not job.active or js.completed
            ):
                planned.append(self._replan(job, js, now, keep_next=True))
                touched.add(job.id)
        self.db.put_jobs(planned)
        self.jobs = {job.id: job for job in jobs} if table is None else table
        # A re-anchor can make a remembered delivery stale: map deliveries afresh.
        self._known.clear()
        if reconcile_all:
            touched |= set(known) | set(self.jobs)
        if touched:
            self.request_reconcile(sorted(touched))
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
        state: JobState | ArmState | None = None,
    ) -> datetime | None:
        """The instant the provider should hold for ``job_id`` (None: nothing armed).

        With ``use_horizon`` (the provider's arm) the instant is brought forward by the
        pre-wake, and one beyond the provider's horizon becomes a waypoint, always earlier
        than the pre-wake instant. Without it, the instant itself (local fallback timers).
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
        if self.prewake:
            fire_at -= timedelta(seconds=self.prewake)
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
        # Only a planned fire at or before now can be overdue (jitter only delays).
        states = self.db.jobs_due(now)
        for job_id, js in states.items():
            job = self.jobs.get(job_id)
            if job is None or not job.active or js.next_fire is None:
                continue
            if planner.misfire_action(job, js.next_fire, now, anchor=js.anchor) == "run":
                continue
            result = self._decide_overdue(job, js, now, trigger="catch-up", pending=None)
            if result.start is not None:
                result.start()
            touched.append(job.id)
        if touched:
            self.request_reconcile(touched)
        return touched

    def _decide_overdue(
        self,
        job: Job,
        js: JobState,
        now: datetime,
        *,
        trigger: str,
        pending: _Pending | None,
        fire_at: datetime | None = None,
        next_fire_before: datetime | None = None,
    ) -> FireResult:
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
            pending=pending,
            fire_at=fire_at,
            next_fire_before=next_fire_before or js.next_fire,
        )

    # ------------------------------------------------------------------ fire flow
    def handle_fire(
        self, job_id: str, fire_at: datetime, *, trigger: str = "schedule", at_instant: bool = False
    ) -> FireResult:
        """Validate a delivered fire, claim its occurrence durably and plan the next one.

        The claim is fsynced before this returns (one fsync per claim, on the caller's
        thread); the daemon's fire path is ``fire``. The run is not started here: the caller
        calls ``result.start()`` once the answer is out (after the 202), so a long job never
        delays the reply. ``at_instant``: the caller woke early on purpose; the run starts at
        the occurrence's instant (so does the run of a pre-wake fire).
        """
        try:
            return self._handle_fire(job_id, _whole(fire_at), trigger, None, at_instant)
        except StateError as exc:
            return self._unavailable(job_id, exc)

    async def fire(
        self, job_id: str, fire_at: datetime, *, trigger: str = "schedule", at_instant: bool = False
    ) -> FireResult:
        """``handle_fire`` with the claim made durable by a group-commit round.

        Returns once the claim is durable (then ``result.start()`` starts the run at the
        occurrence's instant), or once it has been taken back because the fsync failed
        (503, nothing claimed). A repeated delivery of an occurrence whose claim is still
        being made durable waits for that claim and answers as it turned out.
        """
        self._in_flight += 1
        self._last_delivery = anyio.current_time()
        try:
            return await self._fire(job_id, _whole(fire_at), trigger, at_instant)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._quiet is not None:
                self._quiet.set()
                self._quiet = None

    async def _answered(self, at_most: float) -> None:
        """Return once no delivery is being handled, or after ``at_most`` seconds."""
        if not self._in_flight or self._halt.is_set():
            return
        if self._quiet is None:
            self._quiet = anyio.Event()
        quiet = self._quiet
        with anyio.move_on_after(at_most):
            await quiet.wait()

    async def _fire(
        self, job_id: str, fire_at: datetime, trigger: str, at_instant: bool
    ) -> FireResult:
        for _ in range(_FIRE_ATTEMPTS):
            pending = _Pending()
            try:
                result = self._handle_fire(job_id, fire_at, trigger, pending, at_instant)
            except StateError as exc:
                return self._unavailable(job_id, exc)
            if pending.claim is not None:
                return await self._settle(pending.claim, result)
            if pending.wait_for is not None:
                await pending.wait_for.settled.wait()
                if not pending.wait_for.durable:
                    continue  # taken back: this delivery may claim it now
                self._remember(job_id, fire_at, pending.wait_for.occurrence)
            elif pending.confirm is not None:
                # Another process's claim may not be durable yet (it commits as we do): a
                # "duplicate" must not stop the retries of an occurrence that could be lost.
                try:
                    with anyio.CancelScope(shield=True):
                        await self._sync.wait()
                except StateError as exc:
                    return self._unavailable(job_id, exc)
                self._remember(job_id, *pending.confirm)
            return result
        return FireResult(
            "unavailable",
            503,
            job_id,
            error="the occurrence's claim could not be committed; retry shortly",
        )

    def _unavailable(self, job_id: str, exc: StateError) -> FireResult:
        log.error("fire.state_failed", job_id=job_id, error=str(exc))
        return FireResult("unavailable", 503, job_id, error=str(exc))

    def _sync_wal(self) -> None:
        self.db.sync_wal()  # looked up at each call: tests swap the database's method

    def _checkpoint(self) -> None:
        self.db.checkpoint_passive()

    def _remember(self, job_id: str, fire_at: datetime | None, occurrence: datetime) -> None:
        if fire_at is None:
            return
        known = self._known
        if len(known) >= _KNOWN_MAX:
            del known[next(iter(known))]  # the oldest
        known[(job_id, fire_at)] = to_wire(occurrence)

    def _handle_fire(
        self,
        job_id: str,
        fire_at: datetime,
        trigger: str,
        pending: _Pending | None,
        at_instant: bool = False,
    ) -> FireResult:
        job = self.jobs.get(job_id)
        if job is not None and job.active:
            # The common repeat: a delivery whose occurrence is known claimed and durable,
            # and planned past. No query, no schedule walk.
            known = self._known.get((job_id, fire_at))
            if known is not None:
                log.debug("fire.duplicate", job_id=job_id, occurrence=known)
                return FireResult("duplicate", 200, job_id)
        now = _whole(self.clock())
        js = self.db.get_job(job_id) if job is not None else None
        if job is None or js is None:
            log.info("fire.gone", job_id=job_id, fire_at=to_wire(fire_at))
            return FireResult("gone", 200, job_id)
        if not job.active:
            log.info("fire.stale", job_id=job_id, fire_at=to_wire(fire_at), reason="paused")
            self.request_reconcile([job_id])
            return FireResult("stale", 200, job_id)
        planned = planner.arm_instant(job, js.next_fire) if js.next_fire else None
        occurrence: datetime | None = None
        if planned is not None and fire_at < planned:
            if self._is_prewake(fire_at, planned, js):
                occurrence = js.next_fire
                at_instant = True
            elif js.armed_fire == fire_at and not self._prewake_of_claimed(job, js, fire_at):
                # A waypoint: the real occurrence lies beyond the provider's horizon.
                if planner.too_early(fire_at, now):
                    return FireResult("too-early", 409, job_id, expected=fire_at)
                self.db.update_job(job_id, armed_fire=None, armed_confirmed_at=None)
                self.request_reconcile([job_id])
                nxt = planner.waypoint(planned - self._prewake_delta(), now, self.max_horizon)
                log.info("fire.rearmed", job_id=job_id, fire_at=to_wire(fire_at), next=to_wire(nxt))
                return FireResult("rearmed", 200, job_id, expected=nxt)
        if occurrence is None:
            occurrence = planner.occurrence_for_fire(
                job, fire_at, anchor=js.anchor, planned=js.next_fire
            )
        if occurrence is None and self.prewake:
            # A repeated pre-wake delivery of an occurrence claimed (and planned past) already.
            occurrence = planner.occurrence_for_fire(
                job, fire_at + self._prewake_delta(), anchor=js.anchor
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
        existing = self.db.get_occurrence(job_id, occurrence)
        if existing is not None:
            return self._duplicate(
                job, js, occurrence, now, fire_at, trigger, pending, at_instant, existing.owner
            )
        if js.next_fire is None or occurrence < js.next_fire:
            log.info(
                "fire.stale", job_id=job_id, occurrence=to_wire(occurrence), reason="superseded"
            )
            self.request_reconcile([job_id])
            return FireResult("stale", 200, job_id)
        next_fire_before = js.next_fire
        if occurrence > js.next_fire:
            # Delivered for a later occurrence than planned (state restored from
            # an older copy, say): plan as if this one had been next.
            js = replace(js, next_fire=occurrence)
        if planner.misfire_action(job, occurrence, now, anchor=js.anchor) != "run":
            return self._decide_overdue(
                job,
                js,
                now,
                trigger=trigger,
                pending=pending,
                fire_at=fire_at,
                next_fire_before=next_fire_before,
            )
        next_fire, coalesced = planner.next_after_claim(
            job, occurrence, now, anchor=js.anchor, runs_started=js.runs_started + 1
        )
        return self._claim_and_start(
            job,
            js,
            occurrence,
            next_fire,
            now,
            trigger=trigger,
            coalesced=coalesced,
            pending=pending,
            fire_at=fire_at,
            next_fire_before=next_fire_before,
            at_instant=at_instant,
        )

    def _prewake_delta(self) -> timedelta:
        return timedelta(seconds=self.prewake)

    def _is_prewake(self, fire_at: datetime, planned: datetime, js: JobState) -> bool:
        """Whether ``fire_at`` is the pre-wake arm of the planned occurrence (at ``planned``).

        The current pre-wake instant, or any instant within the pre-wake that was armed
        (armed under a shorter pre-wake before a configuration change).
        """
        if not self.prewake:
            return False
        earliest = planned - self._prewake_delta()
        return earliest <= fire_at < planned and (fire_at == earliest or js.armed_fire == fire_at)

    def _prewake_of_claimed(self, job: Job, js: JobState, fire_at: datetime) -> bool:
        """Whether ``fire_at`` is the pre-wake of an occurrence planned past already (a repeated
        delivery arriving before the reconciler re-armed): a duplicate, not a waypoint."""
        if not self.prewake or js.next_fire is None:
            return False
        occurrence = planner.occurrence_for_fire(
            job, fire_at + self._prewake_delta(), anchor=js.anchor
        )
        return occurrence is not None and occurrence < js.next_fire

    def _duplicate(
        self,
        job: Job,
        js: JobState,
        occurrence: datetime,
        now: datetime,
        fire_at: datetime,
        trigger: str,
        pending: _Pending | None,
        at_instant: bool,
        owner: str | None,
    ) -> FireResult:
        """The occurrence is claimed already (``owner``; None: unknown, someone else)."""
        claim = self._unsettled.get((job.id, occurrence))
        if claim is not None:
            if claim.failed:
                # Its fsync failed and taking it back failed too: take it back now, then
                # this delivery claims it afresh.
                self._undo(claim)
                return self._handle_fire(job.id, fire_at, trigger, pending, at_instant)
            if pending is None:
                return FireResult(
                    "unavailable",
                    503,
                    job.id,
                    error="the occurrence's claim is being committed; retry shortly",
                )
            pending.wait_for = claim
            log.debug("fire.duplicate", job_id=job.id, occurrence=to_wire(occurrence))
            return FireResult("duplicate", 200, job.id)
        self._plan_past_claimed(job, js, occurrence, now)
        log.debug("fire.duplicate", job_id=job.id, occurrence=to_wire(occurrence))
        if owner is not None and owner in (self.owner, self.db.owner):
            # Ours and settled: durable (a claim that could not be is taken back or unsettled).
            self._remember(job.id, fire_at, occurrence)
        elif pending is not None:
            pending.confirm = (fire_at, occurrence)
        return FireResult("duplicate", 200, job.id)

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
        pending: _Pending | None,
        fire_at: datetime | None,
        next_fire_before: datetime | None,
        at_instant: bool = False,
    ) -> FireResult:
        instant = planner.arm_instant(job, occurrence)
        early = at_instant and instant > self.clock()
        running = len(self._running.get(job.id, ())) + len(self._waiting.get(job.id, ()))
        queued = int(job.id in self._queued)
        action: str
        if early and job.overlap != "allow" and (running or queued or self._deferred.get(job.id)):
            # Claimed ahead of its instant while another run of the job is alive: whether
            # it starts, waits or is skipped depends on whether that one has ended by then.
            action = "defer"
        else:
            action = planner.overlap_action(job, running=running, queued=queued)
        durable = pending is None
        crash_point("before-claim")
        # A run that starts now is recorded in the claim's transaction: nothing half-way.
        insert = (
            self.db.claim_advance_and_start
            if action in ("start", "replace")
            else self.db.claim_and_advance
        )
        claimed = insert(
            job.id,
            occurrence,
            owner=self.owner,
            trigger=trigger,
            now=now,
            next_fire=next_fire,
            completed=next_fire is None,
            durable=durable,
        )
        run = claimed if isinstance(claimed, RunRecord) else None
        won = claimed is not None and claimed is not False
        if not won:
            # Another process claimed it between our look-up and our insert.
            return self._duplicate(
                job, js, occurrence, now, fire_at or occurrence, trigger, pending, at_instant, None
            )
        claim = _Claim(
            job_id=job.id,
            occurrence=occurrence,
            fire_at=fire_at,
            trigger=trigger,
            action=action,
            run_id=run.run_id if run is not None else None,
            next_fire=next_fire,
            next_fire_before=next_fire_before,
            completed_before=js.completed,
            coalesced=coalesced,
        )
        if pending is None:
            claim.durable = True
            self._claimed(claim)
        else:
            self._unsettled[(job.id, occurrence)] = claim
            pending.claim = claim
        if action == "skip":
            self.db.set_occurrence_state(job.id, occurrence, "skipped", now=now)
            return FireResult("skipped", 200, job.id)
        if action == "queue":
            self._queued[job.id] = (occurrence, trigger)
            return FireResult("accepted", 202, job.id)
        if action == "defer":

            def decide() -> None:
                crash_point("after-reply")
                self._defer(job, occurrence, trigger, instant)

            return FireResult("accepted", 202, job.id, start=decide)
        assert run is not None
        run_id = run.run_id

        def start() -> None:
            crash_point("after-reply")
            if action == "replace":
                for control in self._running.get(job.id, ()):
                    control.stop()
            self._spawn(job, occurrence, trigger, 1, run_id, not_before=instant if early else None)

        return FireResult("accepted", 202, job.id, run_id=run_id, start=start)

    def _claimed(self, claim: _Claim) -> None:
        """The claim is durable: re-arm, then say so."""
        crash_point("after-claim")
        # Re-arm before the job runs: the next fire is recorded; the reconciler arms it.
        self._rearm(claim)
        occurrence = to_wire(claim.occurrence)
        log.info(
            "fire.claimed",
            job_id=claim.job_id,
            occurrence=occurrence,
            trigger=claim.trigger,
            next_fire=to_wire(claim.next_fire) if claim.next_fire else None,
            coalesced=claim.coalesced,
        )
        if claim.action == "skip":
            log.info("fire.skipped", job_id=claim.job_id, occurrence=occurrence, reason="overlap")
        elif claim.action == "queue":
            log.info("fire.queued", job_id=claim.job_id, occurrence=occurrence)
        self._remember(claim.job_id, claim.fire_at, claim.occurrence)

    async def _settle(self, claim: _Claim, result: FireResult) -> FireResult:
        """Wait until ``claim`` is durable; take it back (503) when it cannot be."""
        key = (claim.job_id, claim.occurrence)
        # Shielded: a claim left neither durable nor taken back would hang every repeat.
        with anyio.CancelScope(shield=True):
            try:
                await self._sync.wait()
            except StateError as exc:
                log.error(
                    "fire.sync_failed",
                    job_id=claim.job_id,
                    occurrence=to_wire(claim.occurrence),
                    error=str(exc),
                )
                with suppress(StateError):  # logged; a repeat of the delivery tries again
                    self._undo(claim)
                claim.settled.set()
                return FireResult("unavailable", 503, claim.job_id, error=str(exc))
        del self._unsettled[key]
        claim.durable = True
        claim.settled.set()
        self._claimed(claim)
        return result

    def _rearm(self, claim: _Claim) -> None:
        """Ask the reconciler to re-arm ``claim``'s job: at once, or once the burst of
        deliveries it came in has been answered (see _REARM_LEAD)."""
        if (
            self._tg is None
            or claim.fire_at is None
            or self._in_flight <= 1
            or (
                claim.next_fire is not None
                and (claim.next_fire - self.clock()).total_seconds() - self.prewake < _REARM_LEAD
            )
        ):
            self.request_reconcile([claim.job_id])
            return
        if not self._rearms:
            if self.idle is not None:
                self.idle.acquire("rearm")
            self._tg.start_soon(self._flush_rearms, name="rearm")
        self._rearms.add(claim.job_id)

    async def _flush_rearms(self) -> None:
        try:
            deadline = anyio.current_time() + _REARM_DEFER
            while (left := deadline - anyio.current_time()) > 0:
                await self._answered(left)
                quiet = self._last_delivery + _REARM_QUIET - anyio.current_time()
                if quiet <= 0:
                    break
                await anyio.sleep(min(quiet, left))
        finally:
            # Also on cancellation (shutdown): the reconciler gets them while it can.
            job_ids, self._rearms = self._rearms, set()
            if self.idle is not None:
                self.idle.release("rearm")
            self.request_reconcile(sorted(job_ids))

    def _undo(self, claim: _Claim) -> None:
        """Take back a claim that could not be made durable, so that a retry can claim it."""
        try:
            self.db.undo_claim(
                claim.job_id,
                claim.occurrence,
                run_id=claim.run_id,
                planned=claim.next_fire,
                next_fire=claim.next_fire_before,
                completed=claim.completed_before,
            )
        except StateError as exc:
            claim.failed = True
            log.error(
                "fire.undo_failed",
                job_id=claim.job_id,
                occurrence=to_wire(claim.occurrence),
                error=str(exc),
            )
            raise
        self._unsettled.pop((claim.job_id, claim.occurrence), None)
        if self._queued.get(claim.job_id) == (claim.occurrence, claim.trigger):
            del self._queued[claim.job_id]
        self.request_reconcile([claim.job_id])
        log.warning("fire.undone", job_id=claim.job_id, occurrence=to_wire(claim.occurrence))

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

    def _hold(self) -> anyio.abc.TaskGroup:
        """Count one task of the engine's (a run, or a wait for an instant) as activity."""
        if self._tg is None:
            raise RuntimeError("Engine.bind() was not called")
        self._active_tasks += 1
        self._all_done = anyio.Event() if self._all_done.is_set() else self._all_done
        if self.idle is not None:
            self.idle.acquire("run")
        return self._tg

    def _release(self) -> None:
        self._active_tasks -= 1
        if self.idle is not None:
            self.idle.release("run")
        if self._active_tasks == 0:
            self._all_done.set()

    def _spawn(
        self,
        job: Job,
        occurrence: datetime,
        trigger: str,
        attempt: int,
        run_id: str | None,
        *,
        not_before: datetime | None = None,
    ) -> None:
        """Start a run in the engine's task group, at ``not_before`` when that is given."""
        tg = self._hold()
        if not_before is not None:
            self._waiting.setdefault(job.id, []).append(not_before)
        tg.start_soon(
            self._run_task,
            job,
            occurrence,
            trigger,
            attempt,
            run_id,
            not_before,
            name=f"run:{job.id}",
        )

    async def _wait_until(self, instant: datetime) -> bool:
        """Sleep until the wall clock reaches ``instant``; False when stop_runs() came first."""
        for _ in range(_WAKE_CHECKS):
            delay = (instant - self.clock()).total_seconds()
            if delay <= 0:
                break
            with anyio.move_on_after(delay):
                await self._halt.wait()
            if self._halt.is_set():
                return False
            # The timers run on the monotonic clock: look again only when the wall clock is
            # a hair short (an injected clock that stands still is not waited for twice).
            if (instant - self.clock()).total_seconds() >= _WAKE_SLACK:
                break
        return not self._halt.is_set()

    def _defer(self, job: Job, occurrence: datetime, trigger: str, instant: datetime) -> None:
        tg = self._hold()
        self._deferred[job.id] = self._deferred.get(job.id, 0) + 1
        tg.start_soon(self._decide_at, job, occurrence, trigger, instant, name=f"defer:{job.id}")

    async def _decide_at(
        self, job: Job, occurrence: datetime, trigger: str, instant: datetime
    ) -> None:
        """At ``instant``, start, queue or skip an occurrence claimed early (overlap)."""
        try:
            try:
                go = await self._wait_until(instant)
            finally:
                left = self._deferred.get(job.id, 1) - 1
                if left:
                    self._deferred[job.id] = left
                else:
                    self._deferred.pop(job.id, None)
            if not go:
                return  # shutting down: the claim is recovered as interrupted at the next start
            now = _whole(self.clock())
            running = len(self._running.get(job.id, ())) + sum(
                1 for at in self._waiting.get(job.id, ()) if at <= instant
            )
            action = planner.overlap_action(
                job, running=running, queued=int(job.id in self._queued)
            )
            occ = to_wire(occurrence)
            if action == "skip":
                self.db.set_occurrence_state(job.id, occurrence, "skipped", now=now)
                log.info("fire.skipped", job_id=job.id, occurrence=occ, reason="overlap")
            elif action == "queue":
                self._queued[job.id] = (occurrence, trigger)
                log.info("fire.queued", job_id=job.id, occurrence=occ)
            else:
                if action == "replace":
                    for control in self._running.get(job.id, ()):
                        control.stop()
                run = self.db.start_run(job.id, occurrence, attempt=1, trigger=trigger, now=now)
                self._spawn(job, occurrence, trigger, 1, run.run_id)
        except StateError as exc:
            # Claimed without a run: the next start's recovery marks it interrupted.
            log.error(
                "run.state_failed", job_id=job.id, occurrence=to_wire(occurrence), error=str(exc)
            )
        finally:
            self._release()

    async def _run_task(
        self,
        job: Job,
        occurrence: datetime,
        trigger: str,
        attempt: int,
        run_id: str | None,
        not_before: datetime | None = None,
    ) -> None:
        try:
            if not_before is not None:
                try:
                    go = await self._wait_until(not_before)
                finally:
                    waiting = self._waiting[job.id]
                    waiting.remove(not_before)
                    if not waiting:
                        del self._waiting[job.id]
                if not go:
                    # Shutting down before its instant: the run stays recorded as running
                    # and the next start's recovery marks it interrupted.
                    log.info("run.abandoned", job_id=job.id, occurrence=to_wire(occurrence))
                    return
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
            self._release()
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
        from chronosd.runner import RunControl, RunSpec, job_environment, resolve_argv, run_job

        async with self._limiter:
            await self._answered(_RUN_DEFER)
            now = _whole(self.clock())
            if run_id is None:
                run_id = self.db.start_run(
                    job.id, occurrence, attempt=attempt, trigger=trigger, now=now
                ).run_id
            # The run was recorded by this process (a claim or start_run above), its
            # occurrence moved to "running" in the same transaction: neither is read back.
            # set_run_pid dates the occurrence's "running" at ``now`` once the process exists.
            output_path = self.db.run_log_path(job.id, run_id)
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
                output_path=output_path,
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
                    spec,
                    control,
                    on_started=lambda pid: self.db.set_run_pid(run_id, pid, started_at=now),
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
        """Stop every run, and every run still waiting for its instant (for good: shutdown)."""
        self._halt.set()
        if self._quiet is not None:
            self._quiet.set()  # a run held back for the deliveries goes on as it would have
            self._quiet = None
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
