"""Schedules: the ``schedule`` field of jobs.json (DESIGN.md 3.1) and its fires (DESIGN.md 4).

Pure: no clock reads, no I/O. Every instant that leaves this module is aware
UTC with whole seconds; wall-clock arithmetic happens only here.

Cron expressions are matched against the wall clock of the job's zone with
cronsim run on *naive* datetimes (pure wall-clock matching, no DST logic of
its own). The DST rule is applied around it, one UTC-offset segment at a
time: between two offset transitions the wall clock is a plain shift of UTC,
so the first matching wall time inside a segment is the first fire in it.
At a transition the rule of DESIGN.md 4 decides:

- a *fixed-time* job (no ``*`` in its minute or hour field) fires once, at the
  transition instant, when any wall time skipped by a spring-forward gap
  matches; wall times repeated by a fall-back fire on their first pass only;
- any other job fires at every real instant whose wall time matches: nothing
  inside a gap, both passes of a repeated hour.
"""

from __future__ import annotations

import functools
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from chronosd.durations import format_duration, parse_duration
from chronosd.errors import DurationError, ScheduleError
from chronosd.timefmt import to_wire

ScheduleKind = Literal["cron", "every", "at", "in"]

MIN_GRACE = 120.0
MAX_GRACE = 7200.0
ONE_SHOT_GRACE = 120.0

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_SECOND = timedelta(seconds=1)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Offset transitions are found by probing the zone's UTC offset at this step
# and bisecting on a change. This assumes no zone changes its offset and
# changes it back within one day, which holds for every zone in tzdata.
_PROBE = 86400

# Transitions are found once per zone and stretch of this many seconds (~388
# days) and kept, so a schedule asks the zone a few hundred times per year of
# its calendar in a process, not per call.
_CHUNK = 1 << 25

# cronsim gives up after 50 years without a wall-clock match; the calendar
# repeats any (date, weekday) pair within 40 years, so a schedule that finds
# no real fire within this horizon never fires.
_HORIZON = 60 * 366 * 86400

# Longer intervals would run past the calendar datetime can represent.
_MAX_DURATION = 100 * 365 * 86400

# The "can it ever fire" check at parse time starts here unless the caller says
# when the job was first seen; parsing must not read the clock.
_REFERENCE = datetime(2025, 1, 1, tzinfo=UTC)

# (name, lowest, highest) of the six cron fields, seconds first.
_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_MONTH_NAMES = {name: number for number, name in enumerate(_MONTHS, 1)}
_DAY_NAMES = {name: number for number, name in enumerate(_DAYS)}
_MONTH, _DOW = 4, 5

