"""JobsDiff: what changed between the jobs chronosd knows and a newly loaded set.

Pure: no I/O. The old side is either the Jobs of the last good load or the
``{job_id: spec_hash}`` map stored in state.db; a spec hash carries the job's
schedule key as its prefix (see ``validate.spec_hash``), so a diff against
stored hashes still knows whether a schedule changed, which re-anchors the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from chronosd.jobs.model import Job
from chronosd.jobs.validate import changed_fields, schedule_key, spec_hash


@dataclass(frozen=True)
class JobChange:
    """One job present on both sides whose spec hash differs.

    ``fields`` is empty when the old side was only a stored hash.
    """

    job_id: str
    fields: tuple[str, ...]
    schedule_changed: bool


@dataclass(frozen=True)
class JobsDiff:
    """What changed between the recorded job set and jobs.json."""

    added: tuple[str, ...]
    changed: tuple[JobChange, ...]
    removed: tuple[str, ...]

    def job_ids(self) -> tuple[str, ...]:
        """Every job id the diff touches: added, then changed, then removed."""
        return (*self.added, *(change.job_id for change in self.changed), *self.removed)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)


def diff_jobs(old: Mapping[str, str | Job], new: Sequence[Job]) -> JobsDiff:
    """Compare old jobs (or their stored spec hashes) with the new job set.

    Order follows the new sequence for added and changed ids and the old
    mapping for removed ones, so the result is deterministic.
    """
    added: list[str] = []
    changed: list[JobChange] = []
    new_ids: set[str] = set()
    for job in new:
        if job.id in new_ids:
            continue
        new_ids.add(job.id)
        if job.id not in old:
            added.append(job.id)
            continue
        change = _compare(job.id, old[job.id], job)
        if change is not None:
            changed.append(change)
    removed = tuple(job_id for job_id in old if job_id not in new_ids)
    return JobsDiff(tuple(added), tuple(changed), removed)


def _compare(job_id: str, before: str | Job, after: Job) -> JobChange | None:
    after_hash = after.spec_hash or spec_hash(after)
    if isinstance(before, Job):
        before_hash = before.spec_hash or spec_hash(before)
        if before_hash == after_hash:
            return None
        return JobChange(
            job_id, changed_fields(before, after), schedule_key(before) != schedule_key(after)
        )
    if before == after_hash:
        return None
    before_key, separator, _ = before.partition(":")
    # A hash without the schedule-key prefix cannot tell; re-anchoring is the
    # safe reading because it never replays occurrences of an old schedule.
    schedule_changed = not separator or before_key != schedule_key(after)
    return JobChange(job_id, (), schedule_changed)
