"""Read the jobs.json that Hermes Agent writes (``~/.hermes/cron/jobs.json``).

Hermes stores each job with a schedule *object* (``{"kind": "cron", "expr": ...}``,
``{"kind": "interval", "minutes": N}``, ``{"kind": "once", "run_at": ISO}``), a
``state`` string, a ``repeat`` object ``{"times": N|null, "completed": k}`` and
many runtime and agent fields. This module translates such a record into the
native field forms of DESIGN.md 3.1 so that ``validate`` checks it with the
same rules; the fields chronosd does not use are ignored without warnings,
because they belong to Hermes, not to the user's spelling.

Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from chronosd.durations import format_duration

# Fields Hermes writes that configure its own agent run (chronosd hands the
# whole record to the default command on stdin and otherwise leaves them alone).
AGENT_KEYS = frozenset(
    {
        "prompt",
        "skills",
        "skill",
        "model",
        "provider",
        "base_url",
        "script",
        "no_agent",
        "context_from",
        "schedule_display",
        "deliver",
        "origin",
        "enabled_toolsets",
        "workdir",
        "profile",
        "provider_snapshot",
        "model_snapshot",
        "attach_to_session",
        "agent",
        "tier",
        "handler",
        "urgent",
    }
)

# Runtime bookkeeping Hermes keeps in the file; chronosd keeps its own in state.db.
RUNTIME_KEYS = frozenset(
    {
        "state",
        "paused_reason",
        "fire_claim",
        "run_claim",
        "backfill_pending",
        "expected_readiness_version",
    }
)

# Top-level keys of a Hermes file besides "jobs".
TOP_LEVEL_KEYS = frozenset({"updated_at", "version"})

SCHEDULE_KINDS = ("cron", "interval", "once")


class HermesRecordError(ValueError):
    """One field of a Hermes record cannot be translated; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def is_hermes_record(record: Mapping[str, Any]) -> bool:
    """Whether a job record uses Hermes' shapes (a schedule or repeat object)."""
    return isinstance(record.get("schedule"), Mapping) or isinstance(record.get("repeat"), Mapping)


def is_ignored_key(key: str) -> bool:
    """Whether an unknown key of a Hermes record is Hermes' own data (no warning)."""
    return (
        key in AGENT_KEYS
        or key in RUNTIME_KEYS
        or key.startswith("last_")
        or key.endswith("_at")
        or key.endswith("_error")
    )


def schedule_text(schedule: Mapping[str, Any]) -> str:
    """Render a Hermes schedule object as chronosd schedule text.

    Raises HermesRecordError (field ``schedule``) when the object is unusable.
    """
    kind = schedule.get("kind")
    if kind == "cron":
        expr = schedule.get("expr")
        if not isinstance(expr, str) or not expr.strip():
            raise HermesRecordError(
                "schedule",
                'a Hermes "cron" schedule needs "expr" with a cron expression, '
                'e.g. {"kind": "cron", "expr": "0 9 * * *"}',
            )
        return expr.strip()
    if kind == "interval":
        minutes = schedule.get("minutes")
        if (
            isinstance(minutes, bool)
            or not isinstance(minutes, int | float)
            or not math.isfinite(minutes)
            or minutes <= 0
        ):
            raise HermesRecordError(
                "schedule",
                'a Hermes "interval" schedule needs "minutes" as a positive number, '
                'e.g. {"kind": "interval", "minutes": 30}',
            )
        return f"every {format_duration(minutes * 60.0)}"
    if kind == "once":
        run_at = schedule.get("run_at")
        if not isinstance(run_at, str) or not run_at.strip():
            raise HermesRecordError(
                "schedule",
                'a Hermes "once" schedule needs "run_at" with an ISO-8601 time, '
                'e.g. {"kind": "once", "run_at": "2030-01-01T09:00:00+00:00"}',
            )
        return f"at {run_at.strip()}"
    shown = kind if isinstance(kind, str) else repr(kind)
    raise HermesRecordError(
        "schedule",
        f"schedule kind {shown} is not one of {', '.join(SCHEDULE_KINDS)}; "
        'write the schedule as a string instead, e.g. "0 9 * * *" or "every 30m"',
    )


def repeat_times(repeat: Mapping[str, Any]) -> int | None:
    """``{"times": N|null, "completed": k}`` -> N (None = forever).

    Hermes treats ``times`` 0 as "no limit", so chronosd does too. The
    ``completed`` count is Hermes' runtime state and is ignored: chronosd
    counts its own starts in state.db.
    """
    times = repeat.get("times")
    if times is None:
        return None
    if isinstance(times, bool) or not isinstance(times, int) or times < 0:
        raise HermesRecordError(
            "repeat",
            'repeat "times" must be a whole number of runs or null (forever), '
            'e.g. {"times": 3, "completed": 0}',
        )
    return times or None


def translate(record: Mapping[str, Any]) -> tuple[dict[str, Any], list[HermesRecordError]]:
    """Return the record with Hermes shapes replaced by native ones, and what failed.

    The result keeps every native key as written; a schedule object becomes
    text (or is dropped when unusable, with an error), a repeat object becomes
    an int or None, and ``state: "paused"`` becomes ``paused: true`` unless the
    record already says ``paused`` itself (``chronosd pause/resume`` write that
    key, so it wins over Hermes' state).
    """
    native = dict(record)
    errors: list[HermesRecordError] = []
    schedule = record.get("schedule")
    if isinstance(schedule, Mapping):
        try:
            native["schedule"] = schedule_text(schedule)
        except HermesRecordError as exc:
            errors.append(exc)
            native["schedule"] = None
    repeat = record.get("repeat")
    if isinstance(repeat, Mapping):
        try:
            native["repeat"] = repeat_times(repeat)
        except HermesRecordError as exc:
            errors.append(exc)
            native["repeat"] = None
    if "paused" not in record and record.get("state") == "paused":
        native["paused"] = True
    return native, errors