_OTHER_FORMS = '"every 30m", "in 30m" and "at 2026-06-18T12:00:00"'
_FORMS = 'a cron expression, "every 30m", "in 30m" or "at 2026-06-18T12:00:00"'


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: cron, every or at, with its time zone."""

    kind: ScheduleKind
    text: str  # normalized text, e.g. "0 30 2 * * *", "every 1h30m", "at 2026-06-18T12:34:56+00:00"
    timezone: str  # IANA name the schedule is read in
    cron: str | None = None  # normalized 6-field expression (seconds first), macros expanded
    fixed_time: bool = False  # cron only: no "*" in the minute or hour field (DESIGN.md 4)
    interval: float | None = None  # seconds (a whole number), for "every" and "in"
    at: datetime | None = None  # aware UTC, for "at"

    @property
    def one_shot(self) -> bool:
        return self.kind in ("at", "in")

    def next_after(self, after: datetime, *, anchor: datetime) -> datetime | None:
        """First fire instant strictly after ``after``, as aware UTC with whole seconds.

        ``anchor`` is when chronosd first saw the job: ``every D`` fires at
        anchor + k*D (k >= 1) and ``in D`` once at anchor + D, with the anchor
        truncated to whole seconds like every instant stored on the wire.
        One-shots return None once their instant is <= ``after``.
        """
        floor = _epoch_floor(after, "after")
        base = _epoch_floor(anchor, "anchor")
        found: int | None
        if self.kind == "cron":
            if self.cron is None:
                raise ValueError("cron schedule without an expression")
            found = _next_cron(
                self.cron, ZoneInfo(self.timezone), self.fixed_time, floor, floor + _HORIZON
            )
        elif self.kind == "every":
            step = self._whole_interval()
            found = base + max(1, (floor - base) // step + 1) * step
        elif self.kind == "in":
            due = base + self._whole_interval()
            found = due if due > floor else None
        else:
            if self.at is None:
                raise ValueError("at schedule without an instant")
            due = _epoch_floor(self.at, "at")
            found = due if due > floor else None
        return None if found is None else datetime.fromtimestamp(found, UTC)

    def period(self, *, anchor: datetime) -> float | None:
        """Typical seconds between fires (for the default misfire grace); None for one-shots.

        For cron: the gap between the first two fires after ``anchor``.
        """
        if self.one_shot:
            return None
        if self.kind == "every":
            return float(self._whole_interval())
        first = self.next_after(anchor, anchor=anchor)
        second = None if first is None else self.next_after(first, anchor=anchor)
        if first is None or second is None:
            return None
        return (second - first).total_seconds()

    def upcoming(self, after: datetime, *, anchor: datetime, count: int) -> list[datetime]:
        """The next ``count`` fires after ``after`` (fewer when the schedule ends)."""
        fires: list[datetime] = []
        cursor = after
        while len(fires) < count:
            found = self.next_after(cursor, anchor=anchor)
            if found is None:
                break
            fires.append(found)
            cursor = found
        return fires

    def _whole_interval(self) -> int:
        if self.interval is None:
            raise ValueError(f"{self.kind} schedule without an interval")
        return int(self.interval)


def validate_timezone(name: str) -> ZoneInfo:
    """The zone for an IANA name; ScheduleError for anything else."""
    message = f"unknown time zone {name!r}; use an IANA name such as Europe/London"
    if not isinstance(name, str) or not name.strip():
        raise ScheduleError(message)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ScheduleError(message) from exc


def parse_schedule(text: str, timezone: str, *, first_seen: datetime | None = None) -> Schedule:
    """Parse the ``schedule`` field; raise ScheduleError with a precise one-line message.

    ``first_seen`` (aware) only moves the start of the "can this cron
    expression ever fire" check; without it a fixed reference instant is used.
    """
    zone = validate_timezone(timezone)
    if not isinstance(text, str):
        raise ScheduleError(f"schedule {text!r} is not a string; write {_FORMS}")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise ScheduleError(f"schedule is empty; write {_FORMS}")
    keyword, _, rest = cleaned.partition(" ")
    keyword = keyword.lower()
    if keyword == "every":
        seconds = _parse_interval(cleaned, rest)
        return Schedule(
            kind="every",
            text=f"every {format_duration(seconds)}",
            timezone=timezone,
            interval=float(seconds),
        )
    if keyword == "in":
        seconds = _parse_interval(cleaned, rest)
        return Schedule(
            kind="in",
            text=f"in {format_duration(seconds)}",
            timezone=timezone,
            interval=float(seconds),
        )
    if keyword == "at":
        if not rest:
            raise ScheduleError(
                f'schedule "{cleaned}" needs a timestamp; write e.g. "at 2026-06-18T12:00:00"'
            )
        instant = _parse_timestamp(rest, zone)
        if instant is None:
            raise ScheduleError(
                f'schedule "{cleaned}": {rest!r} is not an ISO-8601 timestamp; '
                "write e.g. at 2026-06-18T12:00:00 or at 2026-06-18T12:00:00+02:00"
            )
        return _at_schedule(instant, timezone)
    if cleaned.startswith("@"):
        expanded = MACROS.get(cleaned.lower())
        if expanded is None:
            raise ScheduleError(
                f'schedule "{cleaned}" is not a known macro; use one of {" ".join(MACROS)}'
            )
        return _cron_schedule(cleaned, expanded, timezone, zone, first_seen)
    fields = cleaned.split(" ")
    if len(fields) in (5, 6):
        return _cron_schedule(cleaned, cleaned, timezone, zone, first_seen)
    if len(fields) == 1:
        try:
            parse_duration(cleaned)
        except DurationError:
            pass
        else:
            raise ScheduleError(
                f'schedule "{cleaned}" is ambiguous; write "every {cleaned}" or "in {cleaned}"'
            )
    if len(fields) <= 2:
        instant = _parse_timestamp(cleaned, zone)
        if instant is not None:
            return _at_schedule(instant, timezone)
        raise ScheduleError(f'schedule "{cleaned}" is not understood; write {_FORMS}')
    raise ScheduleError(
        f'schedule "{cleaned}" is not understood: it has {len(fields)} fields, but a cron '
        "expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first); "
        f"other forms are {_OTHER_FORMS}"
    )


@functools.lru_cache(maxsize=4096)
def default_misfire_grace(schedule: Schedule, *, anchor: datetime) -> float:
    """Half the period clamped to 120 s .. 7200 s; 120 s for one-shots.

    Cached: it walks the schedule, and a burst of late deliveries asks it once per fire.
    """
    if schedule.one_shot:
        return ONE_SHOT_GRACE
    period = schedule.period(anchor=anchor)
    if period is None:
        return MIN_GRACE
    return min(MAX_GRACE, max(MIN_GRACE, period / 2))


# --- parsing helpers ------------------------------------------------------------------------


def _parse_interval(cleaned: str, rest: str) -> int:
    if not rest:
        raise ScheduleError(f'schedule "{cleaned}" needs a duration; write e.g. "{cleaned} 30m"')
    try:
        seconds = parse_duration(rest)
    except DurationError as exc:
        raise ScheduleError(f'schedule "{cleaned}": {exc}') from exc
    if seconds <= 0:
        raise ScheduleError(f'schedule "{cleaned}": the duration must be longer than 0s')
    if seconds > _MAX_DURATION:
        raise ScheduleError(
            f'schedule "{cleaned}": the duration must be at most {format_duration(_MAX_DURATION)}'
            " (100 years)"
        )
    # Fires are whole seconds on the wire; a fractional interval would drift
    # against them or fire twice in one second.
    if seconds != int(seconds):
        raise ScheduleError(
            f'schedule "{cleaned}": the duration must be a whole number of seconds '
            f"(got {seconds:g}s)"
        )
    return int(seconds)


def _parse_timestamp(value: str, zone: ZoneInfo) -> datetime | None:
    """An ISO-8601 timestamp as aware UTC (naive ones read in ``zone``), or None."""
    if value[-1] == "z":
        value = value[:-1] + "Z"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Whole seconds on the wire: a fractional timestamp fires at the next whole
    # second, never before the instant asked for.
    if parsed.microsecond:
        parsed = parsed.replace(microsecond=0) + _SECOND
    if parsed.tzinfo is not None:
        return parsed.astimezone(UTC)
    return _resolve_wall(parsed, zone)


def _resolve_wall(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant of a naive wall time in ``zone``, decided like a fixed-time cron job.

    A repeated wall time means its first pass; a skipped one means the first
    instant after the gap.
    """
    seconds = (wall - _NAIVE_EPOCH) // _SECOND
    first_pass = _epoch_floor(wall.replace(tzinfo=zone, fold=0), "wall")
    if _offset(zone, first_pass) + first_pass == seconds:
        return datetime.fromtimestamp(first_pass, UTC)
    # In a gap fold=0 reads the wall time with the offset from before the gap
    # and fold=1 with the one after; the transition lies between the two.
    earlier = _epoch_floor(wall.replace(tzinfo=zone, fold=1), "wall")
    change = _first_change(zone, earlier, first_pass, _offset(zone, earlier))
    if change is None:  # pragma: no cover - a gap always contains a transition
        raise ScheduleError(f"cannot place {wall.isoformat()} in {zone.key}")
    return datetime.fromtimestamp(change, UTC)


