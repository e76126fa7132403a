"""Pure planning decisions: next fire, jitter, catch-up, overlap, retries, waypoints.

No clock reads and no I/O: every function takes ``now`` and values, and
returns values. The fire flow and the reconciler feed it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from chronosd.jobs.model import Job
from chronosd.jobs.schedule import default_misfire_grace
from chronosd.timefmt import to_wire

TOO_EARLY = 60.0  # a fire this much before its occurrence is refused (CONTRACT.md)
RETRY_BASE = 10.0
RETRY_CAP = 3600.0

MisfireAction = Literal["run", "catch-up", "missed"]
OverlapAction = Literal["start", "skip", "queue", "replace"]


def jitter_for(job_id: str, scheduled: datetime, bound: float) -> float:
    """A delay in whole seconds in [0, bound], stable for one occurrence.

    Derived from a hash so that a restart, a retry of the arm, or another
    process planning the same occurrence all pick the same instant.
    """
    if bound < 1:
        return 0.0
    digest = hashlib.sha256(f"{job_id}\0{to_wire(scheduled)}".encode()).digest()
    return float(int.from_bytes(digest[:8], "big") % (int(bound) + 1))


def arm_instant(job: Job, scheduled: datetime) -> datetime:
    """When the trigger for an occurrence should go off (its instant plus jitter)."""
    if job.jitter < 1:
        return scheduled  # on every fire's path: skip the hash when there is no jitter
    return scheduled + timedelta(seconds=jitter_for(job.id, scheduled, job.jitter))


def repeat_exhausted(job: Job, runs_started: int) -> bool:
    limit = 1 if job.schedule.one_shot else job.repeat
    return limit is not None and runs_started >= limit


def next_occurrence(
    job: Job, after: datetime, *, anchor: datetime, runs_started: int
) -> datetime | None:
    """The first occurrence strictly after ``after``, or None when the job is done."""
    if repeat_exhausted(job, runs_started):
        return None
    return job.schedule.next_after(after, anchor=anchor)


def occurrence_for_fire(
    job: Job, fire_at: datetime, *, anchor: datetime, planned: datetime | None = None
) -> datetime | None:
    """Map a delivered ``fire_at`` back to the occurrence it was armed for.

    With jitter the armed instant is the occurrence plus a stable delay of at
    most ``job.jitter``; any occurrence in that window whose jittered instant
    equals ``fire_at`` is the one. None: ``fire_at`` belongs to no occurrence
    of the current schedule (it was armed for an older schedule).
    """
    fire_at = fire_at.replace(microsecond=0)
    # A jitter longer than the period can give two occurrences the same instant (validation
    # warns about it); the one the job planned next is the one that was armed.
    if planned is not None and arm_instant(job, planned) == fire_at:
        return planned
    window_start = fire_at - timedelta(seconds=int(job.jitter) + 1)
    candidate = job.schedule.next_after(window_start, anchor=anchor)
    while candidate is not None and candidate <= fire_at:
        if arm_instant(job, candidate) == fire_at:
            return candidate
        candidate = job.schedule.next_after(candidate, anchor=anchor)
    return None


def misfire_grace(job: Job, *, anchor: datetime) -> float:
    if job.misfire_grace is not None:
        return job.misfire_grace
    return default_misfire_grace(job.schedule, anchor=anchor)


def misfire_action(
    job: Job, scheduled: datetime, now: datetime, *, anchor: datetime
) -> MisfireAction:
    """What to do with an occurrence that is due (DESIGN.md 4, catch_up/misfire_grace).

    Within the grace (measured from the jittered instant) it simply runs; later it runs once
    as a catch-up when the job allows it, otherwise it is recorded as missed.
    """
    lateness = (now - arm_instant(job, scheduled)).total_seconds()
    # Not late at all: the grace (which may walk the schedule to find its period) is moot.
    if lateness <= 0 or lateness <= misfire_grace(job, anchor=anchor):
        return "run"
    return "catch-up" if job.catch_up else "missed"


def next_after_claim(
    job: Job, occurrence: datetime, now: datetime, *, anchor: datetime, runs_started: int
) -> tuple[datetime | None, int]:
    """The occurrence to arm next once ``occurrence`` is claimed at ``now``.

    A late claim leaves later occurrences due already: those still within their
    grace stay due and run in turn; those beyond it coalesce into this run (the
    count is returned) rather than each running late (DESIGN.md 4).
    """
    nxt = next_occurrence(job, occurrence, anchor=anchor, runs_started=runs_started)
    coalesced = 0
    while nxt is not None and nxt <= now and misfire_action(job, nxt, now, anchor=anchor) != "run":
        coalesced += 1
        if coalesced >= 10_000:  # a very long outage of a very frequent job: stop counting
            return next_occurrence(job, now, anchor=anchor, runs_started=runs_started), coalesced
        nxt = next_occurrence(job, nxt, anchor=anchor, runs_started=runs_started)
    return nxt, coalesced


def overlap_action(job: Job, *, running: int, queued: int) -> OverlapAction:
    """How a new run of ``job`` starts while ``running`` runs of it are alive."""
    if running == 0 or job.overlap == "allow":
        return "start"
    if job.overlap == "replace":
        return "replace"
    if job.overlap == "queue" and queued == 0:
        return "queue"
    return "skip"


def retry_delay(attempt: int) -> float:
    """Backoff before attempt ``attempt + 1`` (attempt is 1-based): 10 s doubling, capped at 1 h."""
    return float(min(RETRY_CAP, RETRY_BASE * 2 ** max(0, attempt - 1)))


def should_retry(job: Job, attempt: int, status: str) -> bool:
    return status in ("failed", "timeout", "spawn-error", "interrupted") and attempt <= job.retries


def waypoint(fire_at: datetime, now: datetime, max_horizon: float | None) -> datetime:
    """The instant to arm: ``fire_at`` itself, or a waypoint at the provider's horizon."""
    if max_horizon is None:
        return fire_at
    horizon = (now + timedelta(seconds=max_horizon)).replace(microsecond=0)
    return min(fire_at, horizon)


def too_early(fire_at: datetime, now: datetime) -> bool:
    return (fire_at - now).total_seconds() > TOO_EARLY


@dataclass(frozen=True)
class CatchUp:
    """Start-up decision for a job whose planned fire has passed."""

    action: MisfireAction
    occurrence: datetime
    coalesced: int  # further occurrences that passed meanwhile and are folded into this one
    next_fire: datetime | None


def plan_overdue(
    job: Job, scheduled: datetime, now: datetime, *, anchor: datetime, runs_started: int
) -> CatchUp:
    """Decide for an overdue occurrence and plan the next future one.

    Occurrences between ``scheduled`` and ``now`` coalesce into this one
    decision, so a job that missed a thousand fires runs at most once.
    """
    action = misfire_action(job, scheduled, now, anchor=anchor)
    started = runs_started + (0 if action == "missed" else 1)
    coalesced = 0
    nxt = next_occurrence(job, scheduled, anchor=anchor, runs_started=started)
    # Counting is bounded: a job firing every second that slept for a year must
    # not make start-up walk 31 million instants.
    while nxt is not None and nxt <= now and coalesced < 10_000:
        coalesced += 1
        nxt = next_occurrence(job, nxt, anchor=anchor, runs_started=started)
    if nxt is not None and nxt <= now:
        nxt = next_occurrence(job, now, anchor=anchor, runs_started=started)
    return CatchUp(action=action, occurrence=scheduled, coalesced=coalesced, next_fire=nxt)
