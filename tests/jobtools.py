"""Helpers for tests: build validated Jobs from plain records."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from chronosd.jobs.model import Job
from chronosd.jobs.validate import JobDefaults, validate_job

T0 = datetime(2026, 3, 2, 12, 0, 0, tzinfo=UTC)


def make_job(now: datetime = T0, **record: Any) -> Job:
    record.setdefault("id", "job")
    record.setdefault("schedule", "every 60s")
    record.setdefault("command", ["true"])
    job, problems = validate_job(record, 0, defaults=JobDefaults(), now=now)
    errors = [p for p in problems if p.severity == "error"]
    assert job is not None and not errors, errors
    return job