def _at_schedule(instant: datetime, timezone: str) -> Schedule:
    return Schedule(kind="at", text=f"at {to_wire(instant)}", timezone=timezone, at=instant)


def _cron_schedule(
    written: str, expression: str, timezone: str, zone: ZoneInfo, first_seen: datetime | None
) -> Schedule:
    fields = expression.upper().split(" ")
    if len(fields) == 5:
        fields.insert(0, "0")
    for index, field in enumerate(fields):
        problem = _field_problem(index, field)
        if problem is not None:
            raise ScheduleError(f'schedule "{written}": {_FIELDS[index][0]} field: {problem}')
    cron = " ".join(_collapse_single_ranges(field) for field in fields)
    reference = _REFERENCE if first_seen is None else first_seen
    start = _epoch_floor(reference, "first_seen")
    try:
        # One CronSim both checks the expression and finds its first wall-clock match. With
        # every day of every month allowed, a day matches whatever the day-of-week field
        # names: the check suffices, and the walk (most of a first load's time) is skipped.
        walk = CronSim(cron, _NAIVE_EPOCH + timedelta(seconds=start + _offset(zone, start)))
        fires = (fields[3] == "*" and fields[4] == "*") or next(walk) is not None
    except CronSimError as exc:
        # What survives the field checks above is cronsim's own "no month has
        # that day" test (e.g. 0 0 31 2 *).
        if str(exc) == "Bad day-of-month":
            raise ScheduleError(_never_message(written)) from exc
        raise ScheduleError(f'schedule "{written}": {str(exc).lower()}') from exc
    except (StopIteration, OverflowError):
        fires = False
    if not fires:
        raise ScheduleError(_never_message(written))
    fixed = "*" not in fields[1] and "*" not in fields[2]
    schedule = Schedule(kind="cron", text=cron, timezone=timezone, cron=cron, fixed_time=fixed)
    # Without offset changes every wall-clock match is a real instant, found just above.
    if not _fixed_offset(zone) and schedule.next_after(reference, anchor=reference) is None:
        raise ScheduleError(
            f'schedule "{written}" never fires in {timezone}: every wall time it names falls '
            "in an hour skipped by daylight saving; pick another time or time zone"
        )
    return schedule


def _never_message(written: str) -> str:
    return (
        f'schedule "{written}" never fires: no calendar date matches its day-of-month, '
        "month and day-of-week fields"
    )


def _collapse_single_ranges(field: str) -> str:
    """Write ``5-5`` and ``5-5/2`` as ``5``.

    cronsim reads a one-value range with a step like ``5/2`` (from 5 to the end
    of the field); in cron it is the single value.
    """
    terms = []
    for term in field.split(","):
        base = term.partition("/")[0]
        start, dash, end = base.partition("-")
        terms.append(start if dash and start == end else term)
    return ",".join(terms)


def _field_problem(index: int, field: str) -> str | None:
    for term in field.split(","):
        problem = _term_problem(index, term)
        if problem is not None:
            return problem
    return None


def _term_problem(index: int, term: str) -> str | None:
    if not term:
        return "empty item in a list; remove the extra comma"
    if index == 3 and term in ("L", "LW"):
        return None
    if index == _DOW and term.endswith("L"):
        day = term[:-1]
        if not day.isdigit():
            return f"{term!r}: write the last weekday of the month as a number and L, e.g. 5L"
        return _value_problem(index, day)
    if index == _DOW and "#" in term:
        day, _, nth = term.partition("#")
        problem = _value_problem(index, day)
        if problem is not None:
            return problem
        if not nth.isdigit() or not 1 <= int(nth) <= 5:
            return f"{term!r}: the number after # must be 1-5"
        return None
    base, slash, step = term.partition("/")
    if slash and (not step.isdigit() or int(step) == 0):
        return f"{term!r}: the step after / must be a whole number of at least 1"
    if base == "*":
        return None
    start, dash, end = base.partition("-")
    for value in (start, end) if dash else (start,):
        problem = _value_problem(index, value)
        if problem is not None:
            return problem
    if dash and _value(index, start) > _value(index, end):
        return f"range {base!r} runs backwards; write the smaller value first"
    return None


def _value_problem(index: int, value: str) -> str | None:
    _, lowest, highest = _FIELDS[index]
    if value.isdigit():
        if lowest <= int(value) <= highest:
            return None
        return f"{int(value)} is out of range {lowest}-{highest}"
    if index == _MONTH:
        if value in _MONTH_NAMES:
            return None
        return f"{value!r} is not a number {lowest}-{highest} or a month name (JAN-DEC)"
    if index == _DOW:
        if value in _DAY_NAMES:
            return None
        return f"{value!r} is not a number {lowest}-{highest} or a day name (SUN-SAT)"
    if not value:
        return "a value is missing"
    return f"{value!r} is not a number {lowest}-{highest}"


def _value(index: int, value: str) -> int:
    if value.isdigit():
        return int(value)
    return _MONTH_NAMES[value] if index == _MONTH else _DAY_NAMES[value]


# --- instants and the DST rule --------------------------------------------------------------


def _epoch_floor(instant: datetime, what: str) -> int:
    """Whole POSIX seconds at or before an aware instant."""
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime, got naive {instant.isoformat()}")
    return (instant - _UTC_EPOCH) // _SECOND


def _offset(zone: ZoneInfo, seconds: int) -> int:
    """UTC offset of ``zone`` at a POSIX second, in seconds."""
    offset = datetime.fromtimestamp(seconds, zone).utcoffset()
    if offset is None:  # pragma: no cover - ZoneInfo always knows its offset
        raise ValueError(f"time zone {zone.key} has no UTC offset")
    return offset // _SECOND


def _first_change(zone: ZoneInfo, start: int, end: int, offset: int) -> int | None:
    """First second in (start, end] whose offset differs from ``offset`` (the offset at start)."""
    if start >= end or _fixed_offset(zone):
        return None
    for chunk in range((start + 1) // _CHUNK, end // _CHUNK + 1):
        changes = _changes_in_chunk(zone, chunk)
        index = bisect_right(changes, start)
        if index < len(changes):
            # The offset holds from start up to the next change, so that change is the first
            # second whose offset differs from the one at start.
            change = changes[index]
            return change if change <= end else None
    return None


@functools.cache
def _fixed_offset(zone: ZoneInfo) -> bool:
    """Whether the zone never changes its offset (UTC, Etc/GMT+5, ...).

    tzinfo.utcoffset(None) is what ``datetime.time`` asks of its zone; ZoneInfo
    answers it only for a zone without transitions.
    """
    return zone.utcoffset(None) is not None


@functools.lru_cache(maxsize=4096)
def _changes_in_chunk(zone: ZoneInfo, chunk: int) -> tuple[int, ...]:
    """The seconds in [chunk * _CHUNK, (chunk + 1) * _CHUNK) whose offset differs from the
    second before."""
    low = chunk * _CHUNK - 1
    stop = low + _CHUNK
    low_offset = _offset(zone, low)
    changes: list[int] = []
    while low < stop:
        high = min(low + _PROBE, stop)
        high_offset = _offset(zone, high)
        if high_offset != low_offset:
            before, after = low, high
            while after - before > 1:
                middle = (before + after) // 2
                if _offset(zone, middle) == low_offset:
                    before = middle
                else:
                    after = middle
            changes.append(after)
        low, low_offset = high, high_offset
    return tuple(changes)


def _next_wall(cron: str, floor_wall: int) -> int | None:
    """First wall-clock second (as naive POSIX seconds) after ``floor_wall`` that matches."""
    try:
        found = next(CronSim(cron, _NAIVE_EPOCH + timedelta(seconds=floor_wall)))
    except (StopIteration, OverflowError):
        return None
    return (found - _NAIVE_EPOCH) // _SECOND


def _repeat_end(zone: ZoneInfo, instant: int, offset: int) -> int | None:
    """For an instant shortly after a fall-back: the wall second where repeated walls end."""
    back = instant - _PROBE
    before = _offset(zone, back)
    if before <= offset:
        return None
    change = _first_change(zone, back, instant, before)
    return None if change is None else change + before


# Jobs sharing a schedule ask the same question at the same second (a burst of fires due
# together, a pass arming every job): the answer is a pure function of the arguments.
@functools.lru_cache(maxsize=1024)
def _next_cron(cron: str, zone: ZoneInfo, fixed: bool, after: int, horizon: int) -> int | None:
    """First fire second after ``after`` (a POSIX second), or None before ``horizon``."""
    segment_start, offset = after, _offset(zone, after)
    floor_wall = after + offset
    if fixed:
        # Inside the second pass of a repeated hour the repeated wall times
        # already fired on their first pass.
        repeat_end = _repeat_end(zone, after, offset)
        if repeat_end is not None:
            floor_wall = max(floor_wall, repeat_end - 1)
    while True:
        wall = _next_wall(cron, floor_wall)
        if wall is None:
            return None
        candidate = wall - offset
        if candidate > horizon:
            return None
        change = _first_change(zone, segment_start, candidate, offset)
        if change is None:
            return candidate
        new_offset = _offset(zone, change)
        # The first matching wall time at or after the end of this segment lies
        # in the gap: a fixed-time job fires once, at the first instant after it.
        if fixed and new_offset > offset and wall < change + new_offset:
            return change
        # A fixed-time job resumes after the repeated wall times (first pass
        # only); any other job matches them again on the second pass.
        resume = change + (max(offset, new_offset) if fixed else new_offset)
        segment_start, offset, floor_wall = change, new_offset, resume - 1
